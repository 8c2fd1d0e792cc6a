"""The deployment files say what the README says: parseable, and the nightly run cannot clobber another."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from pipeline.config import load_config

INFRA = Path(__file__).resolve().parent.parent / "infra"


def _docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((INFRA / name).read_text()) if d]


def test_every_manifest_parses_and_every_job_config_validates():
    configs = 0
    for path in sorted(INFRA.glob("*.yaml")):
        for doc in _docs(path.name):
            if "apiVersion" in doc:
                assert doc.get("kind") and doc["metadata"].get("name"), path
            else:
                load_config(path)  # a job config: the same validation `icar index --config` runs
                configs += 1
    assert configs >= 1


def test_the_nightly_run_creates_its_own_rayjob_and_fails_when_it_fails():
    (cron,) = _docs("nightly-cronjob.yaml")
    job = cron["spec"]["jobTemplate"]["spec"]
    script = job["template"]["spec"]["containers"][0]["args"][0]
    assert "delete" not in script  # a manual run of the same manifest is never killed
    assert job["backoffLimit"] == 0 and 0 < job["activeDeadlineSeconds"] < 24 * 3600
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    # the script's sed gives the RayJob a per-night name: its pattern must match the manifest's name line
    name_pattern = re.search(r'-e "s/(.+?)/', script).group(1)
    entry_from, entry_to = re.search(r'-e "s#(.+?)#(.+?)#"', script).groups()
    rayjob_text = (INFRA / "rayjob.yaml").read_text()
    nightly = re.sub(name_pattern, "  name: icar-nightly-20261202-0200", rayjob_text, flags=re.M)
    nightly = yaml.safe_load(nightly.replace(entry_from, entry_to))
    assert nightly["metadata"]["name"] == "icar-nightly-20261202-0200"
    assert nightly["spec"]["entrypoint"].startswith("python jobs/reindex.py --config")
    assert "FAILED|STOPPED) " in script and "exit 1" in script
