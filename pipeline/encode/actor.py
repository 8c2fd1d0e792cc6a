"""Stage 4 on the actor pool: each actor holds one model, embeds the ok rows of every batch it gets (one
forward pass per route present in the batch) and writes them as fragments of the output tables; only the
parts' metadata goes on to the driver (`write.fragments`).

`EncodeStage` takes prepared rows (GPU encoders, fed by CPU decode tasks); `DecodeEncodeStage` takes row
groups and prepares them itself (CPU encoders: each core decodes, scores and encodes its own rows)."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from pipeline.config import IndexConfig
from pipeline.decode import Preprocess
from pipeline.encode.routed import RoutedEncoder
from pipeline.prepare import OK, Batch, prepare_unit, unbundle
from pipeline.write.fragments import FragmentTarget, part_batch, write_part, write_parts


class EncodeStage:
    """Ray actor class (map_batches with an ActorPoolStrategy); the model loads once per actor."""

    def __init__(self, cfg: dict[str, Any], target: FragmentTarget):
        self.cfg, self.target = cfg, target
        config = IndexConfig.model_validate(cfg)
        threads = config.encoder.torch_threads or max(1, int(config.encoder.cpus_per_actor))
        torch.set_num_threads(threads)
        use_gpu = config.encoder.gpus_per_actor > 0 and torch.cuda.is_available()
        self.encoder = RoutedEncoder.from_config(
            config.model, config.router.routes, "cuda" if use_gpu else "cpu"
        )
        self.route_names = np.asarray([r.name for r in config.router.routes], dtype=object)

    def __call__(self, batch: Batch) -> Batch:
        """Prepared rows in (of any shards), their parts out."""
        return write_parts(self.encode(batch), self.target)

    def encode(self, batch: Batch) -> Batch:
        started = time.perf_counter()
        ok = np.flatnonzero(batch["outcome"] == OK)
        n = len(batch["outcome"])
        encoded = self.encoder.encode(batch["image"][ok], batch["route"][ok])
        vectors = np.zeros((n, self.encoder.embed_dim), np.float32)
        vectors[ok] = encoded.vectors
        exit_depth, tokens, gflops = np.zeros(n, np.int32), np.zeros(n, np.int32), np.zeros(n, np.float32)
        exit_depth[ok], tokens[ok], gflops[ok] = encoded.exit_depth, encoded.tokens, encoded.gflops
        t_encode = np.zeros(n, np.float32)
        t_encode[ok] = (time.perf_counter() - started) / max(len(ok), 1)
        out = {k: v for k, v in batch.items() if k != "image"}
        out.update(
            vector=vectors,
            exit_depth=exit_depth,
            tokens=tokens,
            gflops=gflops,
            route_name=self.route_names[batch["route"]],
            t_encode=t_encode,
        )
        return out


class DecodeEncodeStage(EncodeStage):
    """CPU encoders: row groups in, embedded rows out, in encoder batches.

    On CPU nodes decoding and encoding compete for the same cores; running both in one actor per core
    keeps every core busy with no pixels shipped between processes (Ray's own fusion of the two
    map_batches would bundle many row groups into one actor task and starve the other actors)."""

    def __init__(self, cfg: dict[str, Any], target: FragmentTarget, preprocess: Preprocess):
        super().__init__(cfg, target)
        self.preprocess = preprocess
        self.batch_size = IndexConfig.model_validate(cfg).encoder.batch_size

    def __call__(self, bundles: Batch) -> Batch:  # type: ignore[override]
        """A bundle of row groups in, their parts out. A row group travelling alone (it may be large)
        is decoded and encoded chunk by chunk, then written; the small ones of a bundle (a few hundred
        rows in all, `prepare.bundle_units`) are encoded together, in full batches, and written as one
        part per shard."""
        units = unbundle(bundles)
        if len(units["uri"]) == 1:
            return part_batch([write_part(self._encoded(units), str(units["name"][0]), self.target)])
        chunks = list(prepare_unit(units, self.cfg, self.preprocess))
        rows = {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}
        rows = {k: v[np.argsort(rows["route"], kind="stable")] for k, v in rows.items()}
        encoded = [
            self.encode({k: v[b] for k, v in rows.items()})
            for b in route_batches(rows["route"], self.batch_size)
        ]
        return write_parts({k: np.concatenate([e[k] for e in encoded]) for k in encoded[0]}, self.target)

    def _encoded(self, unit: Batch) -> Iterator[Batch]:
        for chunk in prepare_unit(unit, self.cfg, self.preprocess):
            for rows in route_batches(chunk["route"], self.batch_size):
                yield self.encode({k: v[rows] for k, v in chunk.items()})


def route_batches(routes: np.ndarray, batch_size: int) -> Iterator[slice]:
    """Encoder batches of a chunk whose rows come grouped by route (`prepare_rows` sorts them): each
    batch holds one route, so each is one dense forward, and a route's rows are cut into near-equal
    batches of at most `batch_size` (70 rows run as 35 + 35 rather than 64 + 6)."""
    if len(routes) == 0:
        return
    starts = np.flatnonzero(np.r_[True, routes[1:] != routes[:-1]])
    for start, stop in zip(starts, [*starts[1:], len(routes)], strict=True):
        cuts = np.linspace(start, stop, -(-(stop - start) // batch_size) + 1).round().astype(int)
        for a, b in itertools.pairwise(cuts):
            yield slice(int(a), int(b))
