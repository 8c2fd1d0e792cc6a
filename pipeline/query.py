"""Stage 6: query the vector table by text, image, id or vector, and build its ANN and scalar indexes.

The index and search settings are chosen for recall@10 >= 0.95 within 5 ms on a million rows, float32 or
float16 (`make bench` measures them as settings["shipped"] beside LanceDB's defaults); a user gets them
by default from `icar build-index`, `icar query` and `icar serve`. Searches run straight on the Lance
dataset: lancedb's query builder adds about 3 ms to every query (measured on this machine), more than
the search itself.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import torch

from pipeline.alias import Aliases, resolve
from pipeline.config import IndexConfig
from pipeline.decode import decode_image
from pipeline.encode.model import LoadedModel, load_model, normalize_uint8
from pipeline.storage import connect, sql_literal
from pipeline.write.schema import table_model

if TYPE_CHECKING:
    import lance

RESULT_COLUMNS = ["id", "url", "caption", "shard", "complexity", "route", "exit_depth", "tokens", "gflops"]
INDEX_ROWS_PER_PARTITION = 1000  # IVF partitions of about this many rows: sqrt(rows) at a million
PQ_DIMS_PER_SUB_VECTOR = 8  # 64 sub-vectors for 512-d: PQ distances good enough to rerank few candidates
KMEANS_ITERATIONS = 10  # IVF k-means (lancedb: 50): capped so 1M-row builds fit the bench, which uses it
SEARCH = {"nprobes": 5, "refine_factor": 3}  # shipped search settings (see `make bench`)
DUPLICATE_COSINE = 0.98  # results at least this similar to a better one are near-duplicates

log = logging.getLogger("icar.query")


def nearest(
    dataset: lance.LanceDataset,
    vector: np.ndarray,
    k: int,
    columns: list[str],
    where: str | None = None,
    **knobs: int,
) -> pa.Table:
    """The k nearest rows by cosine, `columns` plus `_distance`, with the shipped search settings unless
    `knobs` say otherwise; `where` filters before the search."""
    query = {"column": "vector", "q": vector, "k": k, "metric": "cosine", **(knobs or SEARCH)}
    columns = [*columns, "_distance"]  # named: Lance warns on every query that leaves it implicit
    return dataset.to_table(columns=columns, nearest=query, filter=where, prefilter=bool(where))


@dataclass
class Searcher:
    """Embeds queries with the table's own model (full depth) and searches the table.

    One dataset handle is kept; every `refresh_seconds` it resolves the `output.table` alias (a reindex
    may have switched it to a new generation of tables, `pipeline.alias`) and looks for a newer version,
    so a long-lived service sees what a reindex committed without a restart. Each query runs on one
    handle: it never sees half a commit, nor the old and the new generation together."""

    cfg: IndexConfig
    loaded: LoadedModel
    refresh_seconds: float = 5.0
    _table: Any = None
    _dataset: Any = None
    _checked: float = 0.0
    _aliases: Aliases | None = None

    @classmethod
    def open(cls, cfg: IndexConfig, refresh_seconds: float = 5.0) -> Searcher:
        return cls(cfg, load_model(cfg.model), refresh_seconds)

    @property
    def aliases(self) -> Aliases:
        if self._aliases is None:
            self._aliases = Aliases(self.cfg.output)
        return self._aliases

    @property
    def table(self):
        if self._table is None:
            self._reopen()
        return self._table

    def _reopen(self) -> None:
        """Open the table the alias names now. A generation of another model than the one loaded is
        not taken (its vectors would not compare): the old one answers until it is dropped."""
        output = self.aliases.resolve()
        table = connect(output).open_table(output.table)
        owner = table_model(table)
        if self._table is not None and owner not in (None, self.loaded.model_id):
            log.warning(
                "%r now names a table of %s; this service embeds with %s and keeps the replaced "
                "table until restarted with that model",
                self.cfg.output.table,
                owner,
                self.loaded.model_id,
            )
            return
        self._table, self._dataset = table, table.to_lance()

    @property
    def dataset(self) -> lance.LanceDataset:
        """The aliased table's Lance dataset at its latest version (checked every `refresh_seconds`)."""
        now = time.monotonic()
        if self._dataset is None:
            self._reopen()
            self._checked = now
        elif now - self._checked >= self.refresh_seconds:
            if self.aliases.resolve().table != self._table.name:
                self._reopen()
            latest = self._dataset.latest_version
            if latest != self._dataset.version:
                self._dataset = self._dataset.checkout_version(latest)
            self._checked = now
        return self._dataset

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
        rows = self.dataset.to_table(columns=columns, filter=f"id = {sql_literal(row_id)}", limit=1)
        return rows.to_pylist()[0] if rows.num_rows else None

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
        columns = RESULT_COLUMNS + (["vector"] if dedup else [])
        found = nearest(self.dataset, query_vector, fetch, columns, where)
        rows = [r for r in found.to_pylist() if r["id"] != exclude]
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


def build_indexes(
    cfg: IndexConfig, partitions: int | None = None, sub_vectors: int | None = None, table: Any = None
) -> dict:
    """IVF_PQ on the vectors (cosine) plus scalar indexes for id lookups and common filters, on `table`
    (default: the one `output.table` names now)."""
    from lancedb.index import BTree, IvfPq  # here: importing lancedb before Ray forks makes it warn

    if table is None:
        output = resolve(cfg.output)
        table = connect(output).open_table(output.table)
    rows = table.count_rows()
    params = index_params(rows, table.schema.field("vector").type.list_size)
    params["num_partitions"] = partitions or params["num_partitions"]
    params["num_sub_vectors"] = sub_vectors or params["num_sub_vectors"]
    config = IvfPq(distance_type="cosine", max_iterations=KMEANS_ITERATIONS, **params)
    table.create_index("vector", config=config, replace=True)
    for column in ("id", "shard", "route"):
        table.create_index(column, config=BTree(), replace=True)
    return {"rows": rows, **params}
