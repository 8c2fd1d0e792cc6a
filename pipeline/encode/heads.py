"""Heads: what maps a route's tokens into the text tower's embedding space besides the tower's own end.

- Exit heads: a LayerNorm and a projection per exit depth, reading an early CLS token.
- Tuned tails: for a token path (a merge schedule at full depth), copies of the tower's last blocks plus
  its final LayerNorm and projection, trained (distilled to the untouched full depth, and contrastive to
  the captions) on the tokens that path leaves. Merging shifts what the last blocks see; a tail trained on
  that shift takes back part of the loss at no cost in FLOPs (lab/icar_lab/training/tails.py).

Saved as one safetensors file stamped with the base model's identity, so heads trained for one model can
never be applied to another. Tails are stored in float16 (half the size; they load as float32).
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from pipeline.config import RouteSpec


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


def token_path_key(route: RouteSpec) -> str:
    """What a tuned tail is trained for: the route's token path (its spec without name, depth or `tuned`)."""
    fields = route.model_dump(exclude_defaults=True, exclude={"name", "exit_depth", "tuned"})
    return json.dumps(fields, sort_keys=True)


class TunedTail(nn.Module):
    """The tower's blocks from `start` on, its final LayerNorm and projection: copies, to be tuned."""

    def __init__(self, visual: nn.Module, start: int):
        super().__init__()
        self.start = start
        self.blocks = nn.ModuleList(copy.deepcopy(b) for b in visual.transformer.resblocks[start:])
        self.ln_post = copy.deepcopy(visual.ln_post)
        proj = visual.proj if visual.proj is not None else torch.eye(visual.transformer.width)
        self.proj = nn.Parameter(proj.detach().clone())


class ExitHeads(nn.Module):
    """One head per exit depth, initialised from the model's final LayerNorm and projection, plus the
    tuned tails of some token paths (none until `add_tail`)."""

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
        self.tails = nn.ModuleList()
        self.tail_paths: list[str] = []  # token_path_key of each tail, in order
        self.fingerprint = model_fingerprint(visual)

    def project(self, pooled: torch.Tensor, depth: int) -> torch.Tensor:
        return self.norms[str(depth)](pooled) @ self.projs[str(depth)]

    def add_tail(self, visual: nn.Module, path: str, start: int) -> TunedTail:
        """A fresh tail (copies of `visual`'s end) for token path `path`, replacing any earlier one."""
        tail = TunedTail(visual, start)
        if path in self.tail_paths:
            self.tails[self.tail_paths.index(path)] = tail
        else:
            self.tail_paths.append(path)
            self.tails.append(tail)
        return tail

    def tail(self, route: RouteSpec) -> TunedTail | None:
        """The tuned tail serving `route`'s token path, or None."""
        key = token_path_key(route)
        return self.tails[self.tail_paths.index(key)] if key in self.tail_paths else None

    def save(self, path: str | Path, model_id: str) -> None:
        state = {
            k: (v.half() if k.startswith("tails.") else v).detach().contiguous()
            for k, v in self.state_dict().items()
        }
        meta = {
            "model_fingerprint": self.fingerprint,
            "model_id": model_id,
            "depths": json.dumps(self.depths),
            "tails": json.dumps([[p, t.start] for p, t in zip(self.tail_paths, self.tails, strict=True)]),
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
        for tail_path, start in json.loads(meta.get("tails", "[]")):
            heads.add_tail(visual, tail_path, start)
        heads.load_state_dict({k: v.float() for k, v in state.items()})
        heads.eval()
        return heads
