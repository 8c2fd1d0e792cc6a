"""Group a batch by route and run one adaptive forward per group (so saved FLOPs are saved seconds)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pipeline.config import ModelConfig, RouteSpec
from pipeline.encode.adaptive import AdaptiveViT
from pipeline.encode.heads import ExitHeads
from pipeline.encode.model import LoadedModel, load_model, resolve_heads


@dataclass
class EncodedBatch:
    vectors: np.ndarray  # [N, D] float32, L2-normalised
    exit_depth: np.ndarray  # [N] int32
    tokens: np.ndarray  # [N] int32
    gflops: np.ndarray  # [N] float32


class RoutedEncoder:
    """uint8 images + route ids -> embeddings, one forward pass per route present in the batch."""

    def __init__(
        self,
        loaded: LoadedModel,
        routes: list[RouteSpec],
        heads: ExitHeads | None = None,
        device: str = "cpu",
    ):
        self.loaded = loaded
        self.routes = routes
        self.device = torch.device(device)
        loaded.model.to(self.device)
        if heads is not None:
            heads.to(self.device)
        self.vit = AdaptiveViT(
            loaded.model.visual, heads, model_name=loaded.model_id, mean=loaded.mean, std=loaded.std
        )
        for route in routes:
            self.vit.route_depth(route)  # fail at start-up, not mid-job, on a route the heads cannot serve

    @classmethod
    def from_config(
        cls, model_cfg: ModelConfig, routes: list[RouteSpec], device: str = "cpu"
    ) -> RoutedEncoder:
        loaded = load_model(model_cfg)
        heads_path = resolve_heads(model_cfg)
        heads = ExitHeads.load(heads_path, loaded.model.visual) if heads_path else None
        return cls(loaded, routes, heads, device)

    @property
    def embed_dim(self) -> int:
        return self.vit.embed_dim

    def encode(self, images: np.ndarray, route_ids: np.ndarray) -> EncodedBatch:
        """images: uint8 [N, H, W, 3] at the model's resolution, as decode.py makes them."""
        if images.dtype != np.uint8:
            raise TypeError(f"the encoder takes uint8 pixels [N, H, W, 3], got {images.dtype}")
        n = len(images)
        out = EncodedBatch(
            vectors=np.zeros((n, self.embed_dim), np.float32),
            exit_depth=np.zeros(n, np.int32),
            tokens=np.zeros(n, np.int32),
            gflops=np.zeros(n, np.float32),
        )
        pixels = torch.from_numpy(np.ascontiguousarray(images))
        for route_id in np.unique(route_ids):
            rows = np.flatnonzero(route_ids == route_id)
            batch = pixels if len(rows) == n else pixels[torch.from_numpy(rows)]
            batch = batch.to(self.device, non_blocking=True)
            result = self.vit(batch, self.routes[int(route_id)])  # uint8: normalised inside the stem
            out.vectors[rows] = result.embeddings.float().cpu().numpy()
            out.exit_depth[rows] = result.exit_depth
            out.tokens[rows] = result.tokens.numpy()
            out.gflops[rows] = result.gflops.numpy()
        return out
