"""The route catalogue: every operating point the lab measures, as data, in one place.

A route is its spec. Its name is derived from the spec (so two lists can never name one route two ways)
and results are keyed by `spec_key`, the spec without its name, so a measurement made under one name
still matches the same forward under another (the shipped router's `full-keep75-floor16` is the
catalogue's `tome-keep75-floor16`).
"""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, Any

from pipeline.config import MergeRoute, PruneRoute, RouterConfig, RouteSpec, TwoPhaseRoute

if TYPE_CHECKING:
    from pipeline.encode.heads import ExitHeads

PRUNE_AFTER = 2  # energy pruning starts after block 2: earlier token features are too raw to rank

# Token paths by family: how a route reduces tokens, with the settings worth measuring.
FAMILIES: dict[str, tuple[dict[str, Any], ...]] = {
    "plain": ({},),
    # ToMe with a constant r: collapses the last blocks to a few tokens at larger r
    "tome": tuple({"merge": "tome", "merge_r": r} for r in (2, 4, 6, 8)),
    # front-loaded ToMe: keep a fraction of the tokens per block, stop merging at a floor
    "schedule": tuple(
        {"merge": "tome", "merge_keep": keep, "merge_floor": floor}
        for keep in (0.65, 0.7, 0.75, 0.8)
        for floor in (8, 16)
    ),
    # two-phase: keep 80% per block for the first blocks, then a harder fraction (on calib the best of
    # them needs fewer GFLOPs than the best one-phase schedule at equal mean cosine)
    "late": tuple(
        {"merge": "tome", "merge_keep": 0.8, "merge_floor": 8, "late_keep": keep, "late_after": after}
        for after in (2, 3)
        for keep in (0.65, 0.7, 0.75)
    ),
    # per image, decided inside the ViT: only images whose tokens are alike at block `late_after` (the
    # late merges' worst pair has key cosine >= late_similarity) take the harder late schedule
    "split": tuple(
        {
            "merge": "tome",
            "merge_keep": 0.8,
            "merge_floor": 8,
            "late_keep": 0.65,
            "late_after": after,
            "late_similarity": similarity,
        }
        for after in (2, 3)
        for similarity in (0.8, 0.9)
    ),
    # spectral-energy budget per image (block-2 token features are low-rank: tau 0.9 keeps ~6 of 64)
    "energy": tuple({"energy_tau": tau, "prune_after": PRUNE_AFTER} for tau in (0.98, 0.99, 0.995, 0.999)),
    # a fixed token budget: the same number of patch tokens kept for every image after block 2
    "budget": tuple({"keep_tokens": n, "prune_after": PRUNE_AFTER} for n in (16, 32, 48)),
}
TOKEN_PATHS: tuple[dict[str, Any], ...] = tuple(path for paths in FAMILIES.values() for path in paths)


def route_name(spec: RouteSpec) -> str:
    """`full`, `exit6`, `tome4`, `tome-keep70-floor16`, `tome-keep80-floor8-then65-after3-alike90`,
    `exit8-energy99`, …: every field that differs from the defaults, in a fixed order (prune_after only
    when it differs from the family's convention)."""
    parts = [f"exit{spec.exit_depth}"] if spec.exit_depth is not None else []
    if isinstance(spec, MergeRoute):
        amount = f"{spec.merge_r}" if spec.merge_keep is None else f"-keep{spec.merge_keep * 100:g}"
        parts.append(spec.merge + amount + (f"-floor{spec.merge_floor}" if spec.merge_floor else ""))
    if isinstance(spec, TwoPhaseRoute):
        parts.append(f"then{spec.late_keep * 100:g}-after{spec.late_after}")
        if spec.late_similarity is not None:
            parts.append(f"alike{spec.late_similarity * 100:g}")
    if isinstance(spec, PruneRoute):
        energy = spec.energy_tau
        parts.append(f"tokens{spec.keep_tokens}" if energy is None else f"energy{energy * 100:g}")
        if spec.prune_after != PRUNE_AFTER:
            parts.append(f"after{spec.prune_after}")
    if spec.tuned:
        parts.append("tuned")
    return "-".join(parts) or "full"


# the merge schedules the embedded model's shipped heads carry tuned tails for
SHIPPED_TAIL_SCHEDULES = tuple(f"tome-keep{keep}-floor8" for keep in (60, 65, 70, 75))
_SCHEDULE_NAME = re.compile(r"(tome|crossget)(?:(\d+)|-keep(\d+(?:\.\d+)?))(?:-floor(\d+))?")


def merge_schedule(name: str, tuned: bool = True) -> RouteSpec:
    """The full-depth route of the merge schedule `name`, as `route_name` writes one (`tome4`,
    `tome-keep70-floor8`), with its tuned tail or without; ValueError for any other name, so a schedule
    is named one way only."""
    match = _SCHEDULE_NAME.fullmatch(name)
    if match is None:
        raise ValueError(f"{name!r} is not a merge schedule name (e.g. tome4, tome-keep70-floor8)")
    merge, r, keep, floor = match.groups()
    fields = {"merge": merge, **({"merge_r": int(r)} if r else {"merge_keep": float(keep) / 100})}
    fields |= {"merge_floor": int(floor)} if floor else {}
    if route(**fields).name != name:
        raise ValueError(f"{name!r} is not a merge schedule name; did you mean {route(**fields).name!r}?")
    return route(tuned=tuned, **fields)


def route(exit_depth: int | None = None, **reduction: Any) -> RouteSpec:
    """A validated spec with its derived name."""
    spec = RouteSpec(name="-", exit_depth=exit_depth, **reduction)
    return spec.model_copy(update={"name": route_name(spec)})


def spec_key(spec: RouteSpec) -> str:
    """The route's identity: its non-default fields, name excluded, as canonical JSON."""
    return json.dumps(spec.model_dump(exclude_defaults=True, exclude={"name"}), sort_keys=True)


def router_key(router: RouterConfig) -> str:
    """A router's identity: scorer, thresholds and its routes' spec keys, as canonical JSON."""
    routes = [json.loads(spec_key(r)) for r in router.routes]
    fields = {"scorer": router.scorer, "thresholds": router.thresholds, "routes": routes}
    return json.dumps(fields, sort_keys=True)


FULL = route()
FULL_KEY = spec_key(FULL)


def tuned_routes(heads: ExitHeads | None) -> list[RouteSpec]:
    """A tuned route for each token path `heads` has a tuned tail for (heads.py)."""
    return [route(tuned=True, **json.loads(path)) for path in heads.tail_paths] if heads else []


def calibration_routes(exits: list[int], heads: ExitHeads | None = None) -> list[RouteSpec]:
    """Every token path at every exit and at full depth, and the tuned routes of `heads`: what
    calibration measures and searches."""
    return [route(depth, **path) for depth in [*exits, None] for path in TOKEN_PATHS] + tuned_routes(heads)


def frontier_routes(exits: list[int], heads: ExitHeads | None = None) -> list[RouteSpec]:
    """Full depth, each plain exit, every token path at full depth and the tuned routes of `heads`: the
    frontier's fixed points."""
    plain = [FULL, *(route(d) for d in exits), *(route(None, **path) for path in TOKEN_PATHS[1:])]
    return plain + tuned_routes(heads)


def bench_routes(exits: list[int]) -> list[RouteSpec]:
    """One or two points per family, for models timed for speed only (random weights, untrained heads)."""
    return [
        FULL,
        *(route(d) for d in exits),
        route(merge="tome", merge_r=4),
        route(merge="tome", merge_keep=0.75, merge_floor=16),
        route(merge="tome", merge_keep=0.8, merge_floor=8, late_keep=0.7, late_after=3),
        route(energy_tau=0.99, prune_after=PRUNE_AFTER),
    ]


def unique(routes: list[RouteSpec]) -> list[RouteSpec]:
    """The routes in order, each spec once (the first name wins)."""
    seen: set[str] = set()
    kept = []
    for r in routes:
        if spec_key(r) not in seen:
            seen.add(spec_key(r))
            kept.append(r)
    return kept
