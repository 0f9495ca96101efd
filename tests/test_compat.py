"""The official notebook code runs with only the imports and load lines changed."""

import pytest
import torch
from PIL import Image

import phi3v
from phi3v import Phi3VForCausalLM, Phi3VProcessor
from phi3v.api import pick_dtype
from phi3v.weights import checkpoint_bytes

QUESTION = "What is shown in this image?"


@pytest.fixture(scope="module")
def loaded(tiny_checkpoint):
    model = Phi3VForCausalLM.from_pretrained(
        tiny_checkpoint, torch_dtype=torch.float32, trust_remote_code=True, _attn_implementation="eager"
    ).to("cpu")
    processor = Phi3VProcessor.from_pretrained(tiny_checkpoint, trust_remote_code=True, num_crops=4)
    return model, processor


def test_notebook_flow(loaded, images_dir, tiny_checkpoint):
    model, processor = loaded
    image = Image.open(images_dir / "australia.jpg")
    messages = [{"role": "user", "content": f"<|image_1|>\n{QUESTION}"}]
    prompt = processor.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == f"<|user|>\n<|image_1|>\n{QUESTION}<|end|>\n<|assistant|>\n"
    inputs = processor(prompt, [image], return_tensors="pt").to("cpu")
    assert set(inputs) == {"input_ids", "attention_mask", "pixel_values", "image_sizes"}
    L = inputs["input_ids"].shape[1]
    assert L == 18 + 757  # spec §6.4 at num_crops=4

    out = model(**inputs)
    assert out.logits.shape == (1, L, 32064) and out.logits.dtype == torch.float32

    ids = model.generate(**inputs, max_new_tokens=8, eos_token_id=processor.tokenizer.eos_token_id,
                         temperature=0.0, do_sample=False)  # fmt: skip
    assert torch.equal(ids[:, :L], inputs["input_ids"])
    new = ids[:, L:]
    assert new[0, 0] == out.logits[0, -1, :32045].argmax()  # the cached generate agrees with the full pass
    text = processor.batch_decode(new, skip_special_tokens=True, clean_up_tokenization_spaces=False)[0]

    api = phi3v.load(tiny_checkpoint, device="cpu", dtype="float32", num_crops=4)
    assert text == api.chat(QUESTION, images=[image], max_new_tokens=8)


def test_batched_prompts_are_left_padded_and_match_single(loaded, images_dir):
    model, processor = loaded
    img_a, img_b = Image.open(images_dir / "canoe.tif"), Image.open(images_dir / "exceltable.png")
    prompts = ["<|user|>\n<|image_1|>\nDescribe.<|end|>\n<|assistant|>\n",
               "<|user|>\n<|image_1|>\nRead the table, row by row, carefully.<|end|>\n<|assistant|>\n"]  # fmt: skip
    batch = processor(prompts, [img_a, img_b])
    mask = batch["attention_mask"]
    short = int(mask.sum(1).argmin())
    assert mask[short, 0] == 0 and mask[1 - short].all()  # the shorter prompt is padded on the left
    assert (batch["input_ids"][short][mask[short] == 0] == processor.tokenizer.pad_token_id).all()
    ids = model.generate(**batch, max_new_tokens=6)
    L = batch["input_ids"].shape[1]
    for row, (p, img) in enumerate(zip(prompts, [img_a, img_b])):
        single = processor(p, [img])
        alone = model.generate(**single, max_new_tokens=6)[0, single["input_ids"].shape[1] :]
        got = ids[row, L:]
        assert torch.equal(got[: alone.numel()], alone)


def test_dtype_arguments(tiny_checkpoint):
    assert Phi3VForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.bfloat16).dtype == torch.bfloat16
    auto = pick_dtype("auto", torch.device("cpu"), checkpoint_bytes(tiny_checkpoint))
    assert Phi3VForCausalLM.from_pretrained(tiny_checkpoint, torch_dtype="auto").dtype == auto
    assert Phi3VForCausalLM.from_pretrained(tiny_checkpoint, dtype="float32").dtype == torch.float32
    with pytest.raises(phi3v.Phi3VError, match="dtype"):
        Phi3VForCausalLM.from_pretrained(tiny_checkpoint, dtype="int3")
