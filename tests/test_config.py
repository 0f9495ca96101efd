"""config.json parsing (spec §1)."""

import json

import pytest

from phi3v.checkpoint import preset
from phi3v.config import Phi3VConfig, VisionConfig
from phi3v.errors import Phi3VError


def test_official_config_parses_as_is(official_dir):
    """The real file, with its stale eos, flash-attn flag and "su" rope block, loads unchanged."""
    cfg = Phi3VConfig.from_file(official_dir / "config.json")
    t, v = cfg.text, cfg.vision
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.head_dim) == (3072, 32, 32, 96)
    assert (t.intermediate_size, t.vocab_size, t.num_key_value_heads) == (8192, 32064, 32)
    assert (t.max_position_embeddings, t.original_max_position_embeddings) == (131072, 4096)
    assert len(t.short_factor) == len(t.long_factor) == 48
    assert t.short_factor[0] == 1.05 and t.long_factor[-1] == pytest.approx(64.81, abs=1e-3)
    assert t.pad_token_id == 32000  # absent in the 3-V file: class default
    assert v == VisionConfig()  # ViT-L/14-336 hard-coded: 24 layers, features from layer 23
    assert v.layers_to_run == 23 and v.num_patches == 576
    assert cfg.num_img_tokens == 144
    assert t.rope_scale == pytest.approx(1.1902380714238083, abs=1e-12)


def test_round_trip_with_vision_extension_key(tmp_path):
    """Tiny configs carry `phi3v_vision_config`; the full preset writes no extension key."""
    tiny = preset("tiny")
    d = tiny.to_dict()
    assert d["phi3v_vision_config"]["hidden_size"] == 32
    assert Phi3VConfig.from_dict(d) == tiny
    assert "phi3v_vision_config" not in preset("full").to_dict()
    assert Phi3VConfig.from_dict(preset("full").to_dict()) == preset("full")


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d["rope_scaling"].update(short_factor=[1.0] * 3), "short_factor"),
        (lambda d: d["rope_scaling"].update(type="yarn"), "not supported"),
        (lambda d: d.update(architectures=["LlamaForCausalLM"], model_type="llama"), "Phi3VForCausalLM"),
        (lambda d: d["embd_layer"].update(hd_transform_order="glb_sub"), "sub_glb"),
        (lambda d: d.update(phi3v_vision_config={"widht": 3}), "unknown keys"),
    ],
)
def test_bad_configs_are_one_line_errors(official_dir, edit, message):
    d = json.loads((official_dir / "config.json").read_text())
    edit(d)
    with pytest.raises(Phi3VError, match=message) as e:
        Phi3VConfig.from_dict(d)
    assert "\n" not in str(e.value)


def test_not_json(tmp_path):
    (tmp_path / "config.json").write_text("{oops")
    with pytest.raises(Phi3VError, match="not valid JSON"):
        Phi3VConfig.from_file(tmp_path / "config.json")
