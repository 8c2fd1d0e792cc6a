"""The quality harness: how well an encoder, a set of embeddings or a written table retrieves scenes.

Every later change (routes, exit heads, token reduction, thresholds) is judged by the same numbers:
text->image and image->text recall with scene-key hits (any image whose canonical facts equal the
caption's is a correct answer, so duplicates are never counted as misses), broken down by the scenes'
ground-truth complexity level, plus -- against a reference embedding set such as the full-depth model's --
how far each image's embedding and its neighbourhood moved. Held-out images go through `decode_image`,
so they are exactly the pixels the indexing pipeline would feed the encoder.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

from icar_lab.embed import embed_images, embed_texts
from icar_lab.metrics import K, neighbour_overlap, recall_at_k
from icar_lab.sample import MATCH_COLUMN, CaptionedSample
from pipeline.config import IndexConfig, InputConfig
from pipeline.encode.model import LoadedModel, load_model
from pipeline.encode.routed import RoutedEncoder

LEVELS = ("low", "medium", "high")
KS = (1, 5, K)
NEIGHBOURS = 10
GROUND_TRUTH_COLUMNS = ["key", "caption", "scene_key", "complexity_level", "object_count", "background"]

Embeddings = torch.Tensor | np.ndarray


# -- reports ------------------------------------------------------------------------------------------
@dataclass
class SliceQuality:
    """Metrics over one set of queries (all scenes, or one complexity level); gallery is always all."""

    count: int
    t2i: dict[int, float | None]  # k -> recall@k of text queries against all images
    i2t: dict[int, float | None]  # k -> recall@k of image queries against all captions
    ref_cosine: float | None = None  # mean cosine between each image's embedding and its reference one
    neighbour_overlap: float | None = None  # mean |top-10 image neighbours ∩ reference's| / 10

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"count": self.count}
        out.update({f"t2i_R@{k}": v for k, v in self.t2i.items()})
        out.update({f"i2t_R@{k}": v for k, v in self.i2t.items()})
        out.update(ref_cosine=self.ref_cosine, neighbour_overlap=self.neighbour_overlap)
        return out


@dataclass
class QualityReport:
    """Retrieval quality of one embedding set, overall and per complexity level, plus its compute."""

    overall: SliceQuality
    by_level: dict[str, SliceQuality]
    name: str = ""
    gflops_per_image: float | None = None  # mean analytic GFLOPs of the image encoder, when known
    extra: dict[str, Any] = field(default_factory=dict)  # caller's context (model id, routes, …)

    @property
    def t2i(self) -> dict[int, float | None]:
        return self.overall.t2i

    @property
    def i2t(self) -> dict[int, float | None]:
        return self.overall.i2t

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: plain str keys, floats or None."""
        return {
            "name": self.name,
            **self.overall.to_dict(),
            "gflops_per_image": self.gflops_per_image,
            "by_level": {level: s.to_dict() for level, s in self.by_level.items()},
            "extra": self.extra,
        }

    def to_markdown(self) -> str:
        """One row for all scenes and one per complexity level."""
        has_ref = self.overall.ref_cosine is not None
        head = ["slice", "n", *[f"T→I R@{k}" for k in self.t2i], *[f"I→T R@{k}" for k in self.i2t]]
        if has_ref:
            head += ["ref cos", "nbr overlap@10"]
        rows = [("all", self.overall), *self.by_level.items()]
        lines = [f"**{self.name}**", ""] if self.name else []
        lines += [_md_row(head), _md_row(["---"] * len(head))]
        for label, s in rows:
            cells = [label, str(s.count), *map(_fmt, s.t2i.values()), *map(_fmt, s.i2t.values())]
            if has_ref:
                cells += [_fmt(s.ref_cosine), _fmt(s.neighbour_overlap)]
            lines.append(_md_row(cells))
        if self.gflops_per_image is not None:
            lines += ["", f"compute: {self.gflops_per_image:.3f} GFLOPs/image"]
        return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def _md_row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def reports_markdown(reports: Sequence[QualityReport]) -> str:
    """Side-by-side comparison: one row per report (all scenes), T→I R@10 per level, compute."""
    head = ["model", "n", "T→I R@1", "T→I R@5", "T→I R@10", "I→T R@1", "I→T R@10"]
    head += [f"T→I R@10 {level}" for level in LEVELS] + ["ref cos", "nbr overlap", "GFLOPs/img"]
    lines = [_md_row(head), _md_row(["---"] * len(head))]
    for r in reports:
        o = r.overall
        cells = [r.name or "?", str(o.count)]
        cells += [_fmt(o.t2i.get(k)) for k in (1, 5, 10)] + [_fmt(o.i2t.get(k)) for k in (1, 10)]
        cells += [_fmt(r.by_level[lv].t2i.get(10)) if lv in r.by_level else "–" for lv in LEVELS]
        cells += [_fmt(o.ref_cosine), _fmt(o.neighbour_overlap), _fmt(r.gflops_per_image)]
        lines.append(_md_row(cells))
    return "\n".join(lines)


# -- metrics ------------------------------------------------------------------------------------------
def _as_unit_tensor(x: Embeddings, name: str) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x, dtype=np.float32)) if isinstance(x, np.ndarray) else x.float()
    if t.ndim != 2:
        raise ValueError(f"{name} must be [N, D], got shape {tuple(t.shape)}")
    return F.normalize(t.detach().cpu(), dim=-1)  # recall_at_k ranks by dot product: cosine needs unit rows


def _recall(
    queries: torch.Tensor, gallery: torch.Tensor, query_keys: list[str], gallery_keys: list[str]
) -> dict[int, float | None]:
    ks = tuple(k for k in KS if k <= len(gallery))
    if len(queries) == 0 or not ks:
        return dict.fromkeys(KS)
    found = recall_at_k(queries, gallery, query_keys, gallery_keys, ks)
    return {k: found.get(k) for k in KS}


def evaluate_embeddings(
    image_emb: Embeddings,
    text_emb: Embeddings,
    sample: CaptionedSample,
    reference: Embeddings | None = None,
    name: str = "",
) -> QualityReport:
    """Score row-aligned image and caption embeddings of `sample` (and optionally a reference set).

    Per complexity level (where the sample knows them), only the queries are restricted (to that level's
    scenes); the gallery stays every image (or caption), so a level's recall is comparable to the overall
    one and to other levels'.
    """
    images, texts = _as_unit_tensor(image_emb, "image_emb"), _as_unit_tensor(text_emb, "text_emb")
    n = len(sample)
    if len(images) != n or len(texts) != n:
        raise ValueError(f"{len(images)} image / {len(texts)} text embeddings for {n} held-out scenes")
    keys = list(sample.keys)
    ref_cos = overlap = None
    if reference is not None:
        ref = _as_unit_tensor(reference, "reference")
        if ref.shape != images.shape:
            raise ValueError(f"reference shape {tuple(ref.shape)} != image embeddings {tuple(images.shape)}")
        ref_cos = (images * ref).sum(dim=1)
        overlap = neighbour_overlap(images, ref, k=NEIGHBOURS) if n > NEIGHBOURS else None

    def slice_quality(rows: np.ndarray) -> SliceQuality:
        idx = torch.from_numpy(rows)
        sub_keys = [keys[i] for i in rows]
        return SliceQuality(
            count=len(rows),
            t2i=_recall(texts[idx], images, sub_keys, keys),
            i2t=_recall(images[idx], texts, sub_keys, keys),
            ref_cosine=float(ref_cos[idx].mean()) if ref_cos is not None and len(rows) else None,
            neighbour_overlap=float(overlap[idx].mean()) if overlap is not None and len(rows) else None,
        )

    levels = None if sample.complexity_level is None else np.asarray(sample.complexity_level).astype(str)
    names = [] if levels is None else list(LEVELS) + sorted(set(levels.tolist()) - set(LEVELS))
    return QualityReport(
        overall=slice_quality(np.arange(n)),
        by_level={level: slice_quality(np.flatnonzero(levels == level)) for level in names},
        name=name,
    )


# -- encoders and written tables ----------------------------------------------------------------------
def evaluate_encoder(
    encoder: RoutedEncoder,
    heldout: CaptionedSample,
    route_ids: np.ndarray | None = None,
    reference: Embeddings | None = None,
    batch_size: int = 256,
    name: str = "",
) -> QualityReport:
    """Encode the held-out images through the routed encoder (route 0 for all unless `route_ids`) and score.

    Records the encoder's mean analytic GFLOPs, so a route's quality and compute come out of one call;
    its speed is the timing harness's (speed.py), measured against a baseline in alternating rounds.
    """
    n = len(heldout)
    routes = np.zeros(n, np.int64) if route_ids is None else np.asarray(route_ids, dtype=np.int64)
    if routes.shape != (n,):
        raise ValueError(f"route_ids must have shape ({n},), got {routes.shape}")
    vectors, gflops = embed_images(encoder, heldout.images, routes, batch_size)
    texts = embed_texts(encoder.loaded, heldout.captions, batch_size)
    report = evaluate_embeddings(vectors, texts, heldout, reference, name=name)
    report.gflops_per_image = float(gflops.mean())
    report.extra["model_id"] = encoder.loaded.model_id
    report.extra["routes"] = {r.name: int((routes == j).sum()) for j, r in enumerate(encoder.routes)}
    return report


def _read_ground_truth(shard_paths: Sequence[str | Path], cfg: InputConfig) -> dict[str, dict[str, Any]]:
    """Row id -> ground truth, with ids formed exactly as the reader forms them (shard name / key)."""
    from pipeline.read import list_shards

    shards = list_shards(cfg.model_copy(update={"paths": [str(p) for p in shard_paths]}))
    truth: dict[str, dict[str, Any]] = {}
    for shard in shards:
        fs, path = fsspec.core.url_to_fs(shard.uri, **cfg.storage_options)
        with fs.open(path, "rb") as fh:
            table = pq.read_table(fh, columns=GROUND_TRUTH_COLUMNS)
        for row in table.to_pylist():
            truth[f"{shard.name}/{row['key']}"] = row
    return truth


def _match_rows(truth: dict[str, dict[str, Any]], ids: list[str]) -> tuple[list[dict[str, Any]], list[int]]:
    """The ground-truth row of each table id that has one, and those ids' positions. An id whose shard
    name differs from the shards' (e.g. the job listed a parent directory) matches on the shard's file
    name and key; a file name two shards share matches nothing."""
    by_file_key: dict[str, dict[str, Any] | None] = {}
    for row_id, row in truth.items():
        short = f"{Path(row_id.rsplit('/', 1)[0]).name}/{row['key']}"
        by_file_key[short] = None if short in by_file_key else row
    rows, keep = [], []
    for i, row_id in enumerate(ids):
        prefix, key = row_id.rsplit("/", 1)
        row = truth.get(row_id) or by_file_key.get(f"{Path(prefix).name}/{key}")
        if row is not None:
            rows.append(row)
            keep.append(i)
    return rows, keep


def _written_sample(rows: list[dict[str, Any]]) -> CaptionedSample:
    """Captions, keys and ground truth of the matched rows; the table holds vectors, not pixels."""
    return CaptionedSample(
        images=np.zeros((len(rows), 0, 0, 3), np.uint8),
        captions=[r["caption"] for r in rows],
        keys=[r["scene_key"] for r in rows],
        bytes_per_pixel=np.zeros(len(rows), np.float32),  # not needed to score written vectors
        key_source=MATCH_COLUMN,
        complexity_level=np.asarray([r["complexity_level"] for r in rows], dtype=str),
        object_count=np.asarray([r["object_count"] for r in rows], dtype=np.int32),
        background=np.asarray([r["background"] for r in rows], dtype=str),
    )


def evaluate_table(
    cfg: IndexConfig,
    shard_paths: Sequence[str | Path] | None = None,
    loaded: LoadedModel | None = None,
    name: str = "",
) -> QualityReport:
    """Score a LanceDB table as the pipeline wrote it, against the corpus shards' ground truth.

    `shard_paths` default to `cfg.input.paths` (so ids match the job's exactly). Captions are embedded
    with `cfg.model`'s text tower; the table must hold that model's vectors.
    """
    from pipeline.alias import resolve
    from pipeline.storage import connect

    paths = list(shard_paths) if shard_paths is not None else list(cfg.input.paths)
    if not paths:
        raise ValueError("no shard paths: pass shard_paths or set input.paths")
    truth = _read_ground_truth(paths, cfg.input)
    table = connect(cfg.output).open_table(resolve(cfg.output).table)  # the live generation
    data = table.to_arrow().select(["id", "vector", "gflops", "model_id"])
    model_ids = set(data.column("model_id").to_pylist())
    if model_ids - {cfg.model.model_id}:
        raise ValueError(
            f"table {cfg.output.table!r} holds vectors of {sorted(model_ids)}, but the text tower would be "
            f"{cfg.model.model_id}; pass the matching model config"
        )
    rows, keep = _match_rows(truth, data.column("id").to_pylist())
    if not rows:
        raise ValueError(f"none of the {data.num_rows} table rows match a row of the shards {paths}")
    data = data.take(keep)
    vectors = np.stack(data.column("vector").to_numpy(zero_copy_only=False)).astype(np.float32)
    written = _written_sample(rows)
    loaded = loaded or load_model(cfg.model)
    report = evaluate_embeddings(vectors, embed_texts(loaded, written.captions), written, name=name)
    report.gflops_per_image = float(np.asarray(data.column("gflops").to_numpy(), np.float64).mean())
    report.extra.update(
        model_id=cfg.model.model_id,
        table=f"{cfg.output.uri}/{cfg.output.table}",
        table_rows=int(table.count_rows()),
        ground_truth_rows=len(truth),
    )
    return report
