"""The guard's timeout as the app's own middleware sees it: a request answered 503 for its time is marked in
its scope, so a latency metric can leave it out (no model, no table: a route that waits on an event)."""

from __future__ import annotations

import threading
import time

from fastapi import FastAPI, Request
from fastapi.testclient import TestClient

from pipeline.config import ServeConfig
from pipeline.serve.guard import Guard, timed_out


def _measured_app(release: threading.Event) -> tuple[FastAPI, list[tuple[int, float]], list[str]]:
    """An app whose /work waits for `release`, behind a middleware that records (status, seconds) of
    each request unless the guard answered it 503 for its time; refusals by reason beside it."""
    served: list[tuple[int, float]] = []
    refused: list[str] = []
    app = FastAPI()

    @app.middleware("http")
    async def measure(request: Request, call_next):
        started, status = time.perf_counter(), 500
        try:
            response = await call_next(request)
            status = response.status_code
            return response
        finally:
            if not timed_out(request.scope):
                served.append((status, time.perf_counter() - started))

    @app.get("/work")
    def work():
        release.wait(10)
        return {"done": True}

    serve = ServeConfig(request_timeout_seconds=0.3, max_concurrent_requests=1)
    app.add_middleware(Guard, serve=serve, token=None, body_limits={}, on_refusal=refused.append)
    return app, served, refused


def test_a_request_answered_503_for_its_time_is_not_measured_as_served():
    release = threading.Event()
    app, served, refused = _measured_app(release)
    with TestClient(app, base_url="http://localhost") as client:
        response = client.get("/work")
        assert response.status_code == 503 and "too long" in response.json()["error"]
        release.set()
        deadline = time.monotonic() + 10
        while client.get("/work").status_code == 503:  # busy until the late work frees its slot
            assert time.monotonic() < deadline, "the timed-out work never freed its slot"
            time.sleep(0.05)
    assert refused[0] == "timeout" and set(refused[1:]) <= {"busy"}
    assert [status for status, _ in served] == [200]  # only the request answered in time
    assert served[0][1] < 0.3


def test_a_request_answered_in_time_is_measured_and_not_marked():
    release = threading.Event()
    release.set()
    app, served, refused = _measured_app(release)
    with TestClient(app, base_url="http://localhost") as client:
        assert client.get("/work").status_code == 200
    assert [status for status, _ in served] == [200] and refused == []
