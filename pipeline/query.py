"""Stage 6: query the vector table by text, image, id or vector, and build its ANN and scalar indexes.

The index and search settings are chosen for recall@10 >= 0.95 at a few milliseconds on a million rows
(`make bench` measures them as settings["shipped"] beside the alternatives); a user gets them by
default from `icar build-index`, `icar query` and `icar serve`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.config import IndexConfig
from pipeline.decode import decode_image
from pipeline.encode.model import LoadedModel, load_model, normalize_uint8
from pipeline.write import connect, sql_literal, table_model

RESULT_COLUMNS = ["id", "url", "caption", "shard", "complexity", "route", "exit_depth", "tokens", "gflops"]
INDEX_ROWS_PER_PARTITION = 1000  # IVF partitions of about this many rows: sqrt(rows) at a million
PQ_DIMS_PER_SUB_VECTOR = 8  # 64 sub-vectors for 512-d: PQ distances good enough to rerank few candidates
KMEANS_ITERATIONS = 10  # IVF k-means (lancedb: 50): capped so 1M-row builds fit the bench, which uses it
SEARCH = {"nprobes": 20, "refine_factor": 5}  # shipped search settings (see `make bench`)
DUPLICATE_COSINE = 0.98  # results at least this similar to a better one are near-duplicates


@dataclass
class Searcher:
    """Embeds queries with the table's own model (full depth) and searches the table.

    One table handle is kept and re-checked for new versions every `refresh_seconds`, so a long-lived
    service sees what a reindex committed without a restart, and a query never sees half a commit."""

    cfg: IndexConfig
    loaded: LoadedModel
    refresh_seconds: float = 5.0
    _table: Any = None

    @classmethod
    def open(cls, cfg: IndexConfig, refresh_seconds: float = 5.0) -> Searcher:
        return cls(cfg, load_model(cfg.model), refresh_seconds)

    @property
    def table(self):
        if self._table is None:
            db = connect(self.cfg.output, timedelta(seconds=self.refresh_seconds))
            self._table = db.open_table(self.cfg.output.table)
        return self._table

    @property
    def dim(self) -> int:
        return int(self.table.schema.field("vector").type.list_size)

    @torch.inference_mode()
    def embed_text(self, texts: list[str]) -> torch.Tensor:
        return self.loaded.model.encode_text(self.loaded.tokenizer(texts), normalize=True)

    @torch.inference_mode()
    def embed_image_bytes(self, data: bytes, max_pixels: int | None = None) -> torch.Tensor:
        """Decoded exactly as the job decodes (DecodeError with a message for anything else)."""
        pixels, _ = decode_image(data, self.loaded.preprocess, max_pixels or self.cfg.decode.max_pixels)
        x = normalize_uint8(torch.from_numpy(pixels)[None], self.loaded.mean, self.loaded.std)
        return self.loaded.model.encode_image(x, normalize=True)

    def embed_image(self, path: str | Path) -> torch.Tensor:
        return self.embed_image_bytes(Path(path).read_bytes())

    def _row(self, row_id: str, columns: list[str]) -> dict | None:
        rows = self.table.search().where(f"id = {sql_literal(row_id)}").select(columns).limit(1).to_list()
        return rows[0] if rows else None

    def vector_of(self, row_id: str) -> np.ndarray | None:
        """The stored embedding of a row ("more like this"), or None if no row has that id."""
        row = self._row(row_id, ["vector"])
        return None if row is None else np.asarray(row["vector"], np.float32)

    def thumbnail(self, row_id: str) -> bytes | None:
        row = self._row(row_id, ["thumbnail"])
        return None if row is None else row["thumbnail"]

    def search(
        self,
        vector: torch.Tensor | np.ndarray,
        k: int = 10,
        where: str | None = None,
        offset: int = 0,
        dedup: bool = False,
        exclude: str | None = None,
    ) -> list[dict]:
        """The k best rows after `offset`, best first, each with a cosine `score`.

        `where` is a Lance SQL filter applied before the vector search (callers outside this process send
        structured filters that pipeline.serve.filters compiles). `dedup` drops results that are
        near-duplicates of a better one; `exclude` drops one id (the query row of "more like this")."""
        query_vector = np.asarray(vector, np.float32).reshape(-1)
        wanted = offset + k + (exclude is not None)
        fetch = 2 * wanted if dedup else wanted
        columns = [*RESULT_COLUMNS, "_distance"] + (["vector"] if dedup else [])
        query = self.table.search(query_vector).distance_type("cosine").limit(fetch)
        query = query.nprobes(SEARCH["nprobes"]).refine_factor(SEARCH["refine_factor"])
        if where:
            query = query.where(where, prefilter=True)
        rows = [r for r in query.select(columns).to_list() if r["id"] != exclude]
        if dedup:
            rows = _drop_near_duplicates(rows)
        for row in rows:
            row["score"] = 1.0 - row.pop("_distance")
        return rows[offset : offset + k]

    def check_model(self) -> None:
        """Refuse to compare embeddings from two different models."""
        owner = table_model(self.table)
        if owner is not None and owner != self.loaded.model_id:
            raise ValueError(
                f"table {self.cfg.output.table!r} was indexed with {owner}, "
                f"but the query model is {self.loaded.model_id}; pass the matching model config"
            )


def _drop_near_duplicates(rows: list[dict]) -> list[dict]:
    """Keep each row unless a better-ranked kept row has cosine >= DUPLICATE_COSINE with it."""
    if not rows:
        return rows
    vectors = np.asarray([r.pop("vector") for r in rows], np.float32)
    vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    similar = vectors @ vectors.T >= DUPLICATE_COSINE
    kept: list[int] = []
    for i in range(len(rows)):
        if not similar[i, kept].any():
            kept.append(i)
    return [rows[i] for i in kept]


def index_params(rows: int, dim: int) -> dict[str, int]:
    """IVF partitions and PQ sub-vectors for a table of this size (see the module docstring)."""
    return {
        "num_partitions": max(1, min(4096, rows // INDEX_ROWS_PER_PARTITION)),
        "num_sub_vectors": max(1, dim // PQ_DIMS_PER_SUB_VECTOR),
    }


def build_indexes(cfg: IndexConfig, partitions: int | None = None, sub_vectors: int | None = None) -> dict:
    """IVF_PQ on the vectors (cosine) plus scalar indexes for id lookups and common filters."""
    from lancedb.index import BTree, IvfPq  # here: importing lancedb before Ray forks makes it warn

    table = connect(cfg.output).open_table(cfg.output.table)
    rows = table.count_rows()
    params = index_params(rows, table.schema.field("vector").type.list_size)
    params["num_partitions"] = partitions or params["num_partitions"]
    params["num_sub_vectors"] = sub_vectors or params["num_sub_vectors"]
    config = IvfPq(distance_type="cosine", max_iterations=KMEANS_ITERATIONS, **params)
    table.create_index("vector", config=config, replace=True)
    for column in ("id", "shard", "route"):
        table.create_index(column, config=BTree(), replace=True)
    return {"rows": rows, **params}
