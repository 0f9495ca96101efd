"""The benchmark scripts in bench/ run with their own folder first on sys.path, so a script named like an
importable module hides that module from everything the script imports: transformers 5 imports the
`kernels` package, and a bench/kernels.py made every transformers baseline of bench/speed.py fail."""

import sys
from importlib.machinery import PathFinder
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"


def test_no_bench_script_is_named_like_an_importable_module():
    elsewhere = [p for p in sys.path if Path(p or ".").resolve() != BENCH]
    scripts = sorted(p.stem for p in BENCH.glob("*.py"))
    assert "speed" in scripts
    clashes = [name for name in scripts
               if name in sys.stdlib_module_names or PathFinder.find_spec(name, elsewhere) is not None]  # fmt: skip
    assert not clashes, f"rename these bench/ scripts, which hide the modules of the same name: {clashes}"
