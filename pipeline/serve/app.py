"""The HTTP search API and page: FastAPI over one `Searcher` (the model loads once per process).

Queries are a text, an uploaded image (raw bytes in the body), the id of a row already in the table
("more like this") or a raw vector. Image URLs are not fetched server-side: a URL would let any client
make the server reach any host. Filters are structured fields (`filters.Filters`), never filter text.
Every error is a JSON `{"error": ...}` with a 4xx status, or a 500 that names no path and holds no trace.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Annotated
from urllib.parse import quote

import numpy as np
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from pipeline.config import IndexConfig
from pipeline.decode import DecodeError
from pipeline.query import Searcher
from pipeline.serve.filters import Filters
from pipeline.serve.metrics import Metrics

STATIC = Path(__file__).resolve().parent / "static"
log = logging.getLogger("icar.serve")


class SearchRequest(BaseModel):
    """One query: exactly one of `text`, `id`, `vector`."""

    model_config = ConfigDict(extra="forbid")

    text: str | None = Field(None, min_length=1, max_length=1000)
    id: str | None = Field(None, min_length=1, max_length=4096, description="search like this row")
    vector: list[float] | None = Field(None, min_length=1, max_length=8192)
    image_url: str | None = Field(None, description="refused: URLs are not fetched server-side")
    k: int = Field(10, ge=1)
    offset: int = Field(0, ge=0)
    dedup: bool = False
    filters: Filters = Field(default_factory=Filters)

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


def create_app(cfg: IndexConfig, searcher: Searcher | None = None) -> FastAPI:
    """The API and page for `cfg.output`'s table; `searcher` defaults to one opened on `cfg`."""
    searcher = searcher or Searcher.open(cfg, refresh_seconds=cfg.serve.refresh_seconds)
    searcher.check_model()
    limits = cfg.serve
    metrics = Metrics()
    app = FastAPI(title="icar search", docs_url="/api/docs", redoc_url=None, openapi_url="/api/openapi.json")
    app.state.searcher = searcher

    @app.middleware("http")
    async def _measure(request: Request, call_next):
        started = time.perf_counter()
        status = 500
        try:
            response = await call_next(request)
            status = response.status_code
            return response
        finally:
            route = request.scope.get("route")
            metrics.observe(getattr(route, "path", "unmatched"), status, time.perf_counter() - started)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        return _error(422, "invalid request", details=_validation_details(exc.errors()))

    @app.exception_handler(StarletteHTTPException)  # ours, and the router's own 404 / 405
    async def _http(request: Request, exc: StarletteHTTPException):
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        log.exception("internal error on %s", request.url.path)  # the trace stays in the server's log
        return _error(500, "internal error")

    def _check_page(k: int, offset: int) -> None:
        if k + offset > limits.max_k:
            raise HTTPException(422, f"k + offset must be at most {limits.max_k}")

    def _respond(kind: str, vector, k: int, offset: int, dedup: bool, filters: Filters, exclude=None):
        started = time.perf_counter()
        rows = searcher.search(vector, k, filters.where(), offset, dedup, exclude)
        return {
            "query": kind,
            "k": k,
            "offset": offset,
            "results": [_result(r) for r in rows],
            "took_ms": round(1e3 * (time.perf_counter() - started), 2),
        }

    @app.post("/api/search")
    def search(request: SearchRequest):
        _check_page(request.k, request.offset)
        exclude = None
        if request.text is not None:
            vector = searcher.embed_text([request.text])
        elif request.id is not None:
            vector, exclude = searcher.vector_of(request.id), request.id
            if vector is None:
                raise HTTPException(404, "no row has that id")
        else:
            vector = np.asarray(request.vector, np.float32)
            if len(vector) != searcher.dim:
                raise HTTPException(422, f"vector must have {searcher.dim} dimensions, got {len(vector)}")
        kind = "text" if request.text is not None else "id" if request.id is not None else "vector"
        return _respond(kind, vector, request.k, request.offset, request.dedup, request.filters, exclude)

    @app.post("/api/search/image")
    async def search_image(
        request: Request,
        k: Annotated[int, Query(ge=1)] = 10,
        offset: Annotated[int, Query(ge=0)] = 0,
        dedup: bool = False,
        filters: Annotated[str | None, Query(max_length=8192, description="Filters as JSON")] = None,
    ):
        """The image's bytes are the request body (any Content-Type); at most serve.max_upload_bytes."""
        _check_page(k, offset)
        try:
            parsed = Filters.model_validate_json(filters) if filters else Filters()
        except ValidationError as exc:
            return _error(422, "invalid filters", details=_validation_details(exc.errors()))
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limits.max_upload_bytes:
            raise HTTPException(413, f"image larger than {limits.max_upload_bytes} bytes")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limits.max_upload_bytes:
                raise HTTPException(413, f"image larger than {limits.max_upload_bytes} bytes")
        if not body:
            raise HTTPException(400, "the request body must hold the image's bytes")
        try:  # off the event loop: decoding and the forward pass take milliseconds of CPU
            vector = await run_in_threadpool(searcher.embed_image_bytes, bytes(body), limits.max_query_pixels)
        except DecodeError as exc:
            raise HTTPException(400, f"not a usable image: {exc}") from None
        return await run_in_threadpool(_respond, "image", vector, k, offset, dedup, parsed)

    @app.get("/api/thumbnails/{row_id:path}")
    def thumbnail(row_id: str):
        data = searcher.thumbnail(row_id)
        if not data:
            raise HTTPException(404, "no thumbnail for that id")
        return Response(data, media_type="image/webp", headers={"Cache-Control": "public, max-age=86400"})

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
    return app
