"""The search API as a Ray Serve application (infra/rayservice.yaml): `pipeline.serve.deployment:app`.

Each replica builds the same FastAPI app `icar serve` runs, from the config file named by ICAR_CONFIG,
so the model loads once per replica and nothing unpicklable crosses Ray."""

from __future__ import annotations

import os

from ray import serve

from pipeline.config import load_config
from pipeline.serve.app import create_app


def build_api():
    """Called in each replica (Serve's ingress builder): the app for the configured table."""
    return create_app(load_config(os.environ.get("ICAR_CONFIG")))


@serve.deployment(ray_actor_options={"num_cpus": 1})
@serve.ingress(build_api)
class SearchAPI:
    """The ingress deployment: every route comes from `build_api`'s app."""


app = SearchAPI.bind()
