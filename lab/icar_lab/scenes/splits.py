"""The scene streams and what each one may be used for.

Every scene is a pure function of (seed, stream, index), and streams are drawn from independent random
generators, so streams are disjoint samples of the same distribution. Four streams, three roles:

- train: `train` (the CLIP model) and `heads` (the exit heads) -- fitted on;
- calib: choosing anything -- checkpoints, routes, thresholds, scorers, margins;
- test: reporting only -- the frontier, the bench, the headroom and every quality number in the README.

A number chosen on calib and reported on test is a result; one reported on the data it was chosen on is
not. Calibration refuses rows of a test stream (scene shards carry a `split` column for that), and a
test enforces it. A stream may name a scene mix after its role: `test-bimodal` is test data drawn from
the bimodal mix (scenes/render.py).
"""

from __future__ import annotations

from pipeline.config import ConfigError

TRAIN = "train"
HEADS = "heads"
CALIB = "calib"
TEST = "test"
SPLIT_COLUMN = "split"  # scene shards' column naming the stream a row was drawn from


class ReportingSplitRead(ConfigError):
    """Something that chooses (calibration, training) was handed rows of the test stream."""


def role(split: str) -> str:
    """The role of a stream: its name up to the first '-' (`test-bimodal` is a test stream)."""
    return split.split("-", 1)[0]


def refuse_test(splits: list[str] | set[str], what: str) -> None:
    """Raise if `what` (a step that chooses) would read a test stream."""
    if any(role(s) == TEST for s in splits):
        raise ReportingSplitRead(
            f"{what} read rows of the {TEST!r} scene split, which is kept for reporting only: "
            f"calibrate on the {CALIB!r} split (python jobs/make_corpus.py --split {CALIB} ...)"
        )
