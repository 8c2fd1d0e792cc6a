"""The Ray layer of `icar tune`: the whole tune runs as one Ray task, with one GPU where the cluster has
GPUs, else `request.cpus` CPUs. The driver sends the request (names and numbers) and gets the summary
back; the worker reads the shards itself, so images never pass through the driver.

Why a task and not Ray Train's `TorchTrainer`: the backbone is frozen, so the work is one frozen forward
per image and schedule (its tokens are cached) plus steps on small heads and tails; one GPU holds it, and
data-parallel workers would mostly add gradient traffic. `TorchTrainer` brings its own checkpoint store
(`train.report`, a run storage path) and DDP wrapping, while the tune's checkpoints are files in its
output directory that a rerun with --resume continues from. Spreading the schedules' tails over several
GPUs (one task each, after the heads) is the step up when one GPU is too slow.
"""

from __future__ import annotations

import ray
from ray.exceptions import RayTaskError

from icar_lab.tune.request import TuneRequest
from icar_lab.tune.run import tune
from pipeline.config import ConfigError

# what the worker raises for a request it cannot serve: shown to the user as a config error
_REQUEST_ERRORS = (ConfigError, NotImplementedError, FileNotFoundError, ValueError)


def tune_on_ray(request: TuneRequest) -> dict:
    """Run `request` on the connected Ray cluster; returns the tune's summary. Not retried: a rerun with
    --resume continues from the last finished epoch."""
    gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
    task = ray.remote(tune).options(num_cpus=request.cpus, num_gpus=gpus, max_retries=0)
    try:
        return ray.get(task.remote(request))
    except RayTaskError as exc:
        if isinstance(exc.cause, _REQUEST_ERRORS):
            raise ConfigError(f"tune {request.model}: {exc.cause}") from None
        raise
