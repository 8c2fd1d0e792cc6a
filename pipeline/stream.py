"""The Ray graph of the job: row groups into written parts — decode/score on CPU, encode and write on an
actor pool — plus what Ray Data gave up on (`pipeline.cluster` connects to Ray)."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator

import numpy as np
import ray

from pipeline.config import IndexConfig
from pipeline.decode import Preprocess
from pipeline.encode.actor import DecodeEncodeStage, EncodeStage
from pipeline.prepare import bundle_units, prepare_unit, unbundle
from pipeline.write.fragments import FragmentTarget

PREPARE_TASK_MEMORY = 512 * 2**20  # bytes reserved per prepare task: one row group plus decoded pixels


def encoder_actors(cfg: IndexConfig) -> int:
    """The configured pool size, else as many actors as the cluster's GPUs (or CPUs) can hold."""
    if cfg.encoder.actors is not None:
        return cfg.encoder.actors
    resources = ray.cluster_resources()
    if cfg.encoder.gpus_per_actor > 0:
        return max(1, int(resources.get("GPU", 0) / cfg.encoder.gpus_per_actor))
    return max(1, int(resources.get("CPU", 1) / cfg.encoder.cpus_per_actor))


def stream(
    work: list[dict], rows: list[float], cfg: IndexConfig, preprocess: Preprocess, target: FragmentTarget
) -> ray.data.Dataset:
    """Row groups (`work`, `rows` each) -> written parts (`write.fragments`), bundled into Ray tasks of
    about `ray.task_rows` rows (`prepare.bundle_units`), with resources declared where each stage is.

    GPU encoders: decode/score run on CPU tasks of their own (a memory reservation of its own keeps Ray
    from fusing them into the GPU actors), so the GPUs never wait on JPEG decoding. CPU encoders: the
    stages share the same cores anyway, so one actor per core decodes, scores and encodes its own rows.

    A process that dies under a batch (a decoder segfault on one image, an OOM kill, its node lost) is
    restarted and the batch retried at most `encoder.max_restarts` times, never forever (Ray Data's
    default for actor pools); past that, Ray Data drops the batch and goes on (`max_errored_blocks=-1`),
    and `index_pending` fails the shards whose rows never came back. The actor process itself is always
    restarted: Ray 2.60 never replaces a pool actor that is dead for good, so a bounded actor would shrink
    the pool and, once every actor is gone, stall the job (ray-project/ray#62746). The tasks queued on an
    actor die with it and spend a retry each, so a CPU actor (row groups in, no pixels to prefetch) takes
    one task at a time; a GPU actor keeps Ray Data's two, the next batch's pixels travelling meanwhile."""
    actors = encoder_actors(cfg)
    bundles = bundle_units(work, rows, cfg.ray.task_rows, actors)
    units = ray.data.from_items(bundles, override_num_blocks=len(bundles))
    pool_size = min(actors, len(bundles))  # never more actors than tasks: an idle one costs a model load
    plan = (
        _decode_and_encode_on_actors if cfg.encoder.gpus_per_actor == 0 else _decode_on_tasks_encode_on_actors
    )
    # Ray 2.60 deprecates passing actor options as keyword arguments but has no named parameter for these
    # two (ray-project/ray#65227 names the ones it adds): the warning is for Ray 2.64, not for the user.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "`ray_remote_args` is deprecated", DeprecationWarning)
        dataset = plan(units, cfg, preprocess, target, pool_size)
    dataset.context.max_errored_blocks = -1
    return dataset


def _encoder_pool(cfg: IndexConfig, size: int, cpu_plan: bool) -> dict:
    """The encoder actors' pool of `size` and their options (see `stream` for the restarts and retries)."""
    return {
        "compute": ray.data.ActorPoolStrategy(
            size=size, max_tasks_in_flight_per_actor=1 if cpu_plan else None
        ),
        "num_cpus": cfg.encoder.cpus_per_actor,
        "max_restarts": -1,
        "max_task_retries": cfg.encoder.max_restarts,
    }


def _decode_and_encode_on_actors(
    units: ray.data.Dataset, cfg: IndexConfig, preprocess: Preprocess, target: FragmentTarget, size: int
) -> ray.data.Dataset:
    """CPU plan: each actor decodes, scores, encodes and writes its own bundles."""
    return units.map_batches(
        DecodeEncodeStage,
        fn_constructor_kwargs={"cfg": cfg.model_dump(), "target": target, "preprocess": preprocess},
        batch_size=1,
        **_encoder_pool(cfg, size, cpu_plan=True),
    )


def _decode_on_tasks_encode_on_actors(
    units: ray.data.Dataset, cfg: IndexConfig, preprocess: Preprocess, target: FragmentTarget, size: int
) -> ray.data.Dataset:
    """GPU plan: CPU tasks decode and score, GPU actors encode and write."""
    cfg_dict = cfg.model_dump()
    return units.map_batches(
        prepare_bundle,
        batch_size=1,
        fn_kwargs={"cfg": cfg_dict, "preprocess": preprocess},
        num_cpus=cfg.ray.decode_cpus,
        memory=PREPARE_TASK_MEMORY,
        max_retries=cfg.encoder.max_restarts,  # the decoding happens here on this plan: the same bound
    ).map_batches(
        EncodeStage,
        fn_constructor_kwargs={"cfg": cfg_dict, "target": target},
        batch_size=cfg.encoder.batch_size,
        num_gpus=cfg.encoder.gpus_per_actor,
        **_encoder_pool(cfg, size, cpu_plan=False),
    )


def prepare_bundle(items: dict[str, np.ndarray], cfg: dict, preprocess: Preprocess) -> Iterator[dict]:
    """GPU plans' CPU stage: a bundle of row groups in, prepared chunks out (`prepare.prepare_unit`)."""
    yield from prepare_unit(unbundle(items), cfg, preprocess)


class DroppedBatches(logging.Handler):
    """What Ray Data gave up on while streaming: the error of each batch it dropped (it logs each one,
    with its exception, under `max_errored_blocks=-1`), or the error that stopped the stream."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.errors: list[BaseException] = []
        self.stopped: BaseException | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info and record.exc_info[1] is not None:
            self.errors.append(record.exc_info[1])

    def __enter__(self) -> DroppedBatches:
        logging.getLogger("ray.data").addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        logging.getLogger("ray.data").removeHandler(self)

    def next(self, batches: Iterator[dict[str, np.ndarray]]) -> dict[str, np.ndarray] | None:
        """The stream's next batch; None at its end, or when it failed (the error is kept, the job goes
        on to fail the shards it left incomplete: the writer's own errors are not caught here)."""
        try:
            return next(batches)
        except StopIteration:
            return None
        except Exception as exc:  # noqa: BLE001 - whatever stopped Ray, the shards it left fail
            self.stopped = exc
            return None

    def reason(self, cfg: IndexConfig) -> str:
        def short(exc: BaseException) -> str:
            first = (str(exc).strip().splitlines() or [""])[0]
            return f"{type(exc).__name__}: {first[:300]}"

        if self.stopped is not None:
            return f"the stream stopped ({short(self.stopped)})"
        errors = "; ".join(list(dict.fromkeys(short(e) for e in self.errors))[:3]) or "no error reported"
        n = cfg.encoder.max_restarts
        for died, who in (
            (ray.exceptions.RayActorError, "the encoder actor"),
            (ray.exceptions.WorkerCrashedError, "the worker decoding it"),  # the GPU plan's CPU tasks
        ):
            if any(isinstance(e, died) for e in self.errors):
                return f"{who} died {n + 1} times on a batch (encoder.max_restarts={n}): {errors}"
        return f"Ray Data dropped a batch: {errors}"
