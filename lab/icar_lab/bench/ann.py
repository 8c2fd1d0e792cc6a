"""An ANN bench whose data is not shaped like its index: recall@10 and latency of the settings
`icar build-index` tunes on each table, beside LanceDB's default search settings on the same index.

Each distribution's cluster structure is independent of the partition count (sqrt(rows)), so a few probes
cannot find every neighbour by landing on one cluster per partition:
- `few_large`: 10 clusters of rank 64, each cut by ~100 partitions at 1M rows;
- `many_small`: rows/50 clusters of rank 16 (20,000 at 1M: ~20 per partition);
- `high_dim`: 64 clusters of rank 256 and more noise: neighbours barely nearer than the rest;
- `scenes`: the embedded model's own embeddings of rendered scenes (`icar_lab.scenes`), grown to
  `rows` along the real data: each row lies on the segment between a real embedding and one of its 10
  nearest real neighbours (uniform position), plus noise of 0.05x their distance, normalised.
Queries are fresh draws from the same distribution, not table rows; truth is exact brute force over the
stored (float16-rounded) values (`pipeline.query.exact_neighbours`), and recall and latency come from the
runtime's `measure_search`. Build time and the build's peak extra memory (RSS sampled every 50 ms) are
measured per index.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np

from icar_lab.bench.query import clustered_vectors, fresh_truth, search_quality, vector_table
from icar_lab.plots import pyplot
from pipeline.query import KMEANS_ITERATIONS, K, index_params, tune_search

TARGET_RECALL = 0.95  # `query.target_recall`'s default
DISTRIBUTIONS = ("few_large", "many_small", "high_dim", "scenes")
SCENE_NEIGHBOURS = 10


def _rss_bytes() -> int:
    with open("/proc/self/status") as status:
        line = next(s for s in status if s.startswith("VmRSS:"))
    return int(line.split()[1]) * 1024


@contextmanager
def peak_memory() -> Iterator[dict[str, float]]:
    """Peak resident memory above the starting point while the block runs (sampled every 50 ms)."""
    out = {"peak_extra_bytes": 0.0}
    start, done = _rss_bytes(), threading.Event()

    def sample() -> None:
        while not done.wait(0.05):
            out["peak_extra_bytes"] = max(out["peak_extra_bytes"], _rss_bytes() - start)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield out
    finally:
        done.set()
        thread.join()


def scene_embeddings(count: int, seed: int = 11) -> tuple[np.ndarray, list[str]]:
    """The embedded model's unit embeddings (full depth, as the job decodes) of `count` rendered scenes."""
    import torch

    from icar_lab.scenes.render import make_example
    from pipeline.config import ModelConfig
    from pipeline.decode import decode_image
    from pipeline.encode.model import load_model, normalize_uint8

    loaded = load_model(ModelConfig())
    vectors, captions = [], []
    for start in range(0, count, 64):
        pixels = []
        for index in range(start, min(count, start + 64)):
            scene, data, _ = make_example(seed, "bench", index)
            pixels.append(decode_image(data, loaded.preprocess, 64_000_000)[0])
            captions.append(scene.caption)
        x = normalize_uint8(torch.from_numpy(np.stack(pixels)), loaded.mean, loaded.std)
        with torch.inference_mode():
            vectors.append(loaded.model.encode_image(x, normalize=True).numpy())
    return np.concatenate(vectors).astype(np.float32), captions


def along_real_data(real: np.ndarray, seed: int) -> Callable[[int, np.random.Generator], np.ndarray]:
    """A sampler of points between real embeddings and their near real neighbours (module docstring)."""
    sims = real @ real.T
    np.fill_diagonal(sims, -np.inf)
    neighbours = np.argsort(-sims, axis=1)[:, :SCENE_NEIGHBOURS]

    def sample(n: int, gen: np.random.Generator) -> np.ndarray:
        a = gen.integers(0, len(real), n)
        b = neighbours[a, gen.integers(0, SCENE_NEIGHBOURS, n)]
        t = gen.random((n, 1), np.float32)
        gap = np.linalg.norm(real[b] - real[a], axis=1, keepdims=True)
        x = real[a] + t * (real[b] - real[a])
        x += 0.05 * gap / np.sqrt(real.shape[1]) * gen.standard_normal(x.shape, np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    return sample


def distribution(name: str, rows: int, seed: int, scenes: int) -> tuple[np.ndarray, Callable, str]:
    """(data, sampler of fresh draws, description) of one named distribution."""
    if name == "scenes":
        real, _ = scene_embeddings(scenes)
        sample = along_real_data(real, seed)
        data = np.concatenate(
            [sample(min(100_000, rows - i), np.random.default_rng(seed + i)) for i in range(0, rows, 100_000)]
        )
        return (
            data,
            sample,
            f"{len(real):,} real embeddings ({real.shape[1]}-d) of rendered scenes, grown along them",
        )
    clusters, rank, noise = {
        "few_large": (10, 64, 0.1),
        "many_small": (max(8, rows // 50), 16, 0.1),
        "high_dim": (64, 256, 0.3),
    }[name]
    data, sample = clustered_vectors(rows, 512, seed, clusters, rank, noise)
    return data, sample, f"{clusters:,} clusters of rank {rank}, noise {noise}, 512-d"


def measure_distribution(
    workdir: Path, name: str, rows: int, dtype: str, queries: int, hnsw: bool, scenes: int, seed: int = 0
) -> dict[str, Any]:
    """One table: build IVF_PQ (and IVF_HNSW_SQ with `hnsw`), tune as build-index does, measure."""
    import lancedb
    from lancedb.index import IvfHnswSq, IvfPq

    data, sample, described = distribution(name, rows, seed, scenes)
    stored = data.astype(np.float16) if dtype == "float16" else data
    del data
    query_vectors = sample(queries, np.random.default_rng(seed + 1_000_003))
    table = lancedb.connect(str(workdir)).create_table(name, vector_table(stored), mode="overwrite")
    dim = stored.shape[1]
    del stored
    truth = fresh_truth(table.to_lance(), query_vectors)
    params = index_params(rows, dim)
    out: dict[str, Any] = {"distribution": name, "vectors": described, "dim": dim, "indexes": []}
    configs = {"IVF_PQ": IvfPq(distance_type="cosine", max_iterations=KMEANS_ITERATIONS, **params)}
    if hnsw:
        configs["IVF_HNSW_SQ"] = IvfHnswSq(distance_type="cosine", num_partitions=params["num_partitions"])
    for kind, config in configs.items():
        with peak_memory() as memory:
            t0 = time.perf_counter()
            table.create_index("vector", config=config, replace=True)
            build_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        tuned = tune_search(table, params["num_partitions"], TARGET_RECALL)
        tune_s = time.perf_counter() - t0
        dataset = table.to_lance()
        out["indexes"].append(
            {
                "type": kind,
                "params": params if kind == "IVF_PQ" else {"num_partitions": params["num_partitions"]},
                "build_s": build_s,
                "build_peak_extra_bytes": memory["peak_extra_bytes"],
                "tune_s": tune_s,
                "tuned": asdict(tuned),
                "settings": {
                    "tuned": search_quality(dataset, query_vectors, truth, tuned.knobs),
                    "lancedb_default": search_quality(dataset, query_vectors, truth, {"nprobes": None}),
                },
            }
        )
    return out


def measure_ann(
    workdir: Path, stem: Path, rows: int, dtype: str, queries: int, hnsw: bool, scenes: int, only=None
) -> dict:
    """Every distribution in turn; `stem`.json/.md/.png rewritten after each (a long run keeps its
    finished tables' numbers if stopped)."""
    result = {
        "rows": rows,
        "dtype": dtype,
        "queries": queries,
        "k": K,
        "target_recall": TARGET_RECALL,
        "lancedb": version("lancedb"),
        "cpu_count": os.cpu_count(),
        "distributions": [],
    }
    for name in only or DISTRIBUTIONS:
        print(f"{datetime.now(UTC):%H:%M:%S} {name}: {rows:,} rows", flush=True)
        measured = measure_distribution(workdir / name, name, rows, dtype, queries, hnsw, scenes)
        result["distributions"].append(measured)
        result["utc"] = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        result["load_average"] = os.getloadavg()[0]
        stem.with_suffix(".json").write_text(json.dumps(result, indent=2, default=float))
        stem.with_suffix(".md").write_text(markdown(result))
        plot(result, stem.with_suffix(".png"))
    return result


def markdown(r: dict[str, Any]) -> str:
    lines = [
        f"### ANN search at {r['rows']:,} rows ({r['dtype']}), {r['utc']}",
        "",
        f"{r['queries']} fresh queries per table, k={r['k']}, truth by brute force; `tuned` = the cheapest "
        f"(nprobes, refine_factor) `icar build-index` finds for recall@10 {r['target_recall']} on the "
        "table's own rows; `default` = LanceDB's search defaults on the same index, same call "
        f"(`pipeline.query.nearest`); lancedb {r['lancedb']}, {r['cpu_count']} CPUs, "
        f"load {r['load_average']:.1f}.",
        "",
        "| distribution | index | build s | build peak MB | tuned setting | tuned R@10 | p50 ms | p99 ms "
        "| default R@10 | p50 ms | p99 ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for d in r["distributions"]:
        for i in d["indexes"]:
            t, s = i["tuned"], i["settings"]
            tu, de = s["tuned"], s["lancedb_default"]
            index = f"{i['type']} {i['params']['num_partitions']} part."
            lines.append(
                f"| {d['distribution']} | {index} | {i['build_s']:.0f} "
                f"| {i['build_peak_extra_bytes'] / 2**20:.0f} "
                f"| nprobes {t['nprobes']}, refine {t['refine_factor']}"
                f"{'' if t['reached'] else ' (target not reached)'} | {tu['recall@10']:.3f} "
                f"| {tu['latency_ms']['p50']:.1f} | {tu['latency_ms']['p99']:.1f} | {de['recall@10']:.3f} "
                f"| {de['latency_ms']['p50']:.1f} | {de['latency_ms']['p99']:.1f} |"
            )
    lines += [
        "",
        "Distributions: "
        + "; ".join(f"`{d['distribution']}` {d['vectors']}" for d in r["distributions"])
        + ".",
    ]
    return "\n".join(lines) + "\n"


def plot(r: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for setting, marker in (("tuned", "o"), ("lancedb_default", "x")):
        for d in r["distributions"]:
            for i in d["indexes"]:
                s = i["settings"][setting]
                ax.scatter(s["latency_ms"]["p50"], s["recall@10"], marker=marker)
                ax.annotate(
                    f"{d['distribution']} {i['type']} {setting}",
                    (s["latency_ms"]["p50"], s["recall@10"]),
                    fontsize=7,
                )
    ax.axhline(r["target_recall"], color="grey", linestyle=":")
    ax.set(xlabel="p50 ms / query", ylabel="recall@10", title=f"ANN at {r['rows']:,} rows ({r['dtype']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, required=True)
    parser.add_argument("--dtype", choices=["float16", "float32"], default="float16")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--scenes", type=int, default=4000, help="rendered scenes embedded for `scenes`")
    parser.add_argument("--hnsw", action="store_true", help="also build and measure IVF_HNSW_SQ")
    parser.add_argument("--only", nargs="+", choices=DISTRIBUTIONS, help="a subset of the distributions")
    parser.add_argument("--out", type=Path, default=Path("results/bench"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"ann-{args.rows}"
    with tempfile.TemporaryDirectory(prefix="icar-ann-") as workdir:
        result = measure_ann(
            Path(workdir), stem, args.rows, args.dtype, args.queries, args.hnsw, args.scenes, args.only
        )
    print(markdown(result))


if __name__ == "__main__":
    main()
