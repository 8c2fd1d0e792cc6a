"""Stage 4 on the actor pool: each actor holds one model and embeds the ok rows of every batch it gets,
one forward pass per route present in the batch."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from pipeline.config import IndexConfig
from pipeline.encode.routed import RoutedEncoder
from pipeline.prepare import OK, Batch


class EncodeStage:
    """Ray actor class (map_batches with an ActorPoolStrategy); the model loads once per actor."""

    def __init__(self, cfg: dict[str, Any]):
        config = IndexConfig.model_validate(cfg)
        threads = config.encoder.torch_threads or max(1, int(config.encoder.cpus_per_actor))
        torch.set_num_threads(threads)
        use_gpu = config.encoder.gpus_per_actor > 0 and torch.cuda.is_available()
        self.encoder = RoutedEncoder.from_config(
            config.model, config.router.routes, "cuda" if use_gpu else "cpu"
        )
        self.route_names = np.asarray([r.name for r in config.router.routes], dtype=object)

    def __call__(self, batch: Batch) -> Batch:
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
