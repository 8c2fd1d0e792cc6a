"""Stage 6: query the vector table by text or by image, and build its ANN and scalar indexes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.config import IndexConfig
from pipeline.decode import decode_image
from pipeline.encode.model import LoadedModel, load_model, normalize_uint8
from pipeline.write import connect, table_model

RESULT_COLUMNS = ["id", "url", "caption", "complexity", "route", "exit_depth", "gflops"]


@dataclass
class Searcher:
    """Embeds queries with the table's own model (full depth) and searches the table."""

    cfg: IndexConfig
    loaded: LoadedModel

    @classmethod
    def open(cls, cfg: IndexConfig) -> Searcher:
        return cls(cfg, load_model(cfg.model))

    @property
    def table(self):
        return connect(self.cfg.output).open_table(self.cfg.output.table)

    @torch.inference_mode()
    def embed_text(self, texts: list[str]) -> torch.Tensor:
        return self.loaded.model.encode_text(self.loaded.tokenizer(texts), normalize=True)

    @torch.inference_mode()
    def embed_image(self, path: str | Path) -> torch.Tensor:
        pixels, _ = decode_image(Path(path).read_bytes(), self.loaded.preprocess)
        x = normalize_uint8(torch.from_numpy(pixels)[None], self.loaded.mean, self.loaded.std)
        return self.loaded.model.encode_image(x, normalize=True)

    def search(self, vector: torch.Tensor, k: int = 10, where: str | None = None) -> list[dict]:
        table = self.table
        query = table.search(vector.reshape(-1).tolist()).distance_type("cosine").limit(k)
        if where:
            query = query.where(where, prefilter=True)
        rows = query.select([*RESULT_COLUMNS, "_distance"]).to_list()
        for row in rows:
            row["score"] = 1.0 - row.pop("_distance")
        return rows

    def check_model(self) -> None:
        """Refuse to compare embeddings from two different models."""
        owner = table_model(self.table)
        if owner is not None and owner != self.loaded.model_id:
            raise ValueError(
                f"table {self.cfg.output.table!r} was indexed with {owner}, "
                f"but the query model is {self.loaded.model_id}; pass the matching model config"
            )


def build_indexes(cfg: IndexConfig, partitions: int | None = None, sub_vectors: int | None = None) -> dict:
    """IVF_PQ on the vectors (cosine) plus scalar indexes for id lookups and common filters."""
    from lancedb.index import BTree, IvfPq  # here: importing lancedb before Ray forks makes it warn

    table = connect(cfg.output).open_table(cfg.output.table)
    rows = table.count_rows()
    dim = table.schema.field("vector").type.list_size
    partitions = partitions or max(1, min(4096, int(rows**0.5)))
    sub_vectors = sub_vectors or max(1, dim // 16)
    table.create_index(
        "vector",
        config=IvfPq(distance_type="cosine", num_partitions=partitions, num_sub_vectors=sub_vectors),
        replace=True,
    )
    for column in ("id", "shard", "route"):
        table.create_index(column, config=BTree(), replace=True)
    return {"rows": rows, "num_partitions": partitions, "num_sub_vectors": sub_vectors}
