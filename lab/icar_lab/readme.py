"""The README's measured numbers, generated from the latest results files so that they cannot drift.

A generated block sits between `<!-- generated:NAME -->` and `<!-- /generated:NAME -->`; `update` rewrites
every block from `results/`, and the test suite fails when the README differs from what `update` returns.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from icar_lab.frontier import frontier_markdown

_BLOCK = re.compile(r"(<!-- generated:(\w+) -->\n).*?(<!-- /generated:\2 -->)", re.S)


def _json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


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
        command = f"python jobs/headroom.py --split {a['split']} --images {a['images']}"
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


def scale_block(results: Path) -> str:
    """results/bench/scale.json as `make bench-scale` reports it."""
    from icar_lab.bench.scale import markdown

    text = markdown(_json(results / "bench" / "scale.json"))
    return text.split("\n", 2)[2].replace("## Projection", "#### Projection")


def ann_block(results: Path) -> str:
    """Every results/bench/ann-<rows>.md (`make bench-ann`), smallest table first."""
    from icar_lab.bench.ann import markdown

    paths = sorted((results / "bench").glob("ann-*.json"), key=lambda p: int(p.stem.split("-")[1]))
    return "\n".join(markdown(_json(path)) for path in paths) or "Not measured yet: run `make bench-ann`.\n"


BLOCKS: dict[str, Callable[[Path], str]] = {
    "quality": quality_block,
    "frontier": frontier_block,
    "headroom": headroom_block,
    "bench": bench_block,
    "scale": scale_block,
    "ann": ann_block,
}


def update(readme: str, results: Path) -> str:
    """The README with every generated block rewritten from `results`; an unknown block is an error."""

    def render(match: re.Match[str]) -> str:
        name = match.group(2)
        if name not in BLOCKS:
            raise KeyError(f"README block {name!r} has no generator (known: {', '.join(BLOCKS)})")
        return match.group(1) + BLOCKS[name](results) + match.group(3)

    return _BLOCK.sub(render, readme)
