"""The deployment files say what the README says: parseable, valid for the pinned KubeRay CRDs, and the
nightly run cannot clobber another."""

from __future__ import annotations

import copy
import functools
import re
from pathlib import Path

import yaml
from jsonschema import Draft4Validator

from pipeline.config import load_config

INFRA = Path(__file__).resolve().parent.parent / "infra"
(CRDS,) = (INFRA / "crds").glob("kuberay-*")  # exactly one pinned KubeRay version is vendored
LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are 4 MB of YAML
REINDEX = "python jobs/reindex.py --config /config/index.yaml"


def _docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((INFRA / name).read_text()) if d]


def _strict(schema: dict) -> dict:
    """Make a CRD's structural schema check what the API server would, in place.

    - Unknown fields are errors: the API server silently prunes them, so a typo (`backofLimit`) would be
      dropped and the default used. Every object schema with `properties` and no
      `x-kubernetes-preserve-unknown-fields` gets `additionalProperties: false`.
    - A required field with a `default` is not required: the API server defaults before it validates.
    - `x-kubernetes-int-or-string` accepts both (controller-gen already spells it as anyOf; ensured here),
      `nullable` accepts null. CEL rules (`x-kubernetes-validations`) and formats are not checked.
    """
    if schema.get("x-kubernetes-int-or-string"):
        schema.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if schema.get("nullable") and isinstance(schema.get("type"), str):
        schema["type"] = [schema["type"], "null"]
    props = schema.get("properties")
    if props is not None:
        required = [name for name in schema.get("required", []) if "default" not in props.get(name, {})]
        schema.pop("required", None)
        if required:
            schema["required"] = required
        if not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema.setdefault("additionalProperties", False)
        for sub in props.values():
            _strict(sub)
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            _strict(schema[key])
    for key in ("anyOf", "allOf", "oneOf"):
        for sub in schema.get(key, []):
            _strict(sub)
    return schema


@functools.cache
def _crd_schemas() -> dict[tuple[str, str], dict]:
    """(apiVersion, kind) -> the strict openAPIV3Schema of each served, non-deprecated CRD version."""
    schemas = {}
    for path in sorted(CRDS.glob("*.yaml")):
        crd = yaml.load(path.read_text(), Loader=LOADER)
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            if version.get("served") and not version.get("deprecated"):
                schemas[f"{group}/{version['name']}", kind] = _strict(version["schema"]["openAPIV3Schema"])
    return schemas


def _schema_errors(doc: dict) -> list[str]:
    schema = _crd_schemas()[doc["apiVersion"], doc["kind"]]
    errors = Draft4Validator(schema).iter_errors(doc)
    return sorted(f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors)


def _kuberay_docs() -> list[tuple[str, dict]]:
    return [
        (path.name, doc)
        for path in sorted(INFRA.glob("*.yaml"))
        for doc in _docs(path.name)
        if doc.get("apiVersion", "").startswith("ray.io/")
    ]


def _nightly_rayjob(script: str) -> dict:
    """The RayJob the nightly CronJob's script creates: infra/rayjob.yaml through the script's own sed."""
    name_pattern = re.search(r'-e "s/(.+?)/', script).group(1)
    entry_from, entry_to = re.search(r'-e "s#(.+?)#(.+?)#"', script).groups()
    rayjob_text = (INFRA / "rayjob.yaml").read_text()
    nightly = re.sub(name_pattern, "  name: icar-nightly-20261202-0200", rayjob_text, flags=re.M)
    return yaml.safe_load(nightly.replace(entry_from, entry_to))


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


def test_every_kuberay_manifest_validates_against_the_pinned_crds():
    """What `kubectl apply` would accept, checked offline; a kind the pinned CRDs lack fails too."""
    kinds = set()
    for name, doc in _kuberay_docs():
        assert (doc["apiVersion"], doc["kind"]) in _crd_schemas(), f"{name}: no vendored CRD for it"
        assert _schema_errors(doc) == [], name
        kinds.add(doc["kind"])
    assert kinds >= {"RayJob", "RayCronJob", "RayService"}


def test_validation_rejects_a_misspelled_field_and_a_wrong_type():
    """The check above can fail: typos (which Kubernetes would silently prune) and wrong types are caught."""
    (rayjob,) = _docs("rayjob.yaml")
    bad = copy.deepcopy(rayjob)
    bad["spec"]["backofLimit"] = bad["spec"].pop("backoffLimit")
    bad["spec"]["rayClusterSpec"]["workerGroupSpecs"][1]["replica"] = 8
    bad["spec"]["ttlSecondsAfterFinished"] = "1h"
    errors = "\n".join(_schema_errors(bad))
    assert "'backofLimit' was unexpected" in errors
    assert "spec.rayClusterSpec.workerGroupSpecs.1: Additional properties" in errors and "'replica'" in errors
    assert "spec.ttlSecondsAfterFinished: '1h' is not of type 'integer'" in errors
    headless = copy.deepcopy(rayjob)
    del headless["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]
    (missing,) = _schema_errors(headless)
    assert missing == "spec.rayClusterSpec.headGroupSpec: 'template' is a required property"


def test_the_nightly_run_creates_its_own_rayjob_and_fails_when_it_fails():
    (cron,) = _docs("nightly-cronjob.yaml")
    job = cron["spec"]["jobTemplate"]["spec"]
    script = job["template"]["spec"]["containers"][0]["args"][0]
    assert "delete" not in script  # a manual run of the same manifest is never killed
    assert job["backoffLimit"] == 0 and 0 < job["activeDeadlineSeconds"] < 24 * 3600
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    # the script's sed gives the RayJob a per-night name: its pattern must match the manifest's name line
    nightly = _nightly_rayjob(script)
    assert nightly["metadata"]["name"] == "icar-nightly-20261202-0200"
    assert nightly["spec"]["entrypoint"].startswith("python jobs/reindex.py --config")
    assert "FAILED|STOPPED) " in script and "exit 1" in script


def test_the_rayjob_the_nightly_cronjob_creates_is_valid_for_the_pinned_crd():
    """The CronJob's RayJob only exists at 02:00 in the cluster; validate it here, sed applied."""
    (cron,) = _docs("nightly-cronjob.yaml")
    script = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["args"][0]
    assert _schema_errors(_nightly_rayjob(script)) == []


def _worker_limits(cluster: dict) -> list[dict]:
    """The resource limits of each worker group's Ray container."""
    return [
        group["template"]["spec"]["containers"][0]["resources"]["limits"]
        for group in cluster["workerGroupSpecs"]
    ]


def test_the_raycronjob_runs_the_reindex_once_bounded_on_cpu_and_gpu_workers():
    """No concurrency policy exists, so each run must end (deadline, no retries) and free its cluster."""
    (cron,) = _docs("nightly-raycronjob.yaml")
    assert len(cron["metadata"]["name"]) <= 36  # KubeRay appends -<unix minute> to name the RayJob
    job = cron["spec"]["jobTemplate"]
    assert job["entrypoint"] == REINDEX
    assert job["backoffLimit"] == 0 and 0 < job["activeDeadlineSeconds"] < 24 * 3600
    assert job["shutdownAfterJobFinishes"] is True and job["ttlSecondsAfterFinished"] >= 0
    cluster = job["rayClusterSpec"]
    assert cluster["authOptions"]["mode"] == "token"
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    limits = _worker_limits(cluster)
    assert any(str(lim.get("nvidia.com/gpu")) == "1" for lim in limits)  # encoders
    assert any("nvidia.com/gpu" not in lim for lim in limits)  # decode / score
    header = (INFRA / "nightly-raycronjob.yaml").read_text().split("\napiVersion:")[0]
    assert "ALPHA" in header and "RayCronJob=true" in header and "exits 3" in header
    # the header's claim: this KubeRay has no concurrencyPolicy (once one exists, use it and drop this)
    forbid = copy.deepcopy(cron)
    forbid["spec"]["concurrencyPolicy"] = "Forbid"
    (unknown,) = _schema_errors(forbid)
    assert unknown == "spec: Additional properties are not allowed ('concurrencyPolicy' was unexpected)"


def test_the_rayservice_deploys_the_search_app_with_the_jobs_index_config():
    (service,) = _docs("rayservice.yaml")
    (app,) = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]
    assert app["import_path"] == "pipeline.serve.deployment:app" and app["route_prefix"] == "/"
    assert app["runtime_env"]["env_vars"]["ICAR_CONFIG"] == "/config/index.yaml"
    cluster = service["spec"]["rayClusterConfig"]
    assert cluster["authOptions"]["mode"] == "token"
    pods = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    for pod in pods:  # a replica may land on any pod: each mounts the config and names the Serve port
        (ray,) = pod["spec"]["containers"]
        assert {"name": "config", "mountPath": "/config"} in ray["volumeMounts"]
        assert {"name": "config", "configMap": {"name": "icar-index-config"}} in pod["spec"]["volumes"]
        assert {"name": "serve", "containerPort": 8000} in ray["ports"]
        assert "readinessProbe" not in ray  # KubeRay injects one that includes the Serve proxy's health


def _secrets(pod: dict) -> set[str]:
    """The Secrets a pod's Ray container takes its whole environment from (envFrom)."""
    (ray,) = pod["spec"]["containers"]
    return {source["secretRef"]["name"] for source in ray.get("envFrom", [])}


def test_the_rayservice_takes_its_token_from_a_secret_and_reads_with_a_read_only_credential():
    """Replicas are reachable from the network: they hold the API token (never in a manifest or ConfigMap)
    and a storage credential of their own, not the one the indexing jobs write with."""
    (service,) = _docs("rayservice.yaml")
    cluster = service["spec"]["rayClusterConfig"]
    pods = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    (rayjob,) = _docs("rayjob.yaml")
    job_cluster = rayjob["spec"]["rayClusterSpec"]
    job_pods = [job_cluster["headGroupSpec"]["template"]] + [
        g["template"] for g in job_cluster["workerGroupSpecs"]
    ]
    writer = set.union(*(_secrets(pod) for pod in job_pods))
    assert writer == {"icar-s3-credentials"}
    for pod in pods:
        (ray,) = pod["spec"]["containers"]
        assert _secrets(pod) == {"icar-s3-readonly"} and not _secrets(pod) & writer
        token = {
            "name": "ICAR_SERVE_TOKEN",
            "valueFrom": {"secretKeyRef": {"name": "icar-serve-token", "key": "token"}},
        }
        assert token in ray["env"]
    assert "ICAR_SERVE_TOKEN" not in service["spec"]["serveConfigV2"]  # the token is never in the manifest
    serve = load_config(INFRA / "index-s3.yaml").serve
    assert serve.token is None  # the config is a ConfigMap: no secret in it
    assert "icar-search-serve-svc" in serve.allowed_hosts and "localhost" not in serve.allowed_hosts
