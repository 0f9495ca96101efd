"""The pocket model's generated tasks and tokenizer (src/phi3v/pocket/data.py, checkpoint.write_byte_tokenizer)."""

import random

import pytest

from phi3v.pocket.data import COLOURS, SHAPES, TASKS, change, chart, dataset, describe, ocr, random_scene, shapes


def test_same_seed_same_data_and_answers_are_canonical():
    a, b = dataset(40, seed=3), dataset(40, seed=3)
    assert [(e.question, e.answer) for e in a] == [(e.question, e.answer) for e in b]
    assert [e.images[0].tobytes() for e in a[:8]] == [e.images[0].tobytes() for e in b[:8]]
    assert {e.task for e in a} == set(TASKS)
    assert [(e.question, e.answer) for e in dataset(40, seed=4)] != [(e.question, e.answer) for e in a]


@pytest.mark.parametrize("seed", range(20))
def test_ocr_text_is_drawn_and_fits(seed):
    ex = ocr(random.Random(seed))
    img = ex.images[0]
    assert 1 <= len(ex.answer.split()) <= 4 and img.size == (336, 336)
    bg = img.getpixel((0, 0))
    # something was drawn, and nothing touches the border (the text fits inside the margins)
    assert img.getcolors(1 << 20) and len(img.getcolors(1 << 20)) > 1
    w, h = img.size
    assert all(img.getpixel((x, y)) == bg for x in range(0, w, 5) for y in (0, h - 1))


def test_scenes_have_unique_non_overlapping_shapes():
    rng = random.Random(0)
    for _ in range(50):
        scene = random_scene(rng)
        assert len({(s.kind, s.colour) for s in scene}) == len(scene)
        for i, s in enumerate(scene):
            for t in scene[i + 1 :]:
                assert abs(s.x - t.x) > s.r + t.r or abs(s.y - t.y) > s.r + t.r


def test_shape_answers_match_the_scene():
    rng = random.Random(1)
    for _ in range(60):
        ex = shapes(rng)
        if ex.kind == "count":
            assert ex.answer in {"1", "2", "3", "4", "5"}
        elif ex.kind == "colour":
            kind = ex.question.removeprefix("What colour is the ").removesuffix("?")
            assert kind in SHAPES and ex.answer in COLOURS
        else:
            assert ex.answer.startswith("a ")


def test_describe_wording():
    from phi3v.pocket.data import Shape

    assert describe([Shape("circle", "red", 0, 0, 1)]) == "a red circle"
    two = [Shape("circle", "red", 0, 0, 1), Shape("square", "blue", 9, 0, 1)]
    assert describe(two) == "a red circle and a blue square"


def test_chart_tallest_is_the_largest_value():
    rng = random.Random(2)
    for _ in range(40):
        ex = chart(rng)
        assert ex.answer in "ABCDE" if ex.kind == "tallest" else ex.answer.isdigit()


def test_change_makes_two_different_images():
    rng = random.Random(3)
    kinds = set()
    for _ in range(30):
        ex = change(rng)
        kinds.add(ex.kind)
        assert len(ex.images) == 2 and ex.images[0].tobytes() != ex.images[1].tobytes()
        assert any(w in ex.answer for w in ("changed from", "was added", "was removed"))
    assert kinds == {"colour", "added", "removed"}


def test_trained_tokenizer_keeps_words_whole_and_digits_apart(tmp_path):
    from phi3v.checkpoint import write_byte_tokenizer
    from phi3v.prompt import Tokenizer

    corpus = [f"{e.question} {e.answer}" for e in dataset(400, seed=0)]
    write_byte_tokenizer(tmp_path, corpus, vocab_size=500)
    tok = Tokenizer.from_dir(tmp_path)
    ids = tok.encode("the circle changed from red to blue", add_bos=False)
    assert [tok.decode([i]) for i in ids] == "the circle changed from red to blue".split()
    assert [tok.decode([i]) for i in tok.encode("261", add_bos=False)][-3:] == ["2", "6", "1"]
    assert tok.decode(tok.encode("héllo wörld 42")) == "héllo wörld 42"  # bytes fall back, nothing is lost
    assert tok.token_to_id("<|user|>") is not None and tok.end_token_id not in (tok.bos_token_id, tok.eos_token_id)


def test_training_step_learns_a_fixed_batch(tmp_path):
    """The training path (collate + loss through the inference model's own forward code) can fit a batch."""
    import torch

    from phi3v.model import Phi3VForCausalLM
    from phi3v.pocket.train import build_tokenizer, collate, init_weights, loss_fn, pocket_config

    torch.manual_seed(0)
    tok = build_tokenizer(tmp_path, seed=0)
    cfg = pocket_config(-(-tok.vocab_size // 64) * 64, tok.pad_token_id)
    model = Phi3VForCausalLM(cfg)
    init_weights(model, seed=0)
    batch = collate(tok, dataset(4, seed=5), cfg.vision.tokens_per_side)
    assert batch["pixel_values"].shape[1:] == (5, 3, 336, 336)  # a 2x2 grid plus the global view
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        loss = loss_fn(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
