"""The three tables of one generation of an alias, opened for the run that holds the alias's lease."""

from __future__ import annotations

from datetime import timedelta

import pyarrow as pa

from pipeline.config import OutputConfig
from pipeline.storage import connect, dataset_uri, retrying
from pipeline.write.fenced import FencedTable
from pipeline.write.fragments import FragmentTarget
from pipeline.write.manifest import ShardManifest
from pipeline.write.schema import MANIFEST_SCHEMA, REJECTED_SCHEMA, images_schema, table_model


class OutputTables:
    """Images, rejected rows and the shard manifest of one generation (`cfg` names its physical tables).

    Opening them creates what is missing and checks the images table holds this model's vectors; `fence`
    then shuts out the run that held them before (`write.fenced`), after which `manifest` is read: no
    commit of that run can change them any more."""

    def __init__(self, cfg: OutputConfig, model_id: str, dim: int, dataset: str | None = None):
        self.cfg, self.model_id, self.dim, self.dataset = cfg, model_id, dim, dataset
        db = connect(cfg)
        schema = images_schema(dim, cfg.vector_dtype, model_id)
        self.images_table = _open(db, cfg.table, schema)  # LanceDB handles: indexes, optimize, queries
        self.rejected_table = _open(db, cfg.rejected_table, REJECTED_SCHEMA)
        self.manifest_table = _open(db, cfg.manifest_table, MANIFEST_SCHEMA)
        self._check_vectors()
        self._check_model()
        self.images, self.rejected, self.manifest_log = (
            FencedTable(dataset_uri(cfg, name), cfg)
            for name in (cfg.table, cfg.rejected_table, cfg.manifest_table)
        )
        self.manifest: ShardManifest | None = None

    def fence(self) -> ShardManifest:
        """Shut out any earlier holder's late commits, then read the manifest as it now stands."""
        for table in (self.manifest_log, self.rejected, self.images):
            table.fence()
        self.manifest = ShardManifest(self.manifest_log, self.dataset)
        return self.manifest

    def remove_orphans(self, keep_versions: timedelta) -> int:
        """Delete fragment files no version references (written by workers of a run that died before
        committing them), and versions older than `keep_versions`; returns the data files removed.

        Safe only after `fence`: a file of a commit still in flight would look orphaned too."""
        removed = 0
        for table in (self.images, self.rejected, self.manifest_log):
            stats = table.ds.cleanup_old_versions(older_than=keep_versions, delete_unverified=True)
            removed += stats.data_files_removed
        return removed

    def optimize(self, cleanup_older_than: timedelta | None = None) -> None:
        """End of a run: compact what is left small, fold new rows into the indexes, and prune versions
        older than `cleanup_older_than` (LanceDB's default, 7 days, when None)."""
        for table in (self.images_table, self.rejected_table, self.manifest_table):
            table.checkout_latest()
            retrying(
                lambda _, table=table: table.optimize(cleanup_older_than=cleanup_older_than),
                self.cfg.commit_attempts,
                self.cfg.commit_backoff_seconds,
            )

    def target(self) -> FragmentTarget:
        return FragmentTarget(
            images_uri=self.images.uri,
            rejected_uri=self.rejected.uri,
            images_schema=self.images.ds.schema,
            model_id=self.model_id,
            storage_options=dict(self.cfg.storage_options),
            rows_per_fragment=self.cfg.rows_per_fragment,
            write_attempts=self.cfg.commit_attempts,
            backoff_seconds=self.cfg.commit_backoff_seconds,
        )

    def _check_vectors(self) -> None:
        field = self.images_table.schema.field("vector")
        have = (field.type.list_size, str(field.type.value_type))
        want = (self.dim, "halffloat" if self.cfg.vector_dtype == "float16" else "float")
        if have != want:
            raise ValueError(
                f"table {self.cfg.table!r} at {self.cfg.uri} holds vectors {have}, this job writes {want}; "
                "use another output.table or the matching model/vector_dtype"
            )

    def _check_model(self) -> None:
        """One table per model: the same ids from two models would overwrite or duplicate each other."""
        owner = table_model(self.images_table)
        if owner is not None and owner != self.model_id:
            raise ValueError(
                f"table {self.cfg.table!r} at {self.cfg.uri} holds embeddings of {owner}, this job embeds "
                f"with {self.model_id}; `icar reindex` re-embeds a table with another model"
            )


def _open(db, name: str, schema: pa.Schema):
    """The existing table as it is (its schema is checked afterwards, with a message), else a new one."""
    try:
        return db.open_table(name)
    except ValueError:  # "Table ... was not found"
        return db.create_table(name, schema=schema, exist_ok=True)
