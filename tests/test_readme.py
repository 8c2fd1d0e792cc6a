"""The README's measured numbers are generated from the latest results files and cannot drift."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from icar_lab.readme import BLOCKS, bench_block, frontier_block, update

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "results"


def test_readme_numbers_match_the_latest_results():
    readme = (ROOT / "README.md").read_text()
    for name in BLOCKS:
        assert f"<!-- generated:{name} -->" in readme, f"README lost its generated {name} block"
    assert update(readme, RESULTS) == readme, "README is stale: run python jobs/readme.py"


def test_a_stale_block_is_rewritten_and_an_unknown_one_refused():
    stale = "intro\n<!-- generated:bench -->\n2.0x faster\n<!-- /generated:bench -->\nrest\n"
    fresh = update(stale, RESULTS)
    assert "2.0x faster" not in fresh and bench_block(RESULTS) in fresh
    assert fresh.startswith("intro\n") and fresh.endswith("rest\n")
    with pytest.raises(KeyError, match="nonsense"):
        update("<!-- generated:nonsense -->\nx\n<!-- /generated:nonsense -->\n", RESULTS)


def test_the_frontier_block_quotes_the_command_and_every_point():
    result = json.loads((RESULTS / "frontier.json").read_text())
    block = frontier_block(RESULTS)
    assert f"--images {result['args']['images']}" in block
    for point in result["points"]:
        assert f"| {point['name']} | {point['ms_per_image']:.2f} |" in block
