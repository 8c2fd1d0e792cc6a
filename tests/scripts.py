"""Scripts are no package (jobs/, lab/studies/): their tests load them by path."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent


def load_script(relative: str) -> ModuleType:
    """The script at `relative` (to the repository root) as a module, imported once per test session."""
    path = ROOT / relative
    name = f"script_{path.parent.name}_{path.stem}"
    if name not in sys.modules:  # registered before it runs: its dataclasses look their module up there
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]
