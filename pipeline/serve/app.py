"""The HTTP search API and page: FastAPI over one `Searcher` (the model loads once per process).

Queries are a text, an uploaded image (raw bytes in the body), the id of a row already in the table
("more like this") or a raw vector. Image URLs are not fetched server-side: a URL would let any client
make the server reach any host. Filters are structured fields (`filters.Filters`), never filter text.
Every error is a JSON `{"error": ...}` with a 4xx status, or a 500 that names no path and holds no trace.
The guard (guard.py) wraps it all: Host, token, body size, concurrency and time, checked before any route.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated
from urllib.parse import quote

import numpy as np
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from pipeline.config import IndexConfig, ServeConfig
from pipeline.decode import DecodeError
from pipeline.query import Searcher, SearchMode
from pipeline.serve.filters import Filters
from pipeline.serve.guard import Guard, serve_token, timed_out
from pipeline.serve.metrics import Metrics

if TYPE_CHECKING:
    import torch

STATIC = Path(__file__).resolve().parent / "static"
log = logging.getLogger("icar.serve")


class SearchRequest(BaseModel):
    """One query: exactly one of `text`, `id`, `vector`; a text is matched by meaning, words or both."""

    model_config = ConfigDict(extra="forbid")

    text: str | None = Field(None, min_length=1, max_length=1000)
    id: str | None = Field(None, min_length=1, max_length=4096, description="search like this row")
    vector: list[float] | None = Field(None, min_length=1, max_length=8192)
    image_url: str | None = Field(None, description="refused: URLs are not fetched server-side")
    k: int = Field(10, ge=1)
    offset: int = Field(0, ge=0)
    dedup: bool = False
    filters: Filters = Field(default_factory=Filters)
    mode: SearchMode = Field(
        "vector",
        description="vector: by embedding; text: BM25 over the captions' full-text index; hybrid: both, "
        "fused by reciprocal rank. text and hybrid need `text`",
    )

    @model_validator(mode="after")
    def _one_query(self) -> SearchRequest:
        if self.image_url is not None:
            raise ValueError(
                "image URLs are not fetched server-side; download the image and POST its bytes to "
                "/api/search/image"
            )
        given = [name for name in ("text", "id", "vector") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of text, id or vector (got {', '.join(given) or 'none'})")
        if self.mode != "vector" and self.text is None:
            raise ValueError(f"mode {self.mode!r} searches caption words, so it needs `text`")
        if self.vector is not None and not all(math.isfinite(v) for v in self.vector):
            raise ValueError("vector must hold finite numbers only")
        return self


def _result(row: dict) -> dict:
    row["thumbnail"] = f"/api/thumbnails/{quote(row['id'], safe='')}"
    return row


def _error(status: int, message: str, **extra) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status)


def _validation_details(errors: list[dict]) -> list[dict]:
    """Pydantic's errors without the offending input echoed back (it may be huge, or a secret)."""
    return [
        {"field": ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "request", "message": e["msg"]}
        for e in errors
    ]


def create_app(cfg: IndexConfig, searcher: Searcher | None = None, token_required: bool = False) -> FastAPI:
    """The API and page for `cfg.output`'s table, behind the guard; `searcher` defaults to one opened on
    `cfg`. A token is required always with `token_required` (a Ray Serve replica), else when `serve.host`
    is not loopback: without one this raises ConfigError before the model loads."""
    token = serve_token(cfg.serve, None if token_required else cfg.serve.host)
    searcher = searcher or Searcher.open(cfg, refresh_seconds=cfg.serve.refresh_seconds)
    searcher.check_model()
    metrics = Metrics()
    app = FastAPI(title="icar search", docs_url="/api/docs", redoc_url=None, openapi_url="/api/openapi.json")
    app.state.searcher = searcher
    _measure(app, metrics)
    _json_errors(app)
    _search_routes(app, searcher, cfg.serve)
    _table_routes(app, searcher, cfg, metrics)
    upload_limits = {"/api/search/image": cfg.serve.max_upload_bytes}
    app.add_middleware(
        Guard, serve=cfg.serve, token=token, body_limits=upload_limits, on_refusal=metrics.refused
    )
    return app


def _measure(app: FastAPI, metrics: Metrics) -> None:
    """Every request answered by a route (or the router's 404) counted and timed by route and status."""

    @app.middleware("http")
    async def measure(request: Request, call_next):
        started = time.perf_counter()
        status = 500
        try:
            response = await call_next(request)
            status = response.status_code
            return response
        finally:
            if not timed_out(request.scope):  # the guard answered 503 and counted it as a refusal
                route = request.scope.get("route")
                metrics.observe(getattr(route, "path", "unmatched"), status, time.perf_counter() - started)


def _json_errors(app: FastAPI) -> None:
    """Every error a JSON `{"error": ...}`; a 500 names nothing and its trace stays in the server's log."""

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        return _error(422, "invalid request", details=_validation_details(exc.errors()))

    @app.exception_handler(StarletteHTTPException)  # ours, and the router's own 404 / 405
    async def http(request: Request, exc: StarletteHTTPException):
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception):
        log.exception("internal error on %s", request.url.path)
        return _error(500, "internal error")


def _search_routes(app: FastAPI, searcher: Searcher, limits: ServeConfig) -> None:
    """POST /api/search (text, id or vector as JSON) and POST /api/search/image (the image's bytes)."""

    @app.post("/api/search")
    def search(request: SearchRequest):
        _check_page(request.k, request.offset, limits)
        kind, query = _query_of(searcher, request)
        return _answer(searcher, kind, request.k, request.offset, request.dedup, request.filters, **query)

    @app.post("/api/search/image")
    async def search_image(
        request: Request,
        k: Annotated[int, Query(ge=1)] = 10,
        offset: Annotated[int, Query(ge=0)] = 0,
        dedup: bool = False,
        filters: Annotated[str | None, Query(max_length=8192, description="Filters as JSON")] = None,
    ):
        """The image's bytes are the request body (any Content-Type); the guard caps it at
        serve.max_upload_bytes."""
        _check_page(k, offset, limits)
        try:
            parsed = Filters.model_validate_json(filters) if filters else Filters()
        except ValidationError as exc:
            return _error(422, "invalid filters", details=_validation_details(exc.errors()))
        vector = await _embed_upload(searcher, request, limits)
        return await run_in_threadpool(_answer, searcher, "image", k, offset, dedup, parsed, vector=vector)


def _check_page(k: int, offset: int, limits: ServeConfig) -> None:
    if k + offset > limits.max_k:
        raise HTTPException(422, f"k + offset must be at most {limits.max_k}")


def _query_of(searcher: Searcher, request: SearchRequest) -> tuple[str, dict]:
    """The request's kind and what `Searcher.search` needs for it: a vector, a text and mode, or both."""
    if request.text is not None:
        vector = searcher.embed_text([request.text]) if request.mode != "text" else None
        return "text", {"vector": vector, "text": request.text, "mode": request.mode}
    if request.id is not None:
        vector = searcher.vector_of(request.id)
        if vector is None:
            raise HTTPException(404, "no row has that id")
        return "id", {"vector": vector, "exclude": request.id}
    vector = np.asarray(request.vector, np.float32)
    if len(vector) != searcher.dim:
        raise HTTPException(422, f"vector must have {searcher.dim} dimensions, got {len(vector)}")
    return "vector", {"vector": vector}


async def _embed_upload(searcher: Searcher, request: Request, limits: ServeConfig) -> torch.Tensor:
    """The embedding of the image in the request's body, computed off the event loop: decoding and the
    forward pass take milliseconds of CPU."""
    body = await request.body()
    if not body:
        raise HTTPException(400, "the request body must hold the image's bytes")
    try:
        return await run_in_threadpool(searcher.embed_image_bytes, body, limits.max_query_pixels)
    except DecodeError as exc:
        raise HTTPException(400, f"not a usable image: {exc}") from None


def _answer(
    searcher: Searcher, kind: str, k: int, offset: int, dedup: bool, filters: Filters, **query
) -> dict:
    """Search (`query`: the vector, and exclude, text or mode where given) and answer."""
    started = time.perf_counter()
    where, words = filters.where(), filters.caption_contains
    rows = searcher.search(k=k, where=where, offset=offset, dedup=dedup, caption_words=words, **query)
    return {
        "query": kind,
        "k": k,
        "offset": offset,
        "results": [_result(r) for r in rows],
        "took_ms": round(1e3 * (time.perf_counter() - started), 2),
    }


def _table_routes(app: FastAPI, searcher: Searcher, cfg: IndexConfig, metrics: Metrics) -> None:
    """Thumbnails, health, metrics and the page."""

    @app.get("/api/thumbnails/{row_id:path}")
    def thumbnail(row_id: str):
        data = searcher.thumbnail(row_id)
        if not data:
            raise HTTPException(404, "no thumbnail for that id")
        return Response(data, media_type="image/webp", headers={"Cache-Control": "private, max-age=86400"})

    @app.get("/healthz")
    def healthz():
        dataset = searcher.dataset
        return {
            "status": "ok",
            "table": cfg.output.table,
            "rows": dataset.count_rows(),
            "version": dataset.version,
            "model": searcher.loaded.model_id,
        }

    @app.get("/metrics")
    def prometheus():
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.get("/", include_in_schema=False)
    def page():
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
