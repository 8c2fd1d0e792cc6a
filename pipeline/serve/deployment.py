"""The search API as a Ray Serve application (infra/rayservice.yaml): `pipeline.serve.deployment:app`.

Each replica builds the same FastAPI app `icar serve` runs, from the config file named by ICAR_CONFIG,
so the model loads once per replica and nothing unpicklable crosses Ray. The app's guard runs in the
replica, so Serve's proxy sees the same refusals; a replica always needs a token ($ICAR_SERVE_TOKEN), since
the address its proxy binds is not its to know."""

from __future__ import annotations

import os

from ray import serve

from pipeline.config import load_config
from pipeline.serve.app import create_app


def build_api():
    """Called in each replica (Serve's ingress builder): the app for the configured table."""
    return create_app(load_config(os.environ.get("ICAR_CONFIG")), token_required=True)


# Serve sends a replica at most max_ongoing_requests at once (its default, 5, would queue a flood in the
# proxy unseen): above serve.max_concurrent_requests' 16, the guard answers the excess 503 itself, and
# past max_queued_requests the proxy answers 503 too.
@serve.deployment(ray_actor_options={"num_cpus": 1}, max_ongoing_requests=32, max_queued_requests=64)
@serve.ingress(build_api)
class SearchAPI:
    """The ingress deployment: every route comes from `build_api`'s app."""


app = SearchAPI.bind()
