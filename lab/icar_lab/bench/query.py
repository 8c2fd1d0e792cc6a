"""Query speed and recall of the shipped index and search (pipeline/query.py: `nearest`, straight on the
Lance dataset) on a synthetic table, with the settings `icar build-index` tuned on it, LanceDB's default
knobs and a near-exact setting, each scored against exact brute-force search over the same stored values
(`pipeline.query.exact_neighbours`) and timed by the runtime's own `measure_search`.

Vectors are a mixture of Gaussians on the unit sphere (clustered, like real CLIP embeddings whose
neighbours share a topic), not uniform noise, on which every ANN index looks uniformly bad."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.query import (
    KMEANS_ITERATIONS,
    K,
    exact_neighbours,
    index_params,
    measure_search,
    nearest,
    tune_search,
)

CLUSTER_RANK = 16  # intrinsic dimension of each cluster (real CLIP embeddings: tens of dimensions)
NOISE = 0.1  # isotropic noise norm next to a within-cluster offset of norm ~1
TARGET_RECALL = 0.95  # `query.target_recall`'s default
APPENDED_FRACTION = 0.02  # rows appended after the index is built, as a night's new shards are
SETTINGS = {  # knobs of `nearest`; none: the settings `icar build-index` stored with the table
    "shipped": {},
    "default": {"nprobes": None},  # LanceDB's defaults
    "nprobes=50, refine_factor=10": {"nprobes": 50, "refine_factor": 10},
}
EXACT_SCAN = {"use_index": False}
NOT_A_ROW = np.iinfo(np.uint64).max  # fresh queries are no row of the table: nothing to leave out
WARMUP_QUERIES = 5  # per setting, before timing: index and file handles into cache


def clustered_vectors(
    rows: int, dim: int, seed: int, clusters: int, rank: int = CLUSTER_RANK, noise: float = NOISE
) -> tuple[np.ndarray, Callable[[int, np.random.Generator], np.ndarray]]:
    """(data [rows, dim], sampler of fresh draws): unit vectors from a mixture of Gaussians.

    Each cluster is a random unit centre plus an offset of norm ~1 in its own random rank-`rank`
    subspace, plus a little isotropic noise; normalised. Low-rank clusters give neighbours the contrast
    real embeddings have (top-1 cosine ~0.85); isotropic clusters in 512-d make every member of a
    cluster almost equally near (top-1 ~0.58, top-100 ~0.53), which no real index faces."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    bases = rng.standard_normal((clusters, rank, dim)).astype(np.float32) / np.float32(dim**0.5)

    def sample(n: int, gen: np.random.Generator) -> np.ndarray:
        which = gen.integers(0, clusters, n)
        x = noise / dim**0.5 * gen.standard_normal((n, dim), np.float32)
        order = np.argsort(which, kind="stable")
        bounds = np.searchsorted(which[order], np.arange(clusters + 1))
        for k in range(clusters):
            members = order[bounds[k] : bounds[k + 1]]
            if len(members):
                z = gen.standard_normal((len(members), rank), np.float32) / np.float32(rank**0.5)
                x[members] += centres[k] + z @ bases[k]
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    data = np.concatenate([sample(min(100_000, rows - i), rng) for i in range(0, rows, 100_000)])
    return data, sample


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def vector_table(stored: np.ndarray, first_id: int = 0) -> pa.Table:
    """id + fixed-size-list vector column over `stored` (float16 or float32) without copying it."""
    vectors = pa.FixedSizeListArray.from_arrays(pa.array(stored.reshape(-1)), stored.shape[1])
    ids = np.arange(first_id, first_id + len(stored), dtype=np.int64)
    return pa.table({"id": pa.array(ids), "vector": vectors})


def latency_ms(seconds: list[float]) -> dict[str, float]:
    ms = sorted(1e3 * s for s in seconds)
    p99 = ms[min(len(ms) - 1, int(round(0.99 * (len(ms) - 1))))]
    return {"p50": statistics.median(ms), "p99": p99, "mean": statistics.fmean(ms), "queries": len(ms)}


def fresh_truth(dataset, queries: np.ndarray) -> list[set[int]]:
    """Per fresh query (no row of the table), the exact neighbours' row ids."""
    return exact_neighbours(dataset, np.full(len(queries), NOT_A_ROW), queries)


def search_quality(
    dataset, queries: np.ndarray, truth: list[set[int]], knobs: dict, warmup: int = WARMUP_QUERIES
) -> dict[str, Any]:
    """recall@10 against `truth` and latency of `nearest` with `knobs` on fresh queries, after `warmup`
    untimed ones."""
    for query in queries[:warmup]:
        nearest(dataset, query, K, ["_rowid"], **knobs)
    recall, seconds = measure_search(dataset, np.full(len(queries), NOT_A_ROW), queries, truth, knobs)
    return {"recall@10": recall, "latency_ms": latency_ms(seconds)}


def neighbour_contrast(dataset, stored: np.ndarray, queries: np.ndarray, truth: list[set[int]]) -> dict:
    """Mean exact cosine of each query's nearest and K-th nearest row: the contrast the index resolves."""
    rows = dataset.to_table(columns=["id"], with_row_id=True)
    position = dict(zip(rows.column("_rowid").to_pylist(), rows.column("id").to_pylist(), strict=True))
    top1, top_k = [], []
    for query, exact in zip(queries, truth, strict=True):
        sims = np.sort(stored[[position[r] for r in exact]].astype(np.float32) @ query)[::-1]
        top1.append(sims[0])
        top_k.append(sims[K - 1])
    return {"top1": float(np.mean(top1)), f"top{K}": float(np.mean(top_k))}


def _indexed_table(workdir: Path, stored: np.ndarray, dtype: str) -> tuple[Any, dict[str, Any]]:
    """The table written and indexed as `icar build-index` indexes it, with what that cost."""
    import lancedb  # here, not at import: the bench starts Ray (which forks) before this section
    from lancedb.index import IvfPq

    t0 = time.perf_counter()
    table = lancedb.connect(str(workdir)).create_table(
        f"vectors_{dtype}", vector_table(stored), mode="overwrite"
    )
    write_s = time.perf_counter() - t0
    path = workdir / f"vectors_{dtype}.lance"
    data_bytes = _dir_bytes(path)
    params = {**index_params(len(stored), stored.shape[1]), "max_iterations": KMEANS_ITERATIONS}
    t0 = time.perf_counter()
    table.create_index("vector", config=IvfPq(distance_type="cosine", **params), replace=True)
    build_s = time.perf_counter() - t0
    tuned = tune_search(table, params["num_partitions"], TARGET_RECALL)  # as `icar build-index` does
    return table, {
        "dtype": dtype,
        "write_s": write_s,
        "index_build_s": build_s,
        "index": {"type": "IVF_PQ", "distance_type": "cosine", **params},
        "shipped_search": {"nprobes": tuned.nprobes, "refine_factor": tuned.refine_factor},
        "tuning": asdict(tuned),
        "data_bytes": data_bytes,
        "index_bytes": _dir_bytes(path) - data_bytes,
    }


def measure_dtype(
    workdir: Path, data: np.ndarray, appended: np.ndarray, queries: np.ndarray, dtype: str, flat_queries: int
) -> dict[str, Any]:
    """Write the table, build the index, then time queries and score recall@10 against exact search;
    then append `appended` without indexing it and time the shipped settings again (LanceDB scans
    unindexed rows exactly, so they stay searchable at a cost)."""
    stored = data.astype(np.float16) if dtype == "float16" else data  # exact search sees these values
    table, result = _indexed_table(workdir, stored, dtype)
    dataset = table.to_lance()
    truth = fresh_truth(dataset, queries)
    result["settings"] = {
        name: search_quality(dataset, queries, truth, knobs) for name, knobs in SETTINGS.items()
    }
    flat, flat_truth = queries[:flat_queries], truth[:flat_queries]
    result["flat_scan"] = None
    if len(flat):  # no warm-up: each exact scan of 1M rows takes seconds
        result["flat_scan"] = search_quality(dataset, flat, flat_truth, EXACT_SCAN, warmup=0)
    result["exact_cosine"] = neighbour_contrast(dataset, stored, queries, truth)
    table.add(vector_table(appended.astype(stored.dtype), first_id=len(stored)))
    grown = table.to_lance()
    unindexed = search_quality(grown, queries, fresh_truth(grown, queries), SETTINGS["shipped"])
    result["with_unindexed_rows"] = {"rows": len(appended), **unindexed}
    return result


def measure_query(
    workdir: Path, rows: int, dim: int = 512, queries: int = 200, flat_queries: int = 5, seed: int = 0
) -> dict[str, Any]:
    """Both vector dtypes on the same synthetic vectors and queries."""
    clusters = max(8, rows // 1000)
    data, sample = clustered_vectors(rows, dim, seed, clusters)
    query_vectors = sample(queries, np.random.default_rng(seed + 1))  # fresh draws, not table rows
    appended = sample(max(1, int(rows * APPENDED_FRACTION)), np.random.default_rng(seed + 2))
    results = [
        measure_dtype(workdir, data, appended, query_vectors, d, flat_queries) for d in ("float32", "float16")
    ]
    return {
        "rows": rows,
        "dim": dim,
        "queries": queries,
        "k": K,
        "vectors": (
            f"mixture of {clusters} Gaussians (random unit centres, rank-{CLUSTER_RANK} covariance with "
            f"offset norm ~1, isotropic noise {NOISE}), normalised; not uniform noise"
        ),
        "exact": "brute force over the stored (dtype-rounded) vectors (pipeline.query.exact_neighbours)",
        "lancedb": version("lancedb"),
        "cpu_count": os.cpu_count(),
        "tables": results,
    }


def main(argv: list[str] | None = None) -> None:
    """The section on its own: `python -m icar_lab.bench.query --workdir D --rows N --out R.json`.

    The bench runs it this way, in a fresh interpreter, so nothing the earlier sections leave behind
    (thread pools, Ray, memory) can tax it. A precaution: the two ways have not been timed side by side,
    so no gain is claimed for it."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--workdir", required=True, type=Path)
    parser.add_argument("--rows", required=True, type=int)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--flat-queries", type=int, default=5)
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    result = measure_query(args.workdir, args.rows, 512, args.queries, args.flat_queries)
    args.out.write_text(json.dumps(result, default=float))


if __name__ == "__main__":
    main()
