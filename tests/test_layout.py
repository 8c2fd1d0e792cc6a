"""The runtime stands alone: it never imports the lab or the lab's optional dependencies."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "pipeline"
LAB_ONLY = ("icar_lab", "matplotlib")


def runtime_modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "lab" not in p.relative_to(PACKAGE).parts)


def imported_names(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_no_runtime_module_imports_the_lab_or_its_extras():
    offenders = {
        str(path.relative_to(PACKAGE)): sorted(n for n in imported_names(path) if n.startswith(LAB_ONLY))
        for path in runtime_modules()
    }
    assert {k: v for k, v in offenders.items() if v} == {}
    assert len(offenders) >= 15  # the walk really saw the runtime (read … query, encode/)


def test_loading_every_runtime_entry_point_loads_nothing_from_the_lab():
    code = (
        "import sys, pipeline.cli, pipeline.job, pipeline.query, pipeline.encode.actor, pipeline.progress\n"
        f"print(sorted(m for m in sys.modules if m.startswith({LAB_ONLY!r})))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_runtime_wheel_ships_no_lab_module(tmp_path):
    """`pip install .` installs the runtime only; the lab is its own distribution (lab/pyproject.toml)."""
    import shutil
    import zipfile

    source = tmp_path / "source"  # a copy, so that the build leaves nothing in the working tree
    skip = shutil.ignore_patterns(".*", "results", "*.egg-info", "build")
    shutil.copytree(PACKAGE.parent, source, ignore=skip)
    build = ["pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(source)]
    subprocess.run([sys.executable, "-m", *build], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("icar_pipeline-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert [n for n in names if "lab" in n.split("/")[0]] == []
    assert "pipeline/encode/adaptive.py" in names and "pipeline/models/icar-tiny-vit.routes.yaml" in names
