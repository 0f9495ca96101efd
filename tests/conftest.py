"""Shared test fixtures: paths to ../shared/fixtures and tiny random checkpoints built once per session;
helpers more than one test module uses."""

from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
FIXTURES = SHARED / "fixtures"
TOKENIZER_DIR = FIXTURES / "phi3v-tokenizer"
OFFICIAL_DIR = FIXTURES / "phi3v-official"
IMAGES_DIR = FIXTURES / "images"


def _require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"shared fixture missing: {path}")
    return path


@pytest.fixture(scope="session")
def tokenizer_dir() -> Path:
    return _require(TOKENIZER_DIR)


@pytest.fixture(scope="session")
def official_dir() -> Path:
    return _require(OFFICIAL_DIR)


@pytest.fixture(scope="session")
def images_dir() -> Path:
    return _require(IMAGES_DIR)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tokenizer_dir) -> Path:
    """A tiny random checkpoint in the official layout with the real Phi-3-Vision tokenizer."""
    from phi3v.checkpoint import write_checkpoint

    return write_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", "tiny", tokenizer_dir=tokenizer_dir)


def crossing_config(orig: int = 32):
    """The tiny preset with a small original_max_position_embeddings, so tests can cross it (spec §3.5)."""
    from dataclasses import replace

    from phi3v.checkpoint import preset

    cfg = preset("tiny")
    return replace(cfg, text=replace(cfg.text, original_max_position_embeddings=orig, max_position_embeddings=32 * orig))


def mapping_fields(address: int) -> dict[str, str]:
    """/proc/self/smaps' fields ("Rss", "VmFlags", ...) for the mapping that holds `address`."""
    fields, inside = {}, False
    for line in open("/proc/self/smaps"):
        head, _, rest = line.partition(" ")
        if "-" in head and ":" not in head:
            if inside:
                break
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo <= address < hi
        elif inside:
            fields[head.rstrip(":")] = rest.strip()
    if not fields:
        raise AssertionError("no mapping holds the address")
    return fields


def huge_page_advised(t: torch.Tensor) -> bool:
    """Whether t's data lies in a mapping advised for huge pages ("hg" in /proc/self/smaps' VmFlags)."""
    return "hg" in mapping_fields(t.data_ptr())["VmFlags"].split()


def resident_bytes(address: int) -> int:
    """The resident bytes of the mapping that holds `address` (smaps' Rss)."""
    return int(mapping_fields(address)["Rss"].split()[0]) * 1024
