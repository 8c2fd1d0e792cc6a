"""The scene streams: which role each plays, that choosing steps refuse the test role, that scene shards
name their stream, and that the bimodal mix draws only from the two ends of complexity."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from icar_lab.heldout import load_heldout
from icar_lab.scenes.shards import write_corpus
from icar_lab.scenes.splits import CALIB, SPLIT_COLUMN, TEST, ReportingSplitRead, refuse_test, role


def test_roles_and_the_refusal():
    assert role("test-bimodal") == TEST and role(CALIB) == CALIB and role("calib-bimodal") == CALIB
    refuse_test({CALIB, "calib-bimodal", "train", "fixture"}, "calibration")
    for streams in ({TEST}, {CALIB, "test-bimodal"}):
        with pytest.raises(ReportingSplitRead, match="kept for reporting only"):
            refuse_test(streams, "calibration")


def test_scene_shards_name_their_stream(tmp_path):
    (path,) = write_corpus(tmp_path, seed=0, split="calib-bimodal", num_images=6, shard_size=6)
    assert set(pq.read_table(path).column(SPLIT_COLUMN).to_pylist()) == {"calib-bimodal"}


def test_the_bimodal_mix_has_only_simple_and_cluttered_scenes():
    plain = load_heldout(CALIB, 200, 64)
    bimodal = load_heldout(f"{CALIB}-bimodal", 200, 64)
    assert set(plain.complexity_level) == {"low", "medium", "high"}
    assert set(bimodal.complexity_level) == {"low", "high"} and bimodal.split == "calib-bimodal"
    low = bimodal.complexity_level == "low"
    assert set(bimodal.background[low]) <= {"plain", "gradient"} and (bimodal.object_count[low] == 1).all()
    assert (
        set(bimodal.background[~low]) <= {"checkerboard", "noise"} and (bimodal.object_count[~low] >= 6).all()
    )
    assert 0.35 < low.mean() < 0.65
