"""Exit heads: a LayerNorm and a projection per exit depth, mapping an early CLS token into the
text tower's embedding space. Saved as a small safetensors file stamped with the base model's identity,
so heads trained for one model can never be applied to another."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn


def model_fingerprint(visual: nn.Module) -> str:
    """Hash of the vision tower's architecture and weights (a few sampled values per tensor, fast)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(visual.state_dict().items()):
        flat = tensor.detach().reshape(-1).float()
        sample = flat[:: max(1, flat.numel() // 64)][:64]
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(sample.numpy().round(6).tobytes())
    return digest.hexdigest()[:24]


class HeadsMismatchError(ValueError):
    """The heads file was trained for a different base model."""


class ExitHeads(nn.Module):
    """One head per exit depth, initialised from the model's final LayerNorm and projection."""

    def __init__(self, visual: nn.Module, depths: list[int]):
        super().__init__()
        self.depths = sorted(set(depths))
        width, embed_dim = visual.ln_post.normalized_shape[0], visual.output_dim
        self.norms = nn.ModuleDict()
        self.projs = nn.ParameterDict()
        for depth in self.depths:
            norm = nn.LayerNorm(width)
            norm.load_state_dict(visual.ln_post.state_dict())
            self.norms[str(depth)] = norm
            proj = visual.proj.detach().clone() if visual.proj is not None else torch.eye(width, embed_dim)
            self.projs[str(depth)] = nn.Parameter(proj)
        self.fingerprint = model_fingerprint(visual)

    def project(self, pooled: torch.Tensor, depth: int) -> torch.Tensor:
        return self.norms[str(depth)](pooled) @ self.projs[str(depth)]

    def save(self, path: str | Path, model_id: str) -> None:
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        meta = {
            "model_fingerprint": self.fingerprint,
            "model_id": model_id,
            "depths": json.dumps(self.depths),
        }
        save_file(state, str(path), metadata=meta)

    @classmethod
    def load(cls, path: str | Path, visual: nn.Module) -> ExitHeads:
        """Load heads for `visual`; refuse (HeadsMismatchError) heads trained for another model."""
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            state = {k: fh.get_tensor(k) for k in fh.keys()}
        expected = model_fingerprint(visual)
        if meta.get("model_fingerprint") != expected:
            raise HeadsMismatchError(
                f"exit heads {path} were trained for model {meta.get('model_id', '?')} "
                f"(fingerprint {meta.get('model_fingerprint', 'missing')}), not for this model "
                f"(fingerprint {expected}); retrain them with jobs/train_heads.py"
            )
        heads = cls(visual, json.loads(meta["depths"]))
        heads.load_state_dict(state)
        heads.eval()
        return heads
