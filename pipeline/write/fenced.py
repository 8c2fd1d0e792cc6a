"""One Lance dataset that only the run holding its table commits to, fenced against a run that lost it.

Every commit names the version this run last committed (`read_version`), never a newer one it did not
make. A run that takes a table over first commits a fence: a Restore of the latest version, which Lance
refuses to reconcile with any concurrent transaction. So a commit of the replaced run that was built on an
older version is refused by Lance itself, however late it lands (a stalled process, a retried request):
a writer that lost its table cannot add a row, delete one, or compact. Lance raises the refusal as
"Incompatible transaction"; here it becomes `LeaseLost`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

import pyarrow as pa

from pipeline.config import OutputConfig
from pipeline.lease import LeaseLost
from pipeline.storage import is_transient, retrying

if TYPE_CHECKING:
    from lance import LanceDataset
    from lance.fragment import FragmentMetadata

T = TypeVar("T")


def is_refused(exc: BaseException) -> bool:
    """Lance refused a commit because the table moved on under it with an incompatible change (a fence)."""
    return "Incompatible transaction" in str(exc)


def may_have_landed(exc: BaseException) -> bool:
    """A commit whose outcome is unknown: the object store failed transiently, or the version it wrote
    was already there (a PUT that landed, whose answer was lost, and was sent again)."""
    return is_transient(exc) or type(exc).__name__ == "CommitConflictError" or "conflict" in str(exc).lower()


class FencedTable:
    """A table's Lance dataset at the version this run last committed; every write commits on top of it."""

    def __init__(self, uri: str, cfg: OutputConfig):
        import lance  # not at module load: its fork hook warns in every process Ray forks afterwards

        self.uri, self.cfg = uri, cfg
        self.options = cfg.storage_options or None
        self.ds: LanceDataset = lance.dataset(uri, storage_options=self.options)
        self.appended_since_compaction = 0

    @property
    def version(self) -> int:
        return self.ds.version

    def fence(self) -> None:
        """Commit a Restore of the latest version on top of itself: from now on a commit built on any
        earlier version is refused. Tried again while other commits land in between (a stale writer's)."""

        import lance
        from lance import LanceDataset, LanceOperation

        def restore(latest: LanceDataset) -> LanceDataset:
            operation = LanceOperation.Restore(latest.version)
            return LanceDataset.commit(latest, operation, read_version=latest.version, max_retries=0)

        while True:
            latest = self._retry(lambda _: lance.dataset(self.uri, storage_options=self.options))
            try:
                self.ds = self._retry(lambda _, latest=latest: restore(latest))
                return
            except LeaseLost:
                continue  # something committed between our read and our fence: fence the newer version

    def append(self, fragments: list[FragmentMetadata]) -> None:
        """One commit adding written fragments. A try whose answer was lost may have landed: before trying
        again, the versions after ours are searched for it, so the fragments are never added twice."""
        if not fragments:
            return
        from lance import LanceDataset, LanceOperation

        path = fragments[0].files[0].path

        def ours(operation: object) -> bool:
            return isinstance(operation, LanceOperation.Append) and any(
                f.files[0].path == path for f in operation.fragments
            )

        def commit(attempt: int) -> LanceDataset:
            if attempt > 1 and (landed := self._landed(ours)) is not None:
                return landed
            # max_retries=0: Lance must not retry a version conflict itself. If the conflict is our own
            # commit landing under a lost answer, it would rebase over it and append the fragments again.
            operation = LanceOperation.Append(fragments)
            return LanceDataset.commit(self.ds, operation, read_version=self.version, max_retries=0)

        self.ds = self._retry(commit)
        self.appended_since_compaction += len(fragments)

    def append_rows(self, rows: pa.Table) -> None:
        """Write `rows` as fragments here in the driver and append them (small tables: the manifest)."""
        from lance.fragment import write_fragments

        self.append(
            self._retry(
                lambda _: write_fragments(rows, self.uri, schema=self.ds.schema, storage_options=self.options)
            )
        )

    def delete(self, where: str) -> None:
        """Delete the rows matching `where`, in one commit (safe to repeat)."""
        self._retry(lambda _: self.ds.delete(where))

    def rewrite(self, rows: pa.Table) -> None:
        """Replace every row by `rows` in one commit (the manifest's compaction). An Update that removes
        every fragment, not an Overwrite: Lance lets an Overwrite through a fence, never an Update."""
        from lance import LanceDataset, LanceOperation
        from lance.fragment import write_fragments

        fragments = self._retry(
            lambda _: write_fragments(rows, self.uri, schema=self.ds.schema, storage_options=self.options)
        )
        removed = [f.fragment_id for f in self.ds.get_fragments()]
        operation = LanceOperation.Update(removed_fragment_ids=removed, new_fragments=fragments)
        path = fragments[0].files[0].path if fragments else None

        def ours(op: object) -> bool:
            return isinstance(op, LanceOperation.Update) and any(
                f.files[0].path == path for f in op.new_fragments
            )

        def commit(attempt: int) -> LanceDataset:
            if attempt > 1 and path and (landed := self._landed(ours)) is not None:
                return landed
            return LanceDataset.commit(self.ds, operation, read_version=self.version, max_retries=0)

        self.ds = self._retry(commit)
        self.appended_since_compaction = 0

    def compact(self, target_rows_per_fragment: int) -> None:
        """Merge small fragments (Lance's compaction, built on our version like every commit): each commit
        rewrites the list of every fragment, so their number must not grow with the run."""
        import lance
        from lance import LanceOperation

        before = self.version

        def compact(attempt: int) -> None:
            rewrite = lambda op: isinstance(op, LanceOperation.Rewrite)  # noqa: E731 - only ours after `before`
            if attempt > 1 and (landed := self._landed(rewrite, since=before)) is not None:
                self.ds = landed  # a try whose answer was lost did land
                return
            self.ds.optimize.compact_files(
                target_rows_per_fragment=target_rows_per_fragment, defer_index_remap=True
            )

        self._retry(compact)
        self.ds = lance.dataset(self.uri, version=self.ds.version, storage_options=self.options)
        self.appended_since_compaction = 0

    def fragment_count(self) -> int:
        return len(self.ds.get_fragments())

    def _landed(self, ours: Callable[[object], bool], since: int | None = None) -> LanceDataset | None:
        """The version after ours (or after `since`) at which a transaction `ours` recognises landed."""
        import lance

        latest = lance.dataset(self.uri, storage_options=self.options)
        for version in range((self.version if since is None else since) + 1, latest.version + 1):
            if ours(latest.read_transaction(version).operation):
                return lance.dataset(self.uri, version=version, storage_options=self.options)
        return None

    def _retry(self, commit: Callable[[int], T]) -> T:
        """`commit(attempt)`, tried `output.commit_attempts` times with doubling backoff while its outcome
        is unknown (`may_have_landed`). A refusal (the table moved on under this run) is never retried:
        it is `LeaseLost`."""

        def attempt(number: int) -> T:
            try:
                return commit(number)
            except Exception as exc:
                if is_refused(exc):
                    raise LeaseLost(
                        f"lost table {self.uri}: another job took over and committed (Lance refused this "
                        "run's commit); stopped before writing more"
                    ) from exc
                raise

        def unknown(exc: BaseException) -> bool:
            return not isinstance(exc, LeaseLost) and may_have_landed(exc)

        return retrying(attempt, self.cfg.commit_attempts, self.cfg.commit_backoff_seconds, unknown)
