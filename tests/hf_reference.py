"""transformers twins of our configs (test and benchmark only: transformers is never a run-time dependency)."""

import transformers

from phi3v.config import TextConfig, VisionConfig


def phi3_config(t: TextConfig, attn: str = "eager") -> "transformers.Phi3Config":
    """Phi3Config for the decoder. transformers 5 wants original_max_position_embeddings inside the rope block."""
    rope = {"type": "su", "short_factor": list(t.short_factor), "long_factor": list(t.long_factor),
            "original_max_position_embeddings": t.original_max_position_embeddings}  # fmt: skip
    return transformers.Phi3Config(
        vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_hidden_layers, num_attention_heads=t.num_attention_heads,
        num_key_value_heads=t.num_key_value_heads, rms_norm_eps=t.rms_norm_eps,
        max_position_embeddings=t.max_position_embeddings,
        original_max_position_embeddings=t.original_max_position_embeddings, rope_scaling=rope,
        pad_token_id=t.pad_token_id, attn_implementation=attn,
    )  # fmt: skip


def clip_config(v: VisionConfig, attn: str = "eager") -> "transformers.CLIPVisionConfig":
    """CLIPVisionConfig with all the checkpoint's layers (hidden_states[-2] is the one Phi-3-V uses)."""
    return transformers.CLIPVisionConfig(
        hidden_size=v.hidden_size, intermediate_size=v.intermediate_size, num_hidden_layers=v.num_hidden_layers,
        num_attention_heads=v.num_attention_heads, image_size=v.image_size, patch_size=v.patch_size,
        hidden_act="quick_gelu", layer_norm_eps=v.layer_norm_eps, attn_implementation=attn,
    )  # fmt: skip
