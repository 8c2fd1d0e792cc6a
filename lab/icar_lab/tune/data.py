"""The user's images as training targets: read with the job's own reader and decoder at the model's own
preprocess, so the heads and tails learn on exactly the pixels `icar index` will feed them. Captions are
optional: a row without one is distilled only."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from icar_lab.calibrate import fit_test_split
from icar_lab.sample import CaptionedSample, read_captioned
from icar_lab.scenes.splits import refuse_test
from icar_lab.training.targets import Targets, targets_of
from icar_lab.tune.request import TuneRequest
from pipeline.config import ConfigError, DecodeConfig, InputConfig
from pipeline.encode.model import LoadedModel

MIN_IMAGES = 10  # at least one held-out row, and batches worth a step


def read_images(loaded: LoadedModel, request: TuneRequest) -> CaptionedSample:
    """The first `request.images` usable rows of the input shards, captioned or not."""
    sample = read_captioned(
        request.inputs,
        loaded.preprocess,
        request.images,
        InputConfig(**request.input_cfg),
        DecodeConfig(**request.decode_cfg),
        require_caption=False,
    )
    refuse_test(sample.splits, "tune")
    if len(sample) < MIN_IMAGES:
        raise ConfigError(
            f"{len(sample)} usable images in {request.inputs} (skipped: {sample.skipped}); "
            f"a tune needs at least {MIN_IMAGES}"
        )
    return sample


def _subset(loaded: LoadedModel, sample: CaptionedSample, rows: np.ndarray, log) -> Targets:
    captions, keys = [sample.captions[i] for i in rows], [sample.keys[i] for i in rows]
    return targets_of(loaded, sample.images[rows], captions, keys, log)


def training_targets(
    loaded: LoadedModel, request: TuneRequest, log: Callable[[str], None]
) -> tuple[Targets, Targets]:
    """(training, held-out) targets: a random `heldout_share` of the rows (at least one) is kept apart to
    choose each stage's epoch by."""
    sample = read_images(loaded, request)
    share = max(request.heldout_share, 1 / len(sample))
    train, held = fit_test_split(len(sample), request.seed, share)
    captioned = sum(bool(c.strip()) for c in sample.captions)
    log(f"{len(sample)} images ({captioned} captioned): {len(train)} to train on, {len(held)} held out")
    return _subset(loaded, sample, train, log), _subset(loaded, sample, held, log)
