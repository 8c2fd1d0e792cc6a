"""One tune, start to finish, in one process: load the model, read the user's images and their targets,
distil the exit heads, then a tuned tail per merge schedule, each stage checkpointed every epoch (a
resumed tune skips finished epochs), and write the heads file and a summary with the costs."""

from __future__ import annotations

import json
import sys
import time

import torch

from icar_lab.catalogue import merge_schedule
from icar_lab.outputs import output_path
from icar_lab.training.heads import HeadSettings, fit_heads
from icar_lab.training.loop import Fitting, Precision
from icar_lab.training.tails import TailSettings, train_tail
from icar_lab.tune.cost import CostMeter
from icar_lab.tune.data import training_targets
from icar_lab.tune.request import HEADS_FILE, SUMMARY_FILE, TuneRequest, checkpoint_dir, default_exit_depths
from pipeline.config import ModelConfig
from pipeline.encode.heads import ExitHeads
from pipeline.encode.model import LoadedModel, load_model
from pipeline.encode.towers import refuse_unsupported


def log_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def training_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _stage_settings(request: TuneRequest, depth: int) -> tuple[HeadSettings, TailSettings]:
    """The lab's head and tail settings with the request's depths, epochs and seed; the heads also learn
    on the tokens each tuned schedule leaves, so exit routes that merge stay calibrated."""
    epochs = {"epochs": request.epochs} if request.epochs else {}
    reduced = [merge_schedule(name, tuned=False) for name in request.schedules]
    depths = request.depths or default_exit_depths(depth)
    heads = HeadSettings(depths=depths, seed=request.seed, reduced_routes=reduced, **epochs)
    tails = TailSettings(tail_blocks=request.tail_blocks or depth // 2, seed=request.seed, **epochs)
    return heads, tails


def _load(request: TuneRequest) -> tuple[LoadedModel, ModelConfig]:
    model_cfg = ModelConfig(name=request.model, pretrained=request.pretrained)
    loaded = load_model(model_cfg)
    refuse_unsupported(loaded.model.visual, request.model)
    loaded.model.requires_grad_(False)
    return loaded, model_cfg


def tune(request: TuneRequest, log=log_stderr) -> dict:
    """Run `request`; returns the summary also written to DIR/tune.json."""
    checkpoints = checkpoint_dir(request)
    torch.set_num_threads(request.cpus)
    loaded, model_cfg = _load(request)
    visual = loaded.model.visual
    head_settings, tail_settings = _stage_settings(request, len(visual.transformer.resblocks))
    heads = ExitHeads(visual, head_settings.depths)  # on the CPU: the fingerprint reads the weights
    device = training_device()
    loaded.model.to(device)
    heads.to(device)
    precision = Precision.for_device(device)
    meter = CostMeter(device)
    with meter.stage("targets"):
        train, held = training_targets(loaded, request, log)
    with meter.stage("heads"):
        fitting = Fitting(held, checkpoints / "heads.pt", precision)
        stages = {"heads": fit_heads(loaded, heads, head_settings, train, log, fitting)}
    for name in request.schedules:
        with meter.stage(f"tail {name}"):
            fitting = Fitting(held, checkpoints / f"tail-{name}.pt", precision)
            stages[name] = train_tail(loaded, heads, merge_schedule(name), tail_settings, train, log, fitting)
    heads.cpu()
    heads_path = output_path(request.out_dir / HEADS_FILE)
    heads.save(heads_path, model_cfg.model_id)
    summary = {
        "request": request.recorded(),
        "model_id": model_cfg.model_id,
        "heads_file": str(heads_path),
        "precision": precision.name,
        "depths": head_settings.depths,
        "tail_blocks": tail_settings.tail_blocks,
        "stages": stages,
        "cost": meter.report(heads, visual, len(train) + len(held), train.nbytes() + held.nbytes()),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    (request.out_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, default=float) + "\n")
    return summary
