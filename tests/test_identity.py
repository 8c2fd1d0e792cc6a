"""The embedding identity covers what the vectors depend on: a retrained checkpoint or a retrained
learned scorer at the same path is a new identity (a reindex), never vectors of two models in one table."""

from __future__ import annotations

import json
import shutil

from pipeline.alias import Identity
from pipeline.config import IndexConfig
from pipeline.encode.model import EMBEDDED_CHECKPOINT


def _config(**sections) -> IndexConfig:
    return IndexConfig.model_validate(sections)


def test_a_checkpoint_retrained_in_place_is_a_new_identity(tmp_path):
    checkpoint = tmp_path / "model.safetensors"
    shutil.copy(EMBEDDED_CHECKPOINT, checkpoint)
    cfg = _config(
        model={"name": "icar-tiny-vit", "pretrained": str(checkpoint)}, router={"routes": [{"name": "full"}]}
    )
    before = Identity.of(cfg)
    assert before.weights_sha is not None and before == Identity.of(cfg)  # reading it twice: the same
    data = bytearray(checkpoint.read_bytes())
    data[-1] ^= 0xFF  # one byte of the weights changed, same path, same model id
    checkpoint.write_bytes(bytes(data))
    after = Identity.of(cfg)
    assert after.model_id == before.model_id
    assert after.digest != before.digest and "weights" in after.describe()


def test_the_embedded_model_is_identified_by_its_shipped_checkpoint_contents():
    identity = Identity.of(_config(router={"routes": [{"name": "full"}]}))
    assert identity.weights_sha is not None


def test_a_learned_scorer_retrained_in_place_is_a_new_identity(tmp_path):
    scorer = tmp_path / "scorer.json"
    params = {"mean": [0.0] * 4, "std": [1.0] * 4, "weights": [0.1, 0.2, 0.3, 0.4], "bias": 0.0}
    scorer.write_text(json.dumps(params))
    router = {"scorer": str(scorer), "thresholds": [0.5], "routes": [{"name": "full"}, {"name": "full2"}]}
    cfg = _config(router=router)
    before = Identity.of(cfg)
    scorer.write_text(json.dumps(params | {"bias": 0.5}))
    assert Identity.of(cfg).router_sha != before.router_sha


def test_a_pretrained_tag_is_its_own_identity_and_reads_no_file():
    cfg = _config(model={"name": "ViT-B-32", "pretrained": "openai"}, router={"routes": [{"name": "full"}]})
    identity = Identity.of(cfg)
    assert identity.weights_sha is None and identity.model_id == "ViT-B-32:openai"
