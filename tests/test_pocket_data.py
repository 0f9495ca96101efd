"""The pocket model's generated tasks and tokenizer (src/phi3v/pocket/data.py, checkpoint.write_byte_tokenizer)."""

import random

import pytest

from phi3v.pocket.data import (
    COLOURS, FACTS, SHAPES, TASKS, change, chart, dataset, describe, ocr, questions, random_scene, shapes,
)  # fmt: skip


def test_same_seed_same_data_and_answers_are_canonical():
    a, b = dataset(40, seed=3), dataset(40, seed=3)
    assert [(e.question, e.answer) for e in a] == [(e.question, e.answer) for e in b]
    assert [e.images[0].tobytes() for e in a[:8]] == [e.images[0].tobytes() for e in b[:8]]
    assert {e.task for e in a} == set(TASKS)
    assert [(e.question, e.answer) for e in dataset(40, seed=4)] != [(e.question, e.answer) for e in a]


@pytest.mark.parametrize("seed", range(20))
def test_ocr_text_is_drawn_and_fits(seed):
    ex = ocr(random.Random(seed))[0]
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
        qs = shapes(rng)
        [facts] = qs[0].facts
        assert all(q.images[0] is qs[0].images[0] for q in qs)  # one scene, several questions
        for ex in qs:
            if ex.kind == "count":
                assert f"{ex.answer} shapes" in facts
            elif ex.kind == "colour":
                kind = ex.question.removeprefix("What colour is the ").removesuffix("?")
                assert kind in SHAPES and ex.answer in COLOURS and f"{ex.answer} {kind}" in facts
            elif ex.kind == "shape":  # a drill: the kind of the one shape of a colour
                colour = ex.question.removeprefix("What shape is the ").removesuffix(" one?")
                assert ex.drill and f"{colour} {ex.answer}" in facts
                assert sum(f.startswith(colour + " ") for f in facts) == 1
            else:
                assert ex.answer.startswith("a ") and ex.answer.count(" a ") + 1 == len(facts) - 1


def test_describe_wording():
    from phi3v.pocket.data import Shape

    assert describe([Shape("circle", "red", 0, 0, 1)]) == "a red circle"
    two = [Shape("circle", "red", 0, 0, 1), Shape("square", "blue", 9, 0, 1)]
    assert describe(two) == "a red circle and a blue square"


def test_chart_tallest_is_the_largest_value():
    rng = random.Random(2)
    for _ in range(40):
        tallest, *values = chart(rng)
        assert tallest.kind == "tallest" and {v.kind for v in values} == {"value"} and 3 <= len(values) <= 5
        best = max(values, key=lambda v: int(v.answer))
        assert tallest.answer == best.question.removeprefix("What is the value of bar ").removesuffix("?")
        assert f"tallest {tallest.answer}" in tallest.facts[0]


def test_change_makes_two_different_images():
    rng = random.Random(3)
    kinds = set()
    for _ in range(30):
        ex, *drills = change(rng)
        kinds.add(ex.kind)
        assert not ex.drill and all(d.drill and d.images == ex.images for d in drills)
        counts = [int(d.answer) for d in drills if d.kind == "count"]
        described = [d.answer.count(" a ") + 1 for d in drills if d.kind == "describe"]
        assert counts == described and abs(counts[0] - counts[1]) == (ex.kind != "colour")
        assert len(ex.images) == 2 and ex.images[0].tobytes() != ex.images[1].tobytes()
        assert any(w in ex.answer for w in ("changed from", "was added", "was removed"))
    assert kinds == {"colour", "added", "removed"}


def test_ocr_drills_name_the_words():
    rng = random.Random(6)
    for _ in range(30):
        ex, *drills = ocr(rng)
        words = ex.answer.split()
        got = {d.kind: d.answer for d in drills}
        assert got["words"] == str(len(words)) and all(d.drill for d in drills)
        if len(words) > 1:
            assert (got["first"], got["last"]) == (words[0], words[-1])
        else:
            assert set(got) == {"words"}


def test_drills_are_never_sampled_and_never_open_a_conversation():
    """Drills are training-only and opt-in: the held-out sets (sample, dataset) never contain one, a
    training conversation has them only with drills=True and then never starts with one; without them it
    draws exactly what it did before drills existed (the shipped weights' recipe)."""
    from phi3v.pocket.train import conversation

    assert not any(e.drill for e in dataset(200, seed=7))
    rng = random.Random(8)
    convs = [conversation(TASKS[i % len(TASKS)], rng, drills=True) for i in range(80)]
    assert all(not c[0].drill for c in convs) and any(q.drill for c in convs for q in c[1:])
    assert {q.task for c in convs for q in c if q.drill} == {"ocr", "shapes", "change"}
    plain, before = random.Random(9), random.Random(9)
    for i in range(40):
        got = conversation(TASKS[i % len(TASKS)], plain)
        want = [q for q in questions(TASKS[i % len(TASKS)], before) if not q.drill]
        before.shuffle(want)
        assert [(q.question, q.answer) for q in got] == [(q.question, q.answer) for q in want[:6]]


@pytest.mark.parametrize("task", TASKS)
def test_facts_name_what_each_image_shows(task):
    rng = random.Random(4)
    for _ in range(20):
        qs = questions(task, rng)
        assert len(qs[0].facts) == len(qs[0].images) and all(f <= set(FACTS) and f for f in qs[0].facts)
    ex = ocr(random.Random(5), n_words=2)[0]
    words = [w for w in ex.answer.split() if not w.isdigit()]
    assert "2 words" in ex.facts[0] and all(f"word {w}" in ex.facts[0] for w in words)


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
    """The training path (multi-turn conversations, per-task micro-batches, answer, fact and patch losses
    through the inference model's own forward code) can fit a batch."""
    import torch

    from phi3v.model import Phi3VForCausalLM
    from phi3v.pocket.train import (
        IGNORE, Probes, build_tokenizer, collate, conversation, init_weights, micro_batches, param_groups,
        pocket_config, train_step,
    )  # fmt: skip

    torch.manual_seed(0)
    tok = build_tokenizer(tmp_path, seed=0)
    cfg = pocket_config(-(-tok.vocab_size // 64) * 64, tok.pad_token_id)
    model = Phi3VForCausalLM(cfg)
    init_weights(model, seed=0)
    rng = random.Random(5)
    convs = [conversation(task, rng) for task in ("shapes", "chart", "ocr", "change")]
    side = cfg.vision.tokens_per_side
    b = collate(tok, convs[:1], side)
    assert b["pixel_values"].shape[1:] == (5, 3, 336, 336)  # a 2x2 grid plus the global view
    learned = tok.decode([int(t) for t in b["labels"][0] if t not in (IGNORE, tok.end_token_id)])
    assert learned.replace(" ", "") == "".join(ex.answer for ex in convs[0]).replace(" ", "")
    assert int((b["labels"][0] == tok.end_token_id).sum()) == len(convs[0]) > 1  # every turn is learned
    probes = Probes(cfg)
    opt = torch.optim.AdamW(param_groups(model, 3e-3) + [{"params": list(probes.parameters()), "lr": 3e-3}])
    weight = model.model.vision_embed_tokens.img_processor.vision_model.embeddings.patch_embedding.weight
    patch = next(g for g in opt.param_groups if any(p is weight for p in g["params"]))
    assert patch["lr"] < 3e-3 / 10  # the 5292-input patch embedding learns at a scaled-down rate
    batches = micro_batches(tok, convs, side)
    assert sorted(b["ids"].shape[0] for b in batches) == [1, 1, 1, 1]  # one micro-batch per task
    history = []
    for _ in range(15):
        opt.zero_grad()
        history.append(train_step(model, probes, batches, patch_weight=1.0))
        opt.step()
    (lm0, aux0, dense0), (lm, aux, dense) = history[0], history[-1]
    assert lm < 0.5 * lm0 and aux < 0.5 * aux0 and dense < 0.5 * dense0, history
    # --bf16: the same step under bfloat16 autocast computes the same losses to bf16's precision
    opt.zero_grad()
    exact = train_step(model, probes, batches)
    opt.zero_grad()
    autocast = train_step(model, probes, batches, bf16=True)
    assert autocast != exact and autocast == pytest.approx(exact, rel=0.05)
    assert exact[2] > 0 and probes.patches.weight.grad is None  # the patch loss is reported, not learned, at weight 0
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(g.dtype == torch.float32 for g in grads)  # master weights and their gradients stay float32


def test_normed_fact_probe_reads_the_differences_between_images():
    """--norm-probe: the probe sees pooled features layer-normed, so the tiny spread between images at the
    start gives logits that differ by as much as the plain probe's would only after its weights grew."""
    import torch

    from phi3v.pocket.train import fact_probe

    torch.manual_seed(0)
    pooled = 0.05 + 0.003 * torch.randn(8, 256)  # like the tower's mean tokens at initialisation
    plain, normed = fact_probe(256), fact_probe(256, normed=True)
    assert isinstance(plain, torch.nn.Linear)
    assert normed(pooled).std(0).mean() > 10 * plain(pooled).std(0).mean()
    torch.testing.assert_close(normed(pooled + 1), normed(pooled), atol=1e-4, rtol=1e-4)  # the shared mean is gone


def test_vision_rate_multiplier_reaches_the_whole_vision_path():
    """--vision-lr scales every vision parameter, the patch embedding's scaled-down rate included, and
    nothing of the decoder."""
    from phi3v.model import Phi3VForCausalLM
    from phi3v.pocket.train import param_groups, pocket_config

    model = Phi3VForCausalLM(pocket_config(640, 0))
    rate = {id(p): g["lr"] for g in param_groups(model, 1e-3, vision_lr=3.0) for p in g["params"]}
    base = {id(p): g["lr"] for g in param_groups(model, 1e-3) for p in g["params"]}
    for name, p in model.named_parameters():
        want = 3.0 if name.startswith("model.vision_embed_tokens.") else 1.0
        assert rate[id(p)] == pytest.approx(want * base[id(p)]), name
    patch = model.model.vision_embed_tokens.img_processor.vision_model.embeddings.patch_embedding.weight
    assert base[id(patch)] == pytest.approx(1e-3 * 128 / (3 * 42 * 42))


def test_vision_phase_trains_the_vision_path_alone():
    """train.vision_phase (--vision-steps): the tower, separators, projector and both probes learn, the
    decoder is left exactly as it was, and the held-out patch accuracy is reported per kind of thing."""
    import torch

    from phi3v.model import Phi3VForCausalLM
    from phi3v.pocket.train import Probes, init_weights, optimizer, pocket_config, vision_phase

    torch.manual_seed(0)
    cfg = pocket_config(640, 0)
    model = Phi3VForCausalLM(cfg)
    init_weights(model, seed=0)
    probes = Probes(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    heads = [p.clone() for p in probes.parameters()]
    opt = optimizer(model, probes, 1e-3)
    got = vision_phase(model, probes, opt, steps=2, scenes=4, tasks=list(TASKS), rng=random.Random(0))
    after = model.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and all(k.startswith("model.vision_embed_tokens.") for k in moved)
    assert any(".img_projection." in k for k in moved) and any(".encoder.layers." in k for k in moved)
    assert all(not torch.equal(a, b) for a, b in zip(heads, probes.parameters()))  # both probes learned
    assert got["vision_seconds"] > 0
    acc = got["vision_patch_accuracy"]
    assert set(acc) == set(TASKS) and all(0 <= v <= 1 for v in acc.values())


def test_vision_phase_runs_its_first_steps_at_low_resolution_and_its_own_rate(monkeypatch):
    """--vision-low-res-steps: the phase's first steps draw their scenes at num_crops=1, the rest (and the
    held-out accuracy) at num_crops=4; --phase-lr: every group steps at that multiple of its scheduled rate."""
    import torch

    import phi3v.pocket.train as T
    from phi3v.model import Phi3VForCausalLM

    torch.manual_seed(0)
    cfg = T.pocket_config(640, 0)
    model = Phi3VForCausalLM(cfg)
    T.init_weights(model, seed=0)
    probes = T.Probes(cfg)
    opt = T.optimizer(model, probes, 1e-3, vision_lr=2.0)
    crops, rates = [], []
    real_batch, real_step = T.scene_batch, T.vision_step
    monkeypatch.setattr(T, "scene_batch", lambda scenes, side, num_crops=4: crops.append(num_crops) or real_batch(
        scenes, side, num_crops))  # fmt: skip
    monkeypatch.setattr(T, "vision_step", lambda *a: rates.append([g["lr"] for g in opt.param_groups]) or real_step(*a))
    T.vision_phase(model, probes, opt, steps=3, scenes=4, tasks=list(TASKS), rng=random.Random(0), low_res_steps=2,
                   rate=3.0)  # fmt: skip
    assert crops == [1, 1, 4] + [4] * len(TASKS)  # then one held-out batch per task
    want = [[3.0 * T.lr_at(i, 3, g["base_lr"], warmup=0) for g in opt.param_groups] for i in range(3)]
    assert rates == [pytest.approx(w) for w in want] and rates[0] != rates[1]


def test_vision_step_fits_a_fixed_batch_and_patch_accuracy_counts_right_guesses():
    """A fixed scene batch: vision_step lowers both of its losses and reaches nothing outside the vision
    path, and patch_accuracy grows as the head learns; a head forced to answer "bar" everywhere scores the
    bars' share of the patches that show something (the background is not counted)."""
    import torch

    from phi3v.model import Phi3VForCausalLM
    from phi3v.pocket.data import PIXEL_CLASS
    from phi3v.pocket.train import (
        Probes, draw_scenes, init_weights, optimizer, patch_accuracy, pocket_config, scene_batch, vision_step,
    )  # fmt: skip

    torch.manual_seed(0)
    cfg = pocket_config(640, 0)
    model = Phi3VForCausalLM(cfg)
    init_weights(model, seed=0)
    probes = Probes(cfg)
    opt = optimizer(model, probes, 3e-3)
    b = scene_batch(draw_scenes(random.Random(4), TASKS, 4), cfg.vision.tokens_per_side)
    assert b["pixel_values"].shape[0] == 5 and b["patch_targets"].shape == (25, 64)  # change has 2 images
    first = patch_accuracy(model, probes, b)
    history = []
    for _ in range(25):
        opt.zero_grad(set_to_none=True)
        history.append(vision_step(model, probes, b))
        opt.step()
    assert history[-1][0] < 0.5 * history[0][0] and history[-1][1] < 0.5 * history[0][1], history
    outside = [n for n, p in model.named_parameters() if not n.startswith("model.vision_embed_tokens.")]
    assert outside and all(model.get_parameter(n).grad is None for n in outside)  # the decoder is untouched
    assert patch_accuracy(model, probes, b) > first
    with torch.no_grad():  # a head that always says "bar" is right on every bar patch and nothing else
        probes.patches.weight.zero_()
        probes.patches.bias.zero_()
        probes.patches.bias[PIXEL_CLASS["bar"]] = 1.0
    shown = b["patch_targets"][b["patch_targets"] != 0]
    bars = float((shown == PIXEL_CLASS["bar"]).float().mean())
    assert 0 < bars < 0.5 and patch_accuracy(model, probes, b) == pytest.approx(bars, abs=1e-4)


def test_collate_batches_every_conversations_images_in_order():
    """collate: the pixels of all conversations' images in order (each as the processor gives it), and each
    row's image placeholders run as long as its images' token counts (a two-image conversation included)."""
    import torch

    from phi3v.image_processor import preprocess
    from phi3v.pocket import FOLDER
    from phi3v.pocket.train import collate, conversation
    from phi3v.prompt import Tokenizer

    tok = Tokenizer.from_dir(FOLDER)
    rng = random.Random(3)
    convs = [conversation(t, rng) for t in ("change", "ocr", "change")]
    b = collate(tok, convs, side=4, num_crops=4)
    alone = [preprocess(turns[0].images, 4, side=4) for turns in convs]
    assert torch.equal(b["pixel_values"], torch.cat([a.pixel_values for a in alone]))
    assert b["image_tokens"] == [n for a in alone for n in a.num_img_tokens]
    for row, a in zip(b["ids"], alone, strict=True):
        assert [int((row == -(k + 1)).sum()) for k in range(len(a.num_img_tokens))] == a.num_img_tokens


def test_vision_phase_leaves_the_main_training_data_as_it_was(tmp_path, monkeypatch):
    """--vision-steps draws its scenes from its own random stream: the main training sees the same
    conversations with the phase as without it."""
    import phi3v.pocket.train as train_module

    seen = []
    real = train_module.micro_batches
    monkeypatch.setattr(train_module, "micro_batches", lambda tok, convs, *a: seen.append(
        [ex.answer for turns in convs for ex in turns]) or real(tok, convs, *a))  # fmt: skip
    runs = []
    for vision_steps in (0, 1):
        seen.clear()
        info = train_module.train(tmp_path / str(vision_steps), steps=2, batch_size=4, lr=1e-3, seed=0, eval_n=0,
                                  low_res_steps=2, vision_steps=vision_steps, vision_scenes=4)  # fmt: skip
        runs.append(list(seen))
    assert len(runs[0]) == 2 and runs[0] == runs[1]
    assert info["vision_steps"] == 1 and set(info["vision_patch_accuracy"]) == set(TASKS)


def test_vision_only_signal_trains_the_tower_and_reports_each_task():
    """phi3v.pocket.tower (a quick signal for vision recipes) trains the vision path against the facts and
    scores every task on held-out scenes."""
    from phi3v.pocket.tower import run

    reports = run(steps=2, lr=1e-3, vision_lr=3.0, patch_lr_scale=None, images=4, held_out=4, every=1)
    assert [r["step"] for r in reports] == [1, 2]
    assert set(TASKS) <= set(reports[0]) and all(reports[0][t] > 0 for t in TASKS)
    assert reports[0]["ocr"] != reports[1]["ocr"]  # a step moved the tower


def test_glyph_targets_sit_on_the_ink_and_the_probe_trains():
    """phi3v.pocket.glyphs: each target patch holds its character's ink, no other patch has a target, and
    the tower's patch features (through its own image processor) train without error."""
    import torch

    from phi3v.pocket.glyphs import CHARS, batch, glyph_image, run

    rng = random.Random(3)
    for patch, jitter in ((42, 20), (21, 10)):
        img, target = glyph_image(rng, patch, jitter, (40, 70))
        assert int((target >= 0).sum()) == 8 and int(target.max()) < len(CHARS)
        px = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(336, 336, 3).float()
        ink = (px - px[0, 0]).abs().sum(-1) > 60  # the corner is background: no cell reaches it
        grid = 336 // patch
        per_patch = ink.view(grid, patch, grid, patch).sum((1, 3)).flatten()
        assert bool((per_patch[target >= 0] > 0).all()), (patch, jitter)
    pixels, targets = batch(rng, 2, 42, 0, (40, 70))
    assert pixels.shape == (2, 3, 336, 336) and targets.shape == (2, 64)
    assert len(run(steps=2, images=2, every=1, ramp=2)) == 2  # the shift grows 0, 10 px, then held-out at 20
    # --text: the OCR task's own images, two crops each, their characters' patches named
    from phi3v.pocket.glyphs import ocr_batch

    pixels, targets = ocr_batch(random.Random(5), 3, 42)
    assert pixels.shape == (6, 3, 336, 336) and targets.shape == (6, 64)
    named = {CHARS[i] for i in targets[:2][targets[:2] >= 0].tolist()}  # the first image's two crops
    assert named and named <= set(ocr(random.Random(5))[0].answer)  # its text, drawn from the same seed


def _pixels(img):
    import numpy as np

    return np.asarray(img.convert("RGB"), dtype=np.int64)


def _runs(row) -> str:
    """The characters a row of a label map crosses, left to right (a repeated class counts once)."""
    from phi3v.pocket.data import PIXEL_CLASSES

    out = [PIXEL_CLASSES[v] for i, v in enumerate(row) if v and (i == 0 or row[i - 1] != v)]
    return _single("".join(out))


def _single(text: str) -> str:
    """`text` with each run of one character written once ("apple" -> "aple")."""
    return "".join(c for i, c in enumerate(text) if i == 0 or text[i - 1] != c)


@pytest.mark.parametrize("seed", range(6))
def test_shape_label_maps_hold_each_shape_where_it_is_drawn(seed):
    """Each image's label map (the tower's per-patch target, train.patch_targets): a shape's pixels hold
    its class exactly where the image shows its colour, and nothing else is labelled."""
    import numpy as np

    from phi3v.pocket.data import PIXEL_CLASSES

    rng = random.Random(seed)
    for task in ("shapes", "change"):
        ex = questions(task, rng)[0]
        assert len(ex.label_maps) == len(ex.images)
        for img, label_map, facts in zip(ex.images, ex.label_maps, ex.facts):
            px, lab = _pixels(img), np.asarray(label_map)
            assert ((lab > 0) == (np.abs(px - px[0, 0]).sum(-1) > 0)).all()  # labelled exactly where drawn
            names = {PIXEL_CLASSES[i] for i in np.unique(lab)} - {""}
            assert names == {f for f in facts if not f.endswith(" shapes")}
            for name in names:
                assert (px[lab == PIXEL_CLASSES.index(name)] == COLOURS[name.split()[0]]).all(), (task, name)


@pytest.mark.parametrize("seed", range(6))
def test_chart_label_maps_mark_the_bars_and_read_their_labels(seed):
    import numpy as np

    from phi3v.pocket.data import PIXEL_CLASSES

    tallest, *values = chart(random.Random(seed))
    px, lab = _pixels(tallest.images[0]), np.asarray(tallest.label_maps[0])
    bar = lab == PIXEL_CLASSES.index("bar")
    colour = px[bar][0]
    assert ((px == colour).all(-1) == bar).all()  # every pixel of the bars' colour, and no other, is a bar
    assert "ABCDE"[: len(values)] in {_runs(row) for row in lab}  # the letters under the bars, left to right
    for v in values:  # each bar's value sits right above it, and its letter right below it
        letter = v.question.removeprefix("What is the value of bar ").removesuffix("?")
        ys, xs = np.nonzero(lab == PIXEL_CLASSES.index(v.answer))
        ly, lx = np.nonzero(lab == PIXEL_CLASSES.index(letter))
        assert abs(xs.mean() - lx.mean()) < 4, (letter, v.answer)
        column = bar[:, int(xs.mean())]
        assert column.any() and ys.max() < np.argmax(column) < ly.min(), (letter, v.answer)


@pytest.mark.parametrize("seed", range(8))
def test_ocr_label_boxes_spell_the_text(seed):
    """Each character's box holds that character: read along the rows of the label map, each word is
    spelled in order, and nearly all ink lies in some box."""
    import numpy as np

    ex = ocr(random.Random(seed))[0]
    px, lab = _pixels(ex.images[0]), np.asarray(ex.label_maps[0])
    ink = np.abs(px - px[0, 0]).sum(-1) > 100
    assert (lab[ink] > 0).mean() > 0.97
    rows = [_runs(row) for row in lab]
    for word in ex.answer.split():
        assert any(_single(word) in r for r in rows), (word, ex.answer)


@pytest.mark.parametrize("num_crops", [1, 4])
def test_patch_targets_follow_the_image_processor(num_crops):
    """A patch's target names what the crop the tower sees shows at the patch's centre: read back from the
    processor's own normalised crops (global view first, then the tiles), the colours agree."""
    import numpy as np
    import torch

    from phi3v.image_processor import CLIP_MEAN, CLIP_STD, preprocess
    from phi3v.pocket.data import PIXEL_CLASSES
    from phi3v.pocket.train import patch_targets

    rng, agree, total = random.Random(4), [0, 0], [0, 0]  # background, shapes
    for _ in range(6):
        ex = questions("shapes", rng)[0]
        inputs = preprocess(ex.images, num_crops, side=4)
        crops = inputs.pixel_values[0, : 1 + num_crops]
        targets = patch_targets(ex.label_maps, inputs.image_sizes, grid=8)
        assert targets.shape == (len(crops), 64)
        centres = crops[:, :, 21::42, 21::42].permute(0, 2, 3, 1) * torch.tensor(CLIP_STD) + torch.tensor(CLIP_MEAN)
        rgb = (centres.reshape(len(crops), 64, 3) * 255).numpy()
        background = _pixels(ex.images[0])[0, 0]
        for c in range(len(crops)):
            for p in range(64):
                name = PIXEL_CLASSES[int(targets[c, p])]
                want = COLOURS[name.split()[0]] if name else background
                agree[bool(name)] += int(np.abs(rgb[c, p] - want).sum() < 30)
                total[bool(name)] += 1
    assert total[1] > 50 and agree[0] / total[0] > 0.97 and agree[1] / total[1] > 0.95, (agree, total)


def test_collated_patch_targets_match_the_crops():
    """Every real crop of a micro-batch (a two-image conversation: 2 x 5 crops) gets a row of targets, and
    inputs the targets cannot describe are refused."""
    from PIL import Image

    from phi3v.pocket import FOLDER
    from phi3v.pocket.train import check_recipe, collate, conversation, patch_targets, pocket_config, train
    from phi3v.prompt import Tokenizer

    rng = random.Random(2)
    tok = Tokenizer.from_dir(FOLDER)
    b = collate(tok, [conversation("change", rng), conversation("change", rng)], side=4)
    assert b["patch_targets"].shape == (4 * 5, 64) and b["patch_targets"].max() > 0
    with pytest.raises(ValueError, match="square"):
        patch_targets([Image.new("L", (336, 200))], b["image_sizes"][:1], grid=8)
    with pytest.raises(ValueError, match="even number"):
        pocket_config(640, 0, patch=40)
    with pytest.raises(ValueError, match="--mix"):
        train(None, steps=1, batch_size=16, lr=1e-3, seed=0, eval_n=0, mix=(1, 1, 1, 0, 1))
    with pytest.raises(ValueError, match="--mix"):
        train(None, steps=1, batch_size=16, lr=1e-3, seed=0, eval_n=0, mix=(3, 1, 1, 1))
    with pytest.raises(ValueError, match="--vision-steps -1"):
        train(None, steps=1, batch_size=16, lr=1e-3, seed=0, eval_n=0, vision_steps=-1)
    with pytest.raises(ValueError, match="--vision-scenes 0"):
        train(None, steps=1, batch_size=16, lr=1e-3, seed=0, eval_n=0, vision_steps=5, vision_scenes=0)
    with pytest.raises(ValueError, match="multiple of 4"):
        train(None, steps=1, batch_size=16, lr=1e-3, seed=0, eval_n=0, vision_steps=5, vision_scenes=6)
    with pytest.raises(ValueError, match="--vision-low-res-steps 6: 0 up to --vision-steps"):
        train(None, steps=1, batch_size=16, lr=1e-3, seed=0, eval_n=0, vision_steps=5, vision_scenes=8,
              vision_low_res_steps=6)  # fmt: skip
    with pytest.raises(ValueError, match="--phase-lr 0"):
        train(None, steps=1, batch_size=16, lr=1e-3, seed=0, eval_n=0, vision_steps=5, vision_scenes=8, phase_lr=0)
    check_recipe(18, (1, 3, 2, 3), vision_steps=0, vision_scenes=8)  # no phase: its scene count is unused


def test_training_script_refuses_a_bad_recipe_in_one_line(tmp_path):
    import subprocess
    import sys

    # 7 divides neither 16 nor the default 18; --out keeps the shipped files safe if it ever did train
    r = subprocess.run([sys.executable, "-m", "phi3v.pocket.train", "--mix", "3", "1", "1", "2", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "--mix 3 1 1 2: one count per task" in r.stderr.strip().splitlines()[-1]
    assert not any(tmp_path.iterdir())


def test_encode_once_matches_the_full_encode_in_values_and_gradients():
    """At num_crops=1 a 336 px square's tile is its global view, so training runs the tower once for both:
    the image tokens, patch features and every gradient are those of encoding both crops; at num_crops=4,
    where the crops differ, it is the plain encode."""
    import torch

    from phi3v.model import Phi3VForCausalLM
    from phi3v.pocket.train import draw_scenes, encode_once, init_weights, pocket_config, scene_batch

    torch.manual_seed(0)
    cfg = pocket_config(640, 0)
    model = Phi3VForCausalLM(cfg)
    init_weights(model, seed=0)
    emb = model.model.vision_embed_tokens
    calls = []
    emb.img_processor.register_forward_hook(lambda mod, args, out: calls.append(args[0].shape[0]))
    for num_crops in (1, 4):
        b = scene_batch(draw_scenes(random.Random(4), TASKS, 4), cfg.vision.tokens_per_side, num_crops)
        got = []
        for encode in (emb.encode, lambda pv, sizes: encode_once(model, pv, sizes)):
            model.zero_grad(set_to_none=True)
            feats, patches = encode(b["pixel_values"], b["image_sizes"])
            ((feats**2).sum() + patches.sin().sum()).backward()
            got.append((feats, patches, torch.cat([p.grad.flatten() for p in emb.parameters()])))
        (f0, p0, g0), (f1, p1, g1) = got
        torch.testing.assert_close(f1, f0)
        torch.testing.assert_close(p1, p0)
        assert (g1 - g0).norm() <= 1e-5 * g0.norm(), (num_crops, (g1 - g0).norm(), g0.norm())  # up to sum order
    crops = [5 * 2, 5, 5 * 5, 5 * 5]  # the 5 images' crops: num_crops=1 both ways, then num_crops=4 both ways
    assert calls == crops
