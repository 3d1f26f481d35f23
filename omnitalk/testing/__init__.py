"""Helpers for omnitalk's tests: fixtures in the official layout (make_fixture), parity checks (parity,
reference), and `load_script` for the repository's scripts/ and benchmarks/, which are not a package."""
from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType


def load_script(path: str | Path) -> ModuleType:
    """The Python file at `path` (e.g. scripts/train_small.py) imported as a module named after the file."""
    path = Path(path)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
