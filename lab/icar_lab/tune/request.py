"""What one tune is asked to do, as plain data: it travels to the Ray worker and is recorded beside the
checkpoints, so that a resumed tune continues the same work."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from icar_lab.outputs import output_path
from pipeline.config import ConfigError

HEADS_FILE = "heads.safetensors"
ROUTES_FILE = "routes.yaml"
SUMMARY_FILE = "tune.json"
# settings that change how fast a tune runs, not what it computes: a resume may change them
_NOT_RECORDED = ("resume", "cpus")


@dataclass
class TuneRequest:
    model: str
    pretrained: str | None  # None: the embedded model's weights (or random weights, for benchmarks)
    inputs: list[str]
    out: str
    depths: list[int] | None = None  # exit heads; None: default_exit_depths of the tower
    schedules: list[str] = field(default_factory=list)  # merge schedule names to tune tails for
    images: int = 8000  # the first usable rows of the shards
    epochs: int | None = None  # None: each stage's own default (HeadSettings, TailSettings)
    tail_blocks: int | None = None  # None: half the tower
    heldout_share: float = 0.1  # rows kept apart to choose each stage's epoch by
    seed: int = 0
    input_cfg: dict[str, Any] = field(default_factory=dict)  # pipeline InputConfig fields (column names)
    decode_cfg: dict[str, Any] = field(default_factory=dict)  # pipeline DecodeConfig fields
    cpus: int = 1  # torch threads of the training worker (and the CPUs it reserves)
    resume: bool = False

    @property
    def out_dir(self) -> Path:
        return Path(self.out)

    def recorded(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k not in _NOT_RECORDED}


def default_exit_depths(depth: int) -> list[int]:
    """Exits at a third, a half, two thirds and five sixths of the tower (4, 6, 8, 10 of 12 blocks, as
    the embedded model's; 8, 12, 16, 20 of ViT-L-14's 24, ICAR's variants)."""
    return sorted({round(depth * f) for f in (1 / 3, 1 / 2, 2 / 3, 5 / 6)} - {0, depth})


def checkpoint_dir(request: TuneRequest) -> Path:
    """DIR/checkpoints, recording the request it serves. A DIR holding an earlier tune's epoch checkpoints
    is continued only with --resume and the same request; anything else is a ConfigError (a request that
    failed before its first epoch left nothing to continue, and is replaced)."""
    recorded = output_path(request.out_dir / "checkpoints" / "request.json")
    if any(recorded.parent.glob("*.pt")):
        before = json.loads(recorded.read_text())
        if not request.resume:
            raise ConfigError(
                f"{request.out} holds the checkpoints of an earlier tune: pass --resume to continue it, "
                "or choose another --out"
            )
        changed = sorted(k for k, v in request.recorded().items() if before.get(k) != v)
        if changed:
            raise ConfigError(f"--resume with settings other than the checkpoints' ({', '.join(changed)})")
    recorded.write_text(json.dumps(request.recorded(), indent=2))
    return recorded.parent
