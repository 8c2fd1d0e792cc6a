"""Connecting to Ray: the configured cluster, the one a `ray job submit` set up, or a local Ray started
here. A module of its own, light to import, so that the CLI can start Ray while the job's modules
(torch, open_clip, LanceDB) import on another thread."""

from __future__ import annotations

import logging
import os

import ray

from pipeline.config import IndexConfig
from pipeline.progress import quiet_ray_data


def init_ray(cfg: IndexConfig, verbose: bool = False) -> None:
    """Connect to the configured cluster, the one a `ray job submit` set up, or start a local Ray.

    The embedded Ray keeps token authentication on (Ray's default) but starts without a dashboard and,
    unless `verbose`, without start-up chatter; a cluster's dashboard is the place to watch a big job.
    Called from the main thread: Ray's local processes die with the thread that started them."""
    if not ray.is_initialized():
        level = logging.INFO if verbose else logging.ERROR
        if cfg.ray.address:
            ray.init(address=cfg.ray.address, logging_level=level)
        elif os.environ.get("RAY_ADDRESS"):
            ray.init(logging_level=level)
        else:
            ray.init(num_cpus=cfg.ray.num_cpus, include_dashboard=verbose, logging_level=level)
    quiet_ray_data(verbose)
