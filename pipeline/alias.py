"""Table aliases: the logical `output.table` names the physical tables of one embedding identity.

LanceDB OSS has no aliases, so they are rows of a small Lance table (`icar_aliases`) in the output
database, one per logical table. A model, heads or router change re-embeds every row, so `icar reindex`
builds a new generation of tables (`<table>-<digest>`, with its own rejected and manifest tables) while
the old one keeps answering, and switches the alias to it in ONE commit (a `merge_insert` of the alias
row) only once the new generation is complete. A reader resolves the alias when it (re)opens the table
and searches one Lance dataset version per query, so a query sees the old generation or the new one,
never a mix. The replaced generation stays readable until a reindex finds it older than
`reindex.cleanup_older_than_days`, and then drops it.

Every alias owns its tables (`<table>`, `<table>_rejected`, `<table>_manifest`, each generation's with
its suffix), so two aliases on one uri never share a manifest. The first generation's tables keep the
alias's own name.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from pipeline.config import ConfigError, IndexConfig, OutputConfig
from pipeline.storage import connect, sql_literal

ALIAS_TABLE = "icar_aliases"
ALIAS_SCHEMA = pa.schema(
    [
        ("alias", pa.string()),  # the logical table name (output.table)
        ("suffix", pa.string()),  # the live generation's table-name suffix ('' for the first)
        ("identity", pa.string()),  # its embedding identity, in words
        ("digest", pa.string()),
        ("switched_at", pa.float64()),
        ("replaced_suffix", pa.string()),  # the generation it replaced, kept until cleanup (null: none)
        ("replaced_identity", pa.string()),
    ]
)

# the identity hashes every route over these fields, each at its value meaning "off" unless the route sets
# it, so a route's digest does not depend on which RouteSpec kind holds it (and tables already written
# keep theirs)
_ROUTE_FIELDS = {"exit_depth": None, "merge": "none", "merge_r": 0, "merge_keep": None, "merge_floor": 0}
_ROUTE_FIELDS |= {"energy_tau": None, "keep_tokens": None, "prune_after": 1}
_ROUTE_FIELDS |= {"late_keep": None, "late_after": 0, "late_similarity": None, "tuned": False}


@dataclass(frozen=True)
class Identity:
    """What the embeddings depend on: the model (name, tag, and a local checkpoint's contents), its exit
    heads (file contents) and the router (its config, and a learned scorer's contents)."""

    model_id: str
    heads_sha: str | None
    router_sha: str
    weights_sha: str | None = None  # a local checkpoint's contents; None for a pretrained tag

    @classmethod
    def of(cls, cfg: IndexConfig) -> Identity:
        from pipeline.encode.model import resolve_heads, resolve_pretrained  # torch: only jobs that embed
        from pipeline.score import scorer_path

        heads = resolve_heads(cfg.model)
        if heads is not None and not Path(heads).is_file():
            raise ConfigError(f"model.heads: no such file {heads!r}")
        checkpoint = resolve_pretrained(cfg.model)  # a tag, or a local file (the embedded model's too)
        weights = file_sha(Path(checkpoint)) if checkpoint and Path(checkpoint).is_file() else None
        scorer = scorer_path(cfg.router.scorer)
        fields = [r.model_dump(mode="json", exclude_defaults=True) for r in cfg.router.routes]
        routes = [{**_ROUTE_FIELDS, **f} for f in fields]
        router = json.dumps({**cfg.router.model_dump(mode="json"), "routes": routes}, sort_keys=True)
        router += "\n" + (file_sha(scorer) if scorer else "")
        return cls(
            cfg.model.model_id,
            file_sha(Path(heads)) if heads else None,
            hashlib.sha256(router.encode()).hexdigest(),
            weights,
        )

    @property
    def digest(self) -> str:
        text = f"{self.model_id}\n{self.heads_sha or ''}\n{self.router_sha}\n{self.weights_sha or ''}"
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def describe(self) -> str:
        heads = self.heads_sha[:12] if self.heads_sha else "none"
        weights = f"weights {self.weights_sha[:12]}, " if self.weights_sha else ""
        return f"{self.model_id} ({weights}heads {heads}, router {self.router_sha[:12]})"


def file_sha(path: Path) -> str:
    """sha256 of a file's contents, read in 8 MiB blocks (a ViT-L checkpoint is 1.7 GB)."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(8 << 20):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class Generation:
    """One set of physical tables (images, rejected, manifest) holding one identity's embeddings."""

    suffix: str
    identity: str
    digest: str

    @classmethod
    def first(cls, identity: str, digest: str) -> Generation:
        return cls("", identity, digest)

    @classmethod
    def of(cls, identity: Identity) -> Generation:
        return cls(f"-{identity.digest}", identity.describe(), identity.digest)

    def output(self, cfg: OutputConfig) -> OutputConfig:
        """`cfg` naming this generation's physical tables."""
        return cfg.model_copy(update={"table": cfg.table + self.suffix})


class Aliases:
    """The alias row of one logical table (`cfg.table`); written only by the job holding its lease."""

    def __init__(self, cfg: OutputConfig):
        self.cfg, self.db = cfg, connect(cfg)
        self.table = None

    def _row(self) -> dict | None:
        if self.table is None:
            try:
                self.table = self.db.open_table(ALIAS_TABLE)
            except ValueError:  # not created yet: no alias recorded
                return None
        self.table.checkout_latest()
        rows = self.table.search().where(f"alias = {sql_literal(self.cfg.table)}").limit(1).to_list()
        return rows[0] if rows else None

    def live(self) -> Generation | None:
        """The generation `output.table` names now; None before any run recorded one."""
        return _generation(self._row())

    def resolve(self) -> OutputConfig:
        """The physical tables `output.table` names now (the configured names when no alias was ever
        recorded)."""
        live = self.live()
        return live.output(self.cfg) if live else self.cfg

    def _write(self, row: dict) -> None:
        """One commit: the alias row replaced whole."""
        data = pa.Table.from_pylist([row], schema=ALIAS_SCHEMA)
        if self.table is None:  # the alias table's first row: `_row` found no table
            self.table = self.db.create_table(ALIAS_TABLE, schema=ALIAS_SCHEMA, exist_ok=True)
        self.table.merge_insert("alias").when_matched_update_all().when_not_matched_insert_all().execute(data)

    def switch(self, generation: Generation) -> None:
        """Point the alias at `generation` in one commit. The generation it replaces is kept (readers may
        be on it) until `drop_replaced`; one replaced earlier still is dropped now."""
        row = self._row()
        live = _generation(row)
        if live == generation:  # already switched (a rerun): replacing it by itself would drop it later
            return
        self._write(
            {
                "alias": self.cfg.table,
                "suffix": generation.suffix,
                "identity": generation.identity,
                "digest": generation.digest,
                "switched_at": time.time(),
                "replaced_suffix": live.suffix if live else None,
                "replaced_identity": live.identity if live else None,
            }
        )
        older = row["replaced_suffix"] if row else None
        if older is not None and older != generation.suffix:
            self._drop(older)

    def drop_replaced(self, older_than_seconds: float) -> str | None:
        """Drop the tables of the generation the last switch replaced, once it is that old; returns its
        identity. Dropped first, then forgotten: a crash in between makes the next run drop again."""
        row = self._row()
        if row is None or row["replaced_suffix"] in (None, row["suffix"]):  # never the live generation
            return None
        if time.time() - row["switched_at"] < older_than_seconds:
            return None
        self._drop(row["replaced_suffix"])
        self._write(row | {"replaced_suffix": None, "replaced_identity": None})
        return row["replaced_identity"]

    def _drop(self, suffix: str) -> None:
        tables = Generation(suffix, "", "").output(self.cfg)
        for name in (tables.table, tables.rejected_table, tables.manifest_table):
            self.db.drop_table(name, ignore_missing=True)


def _generation(row: dict | None) -> Generation | None:
    return Generation(row["suffix"], row["identity"], row["digest"]) if row else None


def resolve(cfg: OutputConfig) -> OutputConfig:
    """The physical tables `cfg.table` names now (`Aliases.resolve`)."""
    return Aliases(cfg).resolve()


def target_generation(cfg: IndexConfig, switch: bool) -> tuple[Generation, Generation | None]:
    """The generation this run writes, and the live one (None: this run names the first generation).

    Unchanged identity: the live generation. Changed: with `switch` (reindex), a new generation to build
    and switch to; without, a ConfigError naming both identities."""
    identity = Identity.of(cfg)
    live = Aliases(cfg.output).live()
    if live is None:
        return Generation.first(identity.describe(), identity.digest), None
    if live.digest == identity.digest:
        return live, live
    if not switch:
        raise ConfigError(
            f"table {cfg.output.table!r} at {cfg.output.uri} holds embeddings of {live.identity}; this "
            f"config embeds with {identity.describe()}. Run `icar reindex` with this config to re-embed "
            "into a new table and switch to it when it is complete (or use another output.table)"
        )
    return Generation.of(identity), live
