"""The bench's encoder section: the shared speed harness (lab/icar_lab/speed.py) on each model, plus the
embedded model's quality per point read from a frontier file written by jobs/frontier.py on the test
split (never recomputed here) and matched by spec key, which says whether the shipped router -- chosen on
the calib split -- keeps equal quality on scenes it never saw, and at what speed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from icar_lab.catalogue import FULL_KEY
from icar_lab.speed import ROUTED
from pipeline.config import RouteSpec

EQUAL_QUALITY_RATIO = 0.99  # "equal quality": text->image R@10 at least 99% of full depth's (1% relative)


def frontier_quality(path: Path | None, heads_file: str | None) -> dict[str, Any]:
    """Quality per point key, and the frontier's fixed routes (so the bench times the same points).

    Marked stale when the exit heads file is newer than the frontier: exit quality may have moved since."""
    if path is None or not path.exists():
        return {"source": None, "points": {}, "routes": [], "note": f"{path} not found: quality unknown"}
    data = json.loads(path.read_text())
    keyed = [p for p in data.get("points", []) if p.get("key")]
    points = {
        p["key"]: {"t2i_R@10": p.get("t2i_R@10"), "mean_cosine_to_full": p.get("mean_cosine_to_full")}
        for p in keyed
    }
    routes = [RouteSpec(**p["route"]) for p in keyed if p.get("route")]
    stale = heads_file is not None and Path(heads_file).stat().st_mtime > path.stat().st_mtime
    notes = ["exit heads are newer than the frontier: exit quality may be stale"] if stale else []
    if not keyed:
        notes.append(f"no point of {path} carries a spec key: rerun jobs/frontier.py")
    return {"source": str(path), "points": points, "routes": routes, "stale": stale, "note": "; ".join(notes)}


def attach_quality(result: dict[str, Any], quality: dict[str, Any]) -> None:
    """Copy frontier quality onto the points with the same key (encode_image gets the full route's), and
    judge the shipped router's point against equal quality.

    Only the shipped router is judged: picking the fastest point that passes on the reporting split
    would choose on the data the number is reported on."""
    result["quality_source"] = quality["source"]
    result["quality_note"] = quality["note"]
    known = quality["points"]
    for p in result["points"]:
        q = known.get(p["key"] or FULL_KEY)
        p["t2i_R@10"] = q["t2i_R@10"] if q else None
        p["mean_cosine_to_full"] = q["mean_cosine_to_full"] if q else None
    base = known.get(FULL_KEY)
    routed = next((p for p in result["points"] if p["kind"] == ROUTED), None)
    if base is None or base.get("t2i_R@10") is None or routed is None or routed["t2i_R@10"] is None:
        result["equal_quality"] = None
        return
    ratio = routed["t2i_R@10"] / base["t2i_R@10"]
    result["equal_quality"] = {
        "rule": f"t2i R@10 >= {EQUAL_QUALITY_RATIO} x full's {base['t2i_R@10']:.4f} (1% relative)",
        "point": ROUTED,
        "meets": ratio >= EQUAL_QUALITY_RATIO,
        "recall_ratio": ratio,
        "speedup": routed["speedup"],
        "t2i_R@10": routed["t2i_R@10"],
    }
