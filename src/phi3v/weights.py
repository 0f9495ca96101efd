"""Finding a checkpoint and loading its safetensors into a `Phi3VForCausalLM` (spec §2).

Shards are memory-mapped. On the CPU, big tensors already in the target dtype are used straight from
the map (no copy: pages load on first use and stay shareable with the OS page cache). Everything else is
converted one tensor at a time into the target dtype and device, and that tensor's file pages are
released at once, so peak memory stays close to the size of the converted weights. One exception: in a
float32 load the token embedding keeps the file's 16-bit dtype (and so, on the CPU, stays in the map),
since a lookup reads only a few rows and `Phi3VForCausalLM.embed` widens them exactly.

Quantized loads also need the C allocator to give freed memory back while they run: see
`freed_memory_returned`.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import mmap
import os
import re
import struct
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from phi3v import cpu_kernels, hugepages, pocket
from phi3v.config import Phi3VConfig
from phi3v.errors import Phi3VError
from phi3v.linear import check_quant_mode, pack_for_cpu, quantize_layer
from phi3v.model import Phi3VForCausalLM

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
CLIP_PREFIX = "model.vision_embed_tokens.img_processor.vision_model."
# Stored in the official files but never used (spec §2.2): buffers, the pooled-output norm of CLIP.
IGNORED = re.compile(r"(\.position_ids$|rotary_emb\.inv_freq$|^" + re.escape(CLIP_PREFIX) + r"post_layernorm\.)")
CLIP_LAYER = re.compile("^" + re.escape(CLIP_PREFIX) + r"encoder\.layers\.(\d+)\.")
EMBEDDING = "model.embed_tokens.weight"
# Smaller tensors (norms, biases, position embeddings) are copied even when their dtype is right. A page
# of a read-only map brings the page cache's whole folio around it into our resident set, so each of the
# vision tower's few-KB biases and norms, used from the map, pulled in up to MBs of its quantized
# neighbours' dropped pages: 0.19-0.27 GiB more peak RSS in an int4 run of Phi-3-V (3.32-3.38 GiB
# against 3.11-3.15 copied; AMX Xeon, kernel 6.18, bench/rss_stages.py). The copies come to 4 MB.
MAPPED_FROM_BYTES = 4 << 20
# A fine-tune may store the shared embedding under the vision module's name too (spec §2.2).
ALIASES = {"model.vision_embed_tokens.wte.weight": EMBEDDING}

_DTYPES = {
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}  # fmt: skip


def resolve_checkpoint(name_or_path: str | Path) -> Path:
    """A local folder, a hub id (`microsoft/Phi-3.5-vision-instruct`) already in the local HF cache, or
    "pocket", the small model that ships with phi3v."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if str(name_or_path) == pocket.NAME:
        return pocket.folder()
    if path.exists():
        raise Phi3VError(f"{path} is a file; pass the checkpoint folder that holds config.json")
    name = str(name_or_path)
    if re.fullmatch(r"[\w.-]+/[\w.-]+", name):
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(name, local_files_only=True))
        except Exception:  # noqa: BLE001 - any failure here means "not in the cache"
            raise Phi3VError(
                f"{name} is not in the local Hugging Face cache; download it first with "
                f"`huggingface-cli download {name}` or pass the path of a local copy"
            ) from None
    raise Phi3VError(f"checkpoint folder {name} does not exist; pass a folder or a Hugging Face id")


def shard_map(folder: Path) -> dict[str, Path]:
    """tensor name -> shard file, from model.safetensors.index.json or a single model.safetensors."""
    index = folder / INDEX_FILE
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = {name: folder / shard for name, shard in weight_map.items()}
        for shard in set(files.values()):
            if not shard.exists():
                raise Phi3VError(f"{shard} named in {INDEX_FILE} is missing; the download is incomplete")
        return files
    single = folder / SINGLE_FILE
    if single.exists():
        return {name: single for name in read_header(single)}
    raise Phi3VError(f"{folder} has neither {INDEX_FILE} nor {SINGLE_FILE}; is it a Phi-3-Vision checkpoint?")


def checkpoint_bytes(folder: Path) -> int:
    """Size of the weight files on disk (the bf16 weights' size for the official checkpoints)."""
    return sum(p.stat().st_size for p in set(shard_map(folder).values()))


def read_header(path: Path) -> dict[str, dict]:
    """The safetensors JSON header: name -> {dtype, shape, data_offsets} (offsets relative to the data)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header


def iter_tensors(
    path: Path, names: set[str], convert: Callable[[str, torch.Tensor], Any], by_row: frozenset[str] = frozenset()
) -> Iterator[tuple[str, Any]]:
    """Yield (name, tensor) for `names` in one shard, each a view of a read-only memory map of the file.

    `convert(name, view)` returns a converted copy (or a quantized layer), whose file pages are then
    dropped from our resident set, or None to keep the view itself: zero-copy, paged in on first use and
    shared with the OS page cache. Kept views but those in `by_row` are mapped with huge pages where
    the OS offers them: each decoding step reads them whole, and a bf16 step of Phi-3-V took 325 ms
    instead of 357 after a cold read (AMX Xeon, ext4, kernel 6.18: 6.7 GiB of the map in 2 MiB pages,
    not 1.7; bench/hugepages.py). The token embedding is read a row at a time, and a 2 MiB page would
    bring in 340 rows with each.
    The same views are read in and mapped while loading (`populate`), not on first use: from a cold page
    cache that moves the disk reads out of the first prompt (AMX Xeon, bf16, bench/first_prompt.py: load
    1.6-1.8 -> 5.2-6.2 s, the first image prompt's first token 13.4-14.6 -> 9.1-9.3 s, 0.5-1.8 s sooner in
    all, in 3 of 5 runs; docs/benchmarks.md has the other two); from a warm one the load takes as long.
    """
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)  # stays open while a view needs it
    base = 8 + n
    for name in sorted(names, key=lambda k: header[k]["data_offsets"][0]):
        info = header[name]
        start, end = (base + o for o in info["data_offsets"])
        dtype, shape = _DTYPES[info["dtype"]], info["shape"]
        if end == start:
            yield name, torch.empty(shape, dtype=dtype)
            continue
        with warnings.catch_warnings():  # a read-only map: tensors made from it must never be written to
            warnings.simplefilter("ignore", UserWarning)
            view = torch.frombuffer(mm, dtype=torch.uint8, count=end - start, offset=start).view(dtype).reshape(shape)
        out = convert(name, view)
        lo = start // mmap.PAGESIZE * mmap.PAGESIZE  # madvise takes page-aligned starts
        if out is None:
            if name not in by_row:
                hugepages.advise(mm, lo, end - lo)
                populate(mm, lo, end - lo)
            yield name, view
            continue
        del view
        mm.madvise(mmap.MADV_DONTNEED, lo, end - lo)
        yield name, out


# Linux 5.14's MADV_POPULATE_READ, by number where Python's mmap module does not name it (3.11's does not)
MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22 if sys.platform == "linux" else None)


def populate(mm: mmap.mmap, start: int, length: int) -> None:
    """Read mm's bytes start..start+length in and map them now, where the OS can (a no-op elsewhere)."""
    if MADV_POPULATE_READ is not None:
        with contextlib.suppress(OSError):  # EINVAL: a kernel before 5.14
            mm.madvise(MADV_POPULATE_READ, start, length)


def expected_keys(model: torch.nn.Module) -> dict[str, torch.Size]:
    return {k: v.shape for k, v in model.state_dict(keep_vars=True).items()}


def is_ignored(name: str, cfg: Phi3VConfig) -> bool:
    """Keys the loader skips on purpose: unused buffers and CLIP layers past the selected one (spec §2.2)."""
    if IGNORED.search(name):
        return True
    m = CLIP_LAYER.match(name)
    return m is not None and int(m.group(1)) >= cfg.vision.layers_to_run


# glibc's M_MMAP_THRESHOLD: blocks of this many bytes and up get their own mappings, returned on free.
M_MMAP_THRESHOLD = -3
WHILE_QUANTIZING = 1 << 20
AFTER_QUANTIZING = 16 << 20  # prompts' activations from the heap (docs/benchmarks.md has 8 and 32 MiB too)


def _mallopt(param: int, value: int) -> bool:
    """glibc's mallopt; False where there is none (another C library) or it refuses."""
    try:
        return bool(ctypes.CDLL(None).mallopt(param, value))
    except (OSError, AttributeError):
        return False


@contextlib.contextmanager
def freed_memory_returned(enabled: bool = True) -> Iterator[None]:
    """While quantizing, make glibc's malloc serve blocks of 1 MiB and up with their own mappings, returned
    on free; afterwards, blocks up to 16 MiB from the heap.

    Its default threshold grows to 32 MiB as big blocks are freed, so the tens-of-MB temporaries of
    quantizing come from the heap, whose freed holes stay resident between the layers kept around them:
    measured 0.6-1.7 GiB of extra peak RSS in an int4 run, varying run to run. Kept at 1 MiB after the
    load, every prompt's activations became fresh mappings, whose page faults cost a quarter of a quantized
    model's time to first token (AMX Xeon, Phi-3-V at num_crops=4, bench/speed.py: int8 11.7 s, 8.9 s with
    16 MiB; int4 11.9 s, 8.5-8.9 s) for 0.15-0.17 GiB more peak RSS. 32 MiB was a little faster (7.8 and
    8.4 s) but held 0.29 GiB more, taking int4 past issue 5's 3.5 GB. Once set, glibc no longer adjusts the
    threshold itself, hence an explicit one afterwards. Only quantized loads ask for it (`enabled`): other
    loads make no such temporaries, and fresh mappings made the bf16 vision tower 15% slower (its float32
    copies of bf16 weights are such blocks). A user's own MALLOC_MMAP_THRESHOLD_ wins: then nothing is set.
    """
    enabled = enabled and "MALLOC_MMAP_THRESHOLD_" not in os.environ
    if enabled:
        enabled = _mallopt(M_MMAP_THRESHOLD, WHILE_QUANTIZING)
    try:
        yield
    finally:
        if enabled:
            _mallopt(M_MMAP_THRESHOLD, AFTER_QUANTIZING)


def load_model(
    folder: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    cls: type[Phi3VForCausalLM] = Phi3VForCausalLM,
    progress: Callable[[int, int], None] | None = None,
    quantize: str | None = None,
    group_size: int | None = None,
    quantize_vision: bool = True,
) -> Phi3VForCausalLM:
    """Build the model on the meta device and fill it from the folder's safetensors (strict key check).

    quantize: None, "int8" or "int4" for the decoder's linear layers (int4 in groups of `group_size`
    inputs, by default 128 where that divides a layer's inputs); lm_head and, with `quantize_vision`,
    the vision tower and projector then get int8. Each layer is quantized as it is read, so no
    full-precision copy of the model is ever in memory.
    `progress(done, total)` is called after each tensor, for a progress bar.
    """
    check_quant_mode(quantize)  # before any reading
    folder = resolve_checkpoint(folder)
    cfg = Phi3VConfig.from_file(folder / "config.json") if (folder / "config.json").exists() else None
    if cfg is None:
        raise Phi3VError(f"{folder} has no config.json; pass the folder of a Phi-3-Vision checkpoint")
    device = torch.device(device)
    with torch.device("meta"):
        model = cls(cfg)
    want = expected_keys(model)
    files = shard_map(folder)
    stored = {ALIASES.get(k, k): k for k in files if not is_ignored(k, cfg)}
    if "model.vision_embed_tokens.wte.weight" in files and EMBEDDING in files:
        stored[EMBEDDING] = EMBEDDING
    missing, unexpected = sorted(set(want) - set(stored)), sorted(set(stored) - set(want))
    if missing or unexpected:
        raise Phi3VError(
            f"checkpoint {folder} does not match the model: missing keys {_short(missing)}, "
            f"unexpected keys {_short(unexpected)}"
        )

    modes = quant_plan(model, quantize, quantize_vision)
    huge = hugepages.HugePages()

    def convert(name: str, t: torch.Tensor) -> Any:
        mode = modes.get(renamed[name].removesuffix(".weight"))
        if mode is not None:
            layer = quantize_layer(t, None, mode, device, group_size)
            if mode == "int8":
                layer.qweight = huge.copy(layer.qweight)
            elif layer.blocked:  # not the others: huge pages slowed PyTorch's order of pairs (hugepages.py)
                layer.qweight, layer.scales_and_zeros = huge.copy(layer.qweight), huge.copy(layer.scales_and_zeros)
            return layer
        want = dtype if t.is_floating_point() else t.dtype
        if renamed[name] == EMBEDDING and want == torch.float32 and t.dtype in (torch.bfloat16, torch.float16):
            want = t.dtype  # a lookup reads a few rows, widened exactly in `embed`: 0.4 GB less on Phi-3-V
        if device.type == "cpu" and t.dtype == want and t.nbytes >= MAPPED_FROM_BYTES:
            return None  # already right: use the memory-mapped file directly
        return t.to(device=device, dtype=want, copy=True)

    by_file: dict[Path, set[str]] = {}
    for ours, theirs in stored.items():
        by_file.setdefault(files[theirs], set()).add(theirs)
    renamed = {theirs: ours for ours, theirs in stored.items()}
    by_row = frozenset(theirs for ours, theirs in stored.items() if ours == EMBEDDING)
    state, layers, done = {}, {}, 0
    with freed_memory_returned(device.type == "cpu" and quantize is not None):
        for path, names in sorted(by_file.items()):
            for name, t in iter_tensors(path, names, convert, by_row):
                ours = renamed[name]
                shape = (t.out_features, t.in_features) if isinstance(t, torch.nn.Module) else t.shape
                if tuple(shape) != tuple(want[ours]):
                    raise Phi3VError(f"{name} has shape {tuple(shape)} in {path.name}, expected {tuple(want[ours])}")
                if isinstance(t, torch.nn.Module):
                    layers[ours.removesuffix(".weight")] = t
                else:
                    state[ours] = t
                done += 1
                if progress is not None:
                    progress(done, len(stored))
    for name, layer in layers.items():
        if f"{name}.bias" in state:
            layer.bias = state.pop(f"{name}.bias")
        model.set_submodule(name, layer)
    result = model.load_state_dict(state, strict=False, assign=True)
    left = [k for k in result.missing_keys if k.rsplit(".", 1)[0] not in layers] + result.unexpected_keys
    assert not left, f"keys checked above did not load: {left}"
    del state, layers  # packing below replaces tensors one by one: no second copy of the model may stay alive
    model = model.eval().requires_grad_(False)
    if device.type == "cpu":
        pack_for_cpu(model.model.layers)
        pack_for_cpu(model.lm_head)
        cpu_kernels.get()  # build them now (once per machine) rather than in the first prompt
    return model


def quant_plan(model: torch.nn.Module, quantize: str | None, quantize_vision: bool) -> dict[str, str]:
    """module name -> "int8"/"int4" for each linear layer to quantize."""
    if quantize is None:
        return {}
    plan = {}
    for name, m in model.named_modules():
        if not isinstance(m, torch.nn.Linear):
            continue
        if name.startswith("model.layers."):
            plan[name] = quantize
        elif name == "lm_head" or quantize_vision:
            plan[name] = "int8"  # int4 would save little memory here and cost accuracy
    return plan


def _short(keys: list[str], n: int = 8) -> str:
    if not keys:
        return "none"
    more = f" and {len(keys) - n} more" if len(keys) > n else ""
    return "[" + ", ".join(keys[:n]) + "]" + more
