"""Generate the documents' measured numbers and the configuration reference, so that neither can drift.

    python lab/studies/readme.py            # rewrite README.md and docs/*.md in place (`make docs`)
    python lab/studies/readme.py --check    # exit 1 when one is stale (what tests/test_readme.py checks)

A generated block sits between `<!-- generated:NAME -->` and `<!-- /generated:NAME -->` in README.md or a
file of docs/. The measured blocks are rendered from the latest files in `results/`; the `configuration`
block from the `Field` descriptions of `pipeline/config.py`, the one place each setting is described.
"""

from __future__ import annotations

import argparse
import inspect
import json
import re
import sys
import types
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from icar_lab.bench import ann, scale
from icar_lab.frontier import frontier_markdown
from pipeline.config import ExitRoute, IndexConfig, MergeRoute, PruneRoute, RouteSpec, TwoPhaseRoute

ROOT = Path(__file__).resolve().parents[2]
_BLOCK = re.compile(r"(<!-- generated:(\w+) -->\n).*?(<!-- /generated:\2 -->)", re.S)
# a markdown link to a file of this repository (not a URL, not an anchor of the same page)
_REPO_LINK = re.compile(r"\]\((?![a-z]+:|#|/)")
_PROJECTION_HEADING = "## Projection: the write path for LAION on N GPU nodes\n\n"


def documents(root: Path) -> list[Path]:
    """Every file that may hold generated blocks: the README and the pages of docs/."""
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def _json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


# ---- measured blocks: each renders the latest results, with links relative to the repository root ----


def quality_block(results: Path) -> str:
    """The first table of results/quality/quality.md (trained vs random init on held-out scenes)."""
    text = (results / "quality" / "quality.md").read_text()
    title, table = text.split("\n\n")[:2]
    return f"Measured by `python jobs/evaluate.py` ({title.lstrip('# ').rstrip()}):\n\n{table}\n"


def frontier_block(results: Path) -> str:
    """results/frontier.json as a table, with the command and sizes it was measured with."""
    r = _json(results / "frontier.json")
    a = r["args"]
    return (
        f"Measured by `python jobs/frontier.py --images {a['images']} --timing-images {a['timing_images']} "
        f"--rounds {a['rounds']}`: quality on {r['quality_images']} scenes of the `{r['split']}` split, "
        f"speed on the first {a['timing_images']}, batches of {a['batch_size']}, {a['threads']} threads, "
        "timed alternately against open_clip's `encode_image` in one process (speedup = median of "
        "same-round ratios, min-max in brackets); [results/frontier.md](results/frontier.md), "
        "[plot](results/frontier.png). The shipped router (`routed`) was chosen on the calib split, so its "
        "row is out of sample; the other rows are fixed catalogue points, none chosen here.\n\n"
        + frontier_markdown(r)
    )


def headroom_block(results: Path) -> str:
    """Each results/headroom/headroom-<split>.md, with the command that wrote it."""
    parts = []
    paths = (results / "headroom").glob("headroom-*.json")
    for path in sorted(paths, key=lambda p: (p.stem.count("-"), p.stem)):  # the plain split first
        a = _json(path)["args"]
        command = f"python lab/studies/headroom.py --split {a['split']} --images {a['images']}"
        command += f" --exits {' '.join(map(str, a['exits']))}" if a["exits"] is not None else ""
        command += f" --timing-images {a['timing_images']} --rounds {a['rounds']}"
        command += f" --config {a['config']}" if a["config"] else ""
        command += f" --gallery-size {a['gallery_size']}" if a.get("gallery_size") else ""
        command += f" --retime-rounds {a['retime_rounds']}" if a.get("retime_rounds") else ""
        parts.append(f"`{command}` ([{path.stem}.md](results/headroom/{path.stem}.md)):\n\n")
        parts.append(path.with_suffix(".md").read_text() + "\n")
    return "".join(parts)


def bench_block(results: Path) -> str:
    """The answers of results/bench/latest.json, with when and how long it ran."""
    r = _json(results / "bench" / "latest.json")
    mode = "" if r["mode"] == "full" else f" ({r['mode']})"
    load = r["host"]["load_average_start"][0], r["host"]["load_average_end"][0]
    head = (
        f"Latest `make bench`{mode}: {r['started_utc']}, {r['seconds']:.0f} s on {r['host']['cpu_count']} "
        f"CPUs, load average {load[0]:.2f} at start and {load[1]:.2f} at end "
        "([results/bench/latest.md](results/bench/latest.md)). Each speed is a ratio to its baseline in "
        "the same run; quality comes from results/frontier.json, measured on the test split, which nothing "
        "was chosen on:\n\n"
    )
    return head + "\n".join(f"- {text}" for text in r["answers"].values()) + "\n"


def _scale_report(results: Path) -> tuple[str, str]:
    """results/bench/scale.json as `make bench-scale` reports it: (measurements, projection)."""
    text = scale.markdown(_json(results / "bench" / "scale.json"))
    measured, projection = text.split("\n", 2)[2].split(_PROJECTION_HEADING)
    return measured.rstrip() + "\n", projection


def scale_block(results: Path) -> str:
    """The write path's measurements at scale: commit cost, start-up, tiny shards, two nodes, end to end."""
    return _scale_report(results)[0]


def projection_block(results: Path) -> str:
    """The LAION projection computed from the scale measurements, with its assumptions."""
    return _scale_report(results)[1]


def ann_block(results: Path) -> str:
    """Every results/bench/ann-<rows>.md (`make bench-ann`), smallest table first."""
    paths = sorted((results / "bench").glob("ann-*.json"), key=lambda p: int(p.stem.split("-")[1]))
    reports = [ann.markdown(_json(path)) for path in paths]
    return "\n".join(reports) if reports else "Not measured yet: run `make bench-ann`.\n"


MEASURED: dict[str, Callable[[Path], str]] = {
    "quality": quality_block,
    "frontier": frontier_block,
    "headroom": headroom_block,
    "bench": bench_block,
    "scale": scale_block,
    "projection": projection_block,
    "ann": ann_block,
}


# ---- the configuration reference: one table per section, from the models' own fields ----


def type_name(annotation: Any) -> str:
    """A field's type as a user writes it: `str | None`, `"float16" | "float32"`, `list[MergeRoute | …]`."""
    origin, args = get_origin(annotation), get_args(annotation)
    if annotation is type(None):
        return "None"
    if annotation is Any:
        return "Any"
    if origin is Annotated:
        return type_name(args[0])
    if origin is Literal:
        return " | ".join(json.dumps(a) for a in args)
    if origin in (Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin is not None:
        return f"{origin.__name__}[{', '.join(type_name(a) for a in args)}]"
    return annotation.__name__


def _plain(value: Any) -> Any:
    """A default as data: a route as the fields it sets, containers element by element."""
    if isinstance(value, BaseModel):
        return value.model_dump(exclude_defaults=True)
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def default_text(field: Any) -> str:
    """A field's default as JSON, which is YAML, so `--set` and config files take it as written."""
    if field.default_factory is not None:
        return json.dumps(_plain(field.default_factory()))
    return "required" if field.default is PydanticUndefined else json.dumps(_plain(field.default))


def table_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def fields_table(fields: dict[str, Any]) -> str:
    """Fields as a markdown table: name, type, default, description."""
    rows = [
        f"| `{name}` | `{table_cell(type_name(f.annotation))}` | `{table_cell(default_text(f))}` | "
        f"{table_cell(f.description or '')} |"
        for name, f in fields.items()
    ]
    return "\n".join(["| name | type | default | description |", "|---|---|---|---|", *rows]) + "\n"


def _doc(cls: type) -> str:
    """The class's own docstring (not one inherited from pydantic), as one paragraph."""
    own = cls.__dict__.get("__doc__")
    return " ".join(inspect.cleandoc(own).split()) + "\n\n" if own else ""


def configuration_block() -> str:
    """Every section of `IndexConfig`, then the fields of each route kind."""
    parts = [
        f"### `{name}`\n\n{_doc(section.annotation)}{fields_table(section.annotation.model_fields)}"
        for name, section in IndexConfig.model_fields.items()
    ]
    common = RouteSpec.model_fields
    parts.append(f"### Routes (`router.routes`)\n\n{_doc(RouteSpec)}Every kind:\n\n{fields_table(common)}")
    for kind in (ExitRoute, MergeRoute, TwoPhaseRoute, PruneRoute):
        own = {name: f for name, f in kind.model_fields.items() if name not in common}
        parts.append(f"#### `{kind.__name__}`\n\n{_doc(kind)}" + (fields_table(own) if own else ""))
    return "\n\n".join(part.strip() for part in parts) + "\n"


# ---- rewriting the documents ----


def renderers(results: Path) -> dict[str, Callable[[], str]]:
    """Every generated block by name: the measured ones read `results`, the configuration reads the code."""
    return {
        **{name: partial(render, results) for name, render in MEASURED.items()},
        "configuration": configuration_block,
    }


def rebase_links(markdown: str, prefix: str) -> str:
    """Links written relative to the repository root, made relative to a document `prefix` away from it."""
    return _REPO_LINK.sub(f"]({prefix}", markdown) if prefix else markdown


def update(text: str, results: Path, prefix: str = "") -> str:
    """A document with every generated block rewritten; `prefix` leads from its folder to the repository
    root (`../` for docs/). An unknown block is an error."""
    blocks = renderers(results)

    def render(match: re.Match[str]) -> str:
        name = match.group(2)
        if name not in blocks:
            raise KeyError(f"generated block {name!r} has no renderer (known: {', '.join(blocks)})")
        return match.group(1) + rebase_links(blocks[name](), prefix) + match.group(3)

    return _BLOCK.sub(render, text)


def stale_documents(root: Path) -> dict[Path, str]:
    """Each document whose generated blocks differ from a fresh rendering, with that rendering."""
    fresh = {}
    for path in documents(root):
        prefix = "../" * (len(path.relative_to(root).parts) - 1)
        current = path.read_text()
        rendered = update(current, root / "results", prefix)
        if rendered != current:
            fresh[path] = rendered
    return fresh


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--check", action="store_true", help="only report which documents are stale")
    args = parser.parse_args()
    stale = stale_documents(ROOT)
    for path, text in stale.items():
        if args.check:
            print(f"{path.relative_to(ROOT)} is stale: run make docs", file=sys.stderr)
        else:
            path.write_text(text)
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
