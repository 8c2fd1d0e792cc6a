"""Load any open_clip model by name plus a pretrained tag or a local checkpoint.

The embedded default (`icar-tiny-vit`) is one more open_clip model config shipped in `pipeline/models/`
with its checkpoint beside it; it is registered with open_clip and loaded through the same call as
ViT-B-32, so nothing downstream special-cases it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cache
from typing import Any

import open_clip
import torch

from pipeline.config import EMBEDDED_MODEL, MODELS_DIR, ModelConfig
from pipeline.decode import Preprocess

EMBEDDED_CHECKPOINT = MODELS_DIR / f"{EMBEDDED_MODEL}.safetensors"
EMBEDDED_HEADS = MODELS_DIR / f"{EMBEDDED_MODEL}.heads.safetensors"
MODEL_CONFIGS_ENV = "ICAR_MODEL_CONFIGS"
# open_clip's eval normalisation (OPENAI_DATASET_MEAN / STD), used unless a model config overrides it
_DEFAULT_MEAN = (0.48145466, 0.4578275, 0.40821073)
_DEFAULT_STD = (0.26862954, 0.26130258, 0.27577711)


@cache
def register_embedded_models() -> None:
    """Make open_clip aware of the model configs this package ships, and of those in the directories
    `ICAR_MODEL_CONFIGS` names (os.pathsep-separated): architectures open_clip does not ship. Every
    process that builds a model reads it, so on a cluster set it in the runtime_env's env_vars."""
    open_clip.add_model_config(MODELS_DIR)
    for folder in filter(None, os.environ.get(MODEL_CONFIGS_ENV, "").split(os.pathsep)):
        open_clip.add_model_config(folder)


@dataclass
class LoadedModel:
    model: Any  # open_clip.CLIP (or CustomTextCLIP)
    tokenizer: Any
    image_size: int  # the first side of `preprocess.size` (the lab's square scenes)
    preprocess: Preprocess
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    model_id: str


def resolve_pretrained(cfg: ModelConfig) -> str | None:
    if cfg.pretrained is not None:
        return cfg.pretrained
    if cfg.name == EMBEDDED_MODEL:
        if not EMBEDDED_CHECKPOINT.exists():
            raise FileNotFoundError(
                f"embedded checkpoint {EMBEDDED_CHECKPOINT} is missing; train it with jobs/train_clip.py"
            )
        return str(EMBEDDED_CHECKPOINT)
    return None


def resolve_heads(cfg: ModelConfig) -> str | None:
    """Exit heads to load: the configured file, else the shipped heads of the embedded model."""
    if cfg.heads is not None:
        return cfg.heads
    if cfg.name == EMBEDDED_MODEL and cfg.pretrained is None and EMBEDDED_HEADS.exists():
        return str(EMBEDDED_HEADS)
    return None


def model_preprocess(cfg: ModelConfig) -> Preprocess:
    """The model's eval geometry without loading its weights (the job's driver needs only this): the model
    config's `preprocess_cfg`, overridden by the pretrained tag's as `open_clip.create_model` merges them
    (SigLIP tags, for instance, squash with bilinear resampling)."""
    register_embedded_models()
    model_cfg = open_clip.get_model_config(cfg.name)
    if model_cfg is None:
        raise ValueError(f"model.name '{cfg.name}' is not an open_clip model (see open_clip.list_models())")
    pre = dict(model_cfg.get("preprocess_cfg") or {})
    if cfg.pretrained:
        tag = open_clip.get_pretrained_cfg(cfg.name, cfg.pretrained)
        pre.update({k: tag[k] for k in ("interpolation", "resize_mode") if tag.get(k)})
    return Preprocess.from_model_config({**model_cfg, "preprocess_cfg": pre})


def load_model(cfg: ModelConfig, pretrained: str | None | bool = True) -> LoadedModel:
    """Build the model in eval mode on CPU. `pretrained=False` gives random weights (benchmarks)."""
    register_embedded_models()
    if cfg.name not in open_clip.list_models():
        raise ValueError(f"model.name '{cfg.name}' is not an open_clip model (see open_clip.list_models())")
    tag = resolve_pretrained(cfg) if pretrained is True else (pretrained or None)
    model = open_clip.create_model(cfg.name, pretrained=tag, device="cpu")
    model.eval()
    visual = model.visual
    preprocess = model_preprocess(cfg)
    mean = tuple(getattr(visual, "image_mean", None) or _DEFAULT_MEAN)
    std = tuple(getattr(visual, "image_std", None) or _DEFAULT_STD)
    return LoadedModel(
        model=model,
        tokenizer=open_clip.get_tokenizer(cfg.name),
        image_size=preprocess.size[0],
        preprocess=preprocess,
        mean=mean,  # type: ignore[arg-type]
        std=std,  # type: ignore[arg-type]
        model_id=cfg.model_id,
    )


def normalize_uint8(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> normalised float [N, 3, H, W], the tensor open_clip's preprocess makes."""
    x = images.permute(0, 3, 1, 2).float().div_(255.0)
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return x.sub_(m).div_(s)
