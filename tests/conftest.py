"""Shared test fixtures: paths to ../shared/fixtures and tiny random checkpoints built once per session."""

from pathlib import Path

import pytest

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
