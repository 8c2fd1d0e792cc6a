"""A fenced table's commits ride out a transient object-store failure (bounded, with backoff) and fail at
once on anything else; a retried append never duplicates a row whose first commit went through.

tests/test_faults.py runs the whole job through an S3 outage; these are `FencedTable`'s own rules, on real
Lance datasets (moto S3 behind a fault proxy, or local disk)."""

from __future__ import annotations

import logging

import boto3
import lance
import pyarrow as pa
import pytest
from conftest import lance_table
from faults import FaultProxy
from lance.fragment import FragmentMetadata, write_fragments
from processes import assert_exactly_once

from pipeline.config import OutputConfig
from pipeline.storage import is_transient
from pipeline.write.fenced import FencedTable
from pipeline.write.output import OutputTables
from pipeline.write.schema import images_schema

DIM = 4
KEY = SECRET = "testing"
REGION = "us-east-1"


def _images(ids: list[str], shard: str = "s") -> pa.Table:
    rows = [{"id": i, "shard": shard, "key": i, "vector": [0.0] * DIM, "model_id": "m"} for i in ids]
    return pa.Table.from_pylist(rows, schema=images_schema(DIM, "float32", "m"))


def _fragments(table: FencedTable, ids: list[str]) -> list[FragmentMetadata]:
    """Fragment files of these rows, written as a worker writes them: not yet part of any version."""
    return write_fragments(_images(ids), table.uri, schema=table.ds.schema, storage_options=table.options)


def _images_table(cfg: OutputConfig) -> FencedTable:
    tables = OutputTables(cfg, "m", DIM)
    tables.fence()
    return tables.images


def test_a_commit_s3_refuses_is_retried_with_backoff_then_fails_naming_the_503(s3_server, caplog):
    bucket = "retry-bucket"
    boto3.client(
        "s3", endpoint_url=s3_server, aws_access_key_id=KEY, aws_secret_access_key=SECRET, region_name=REGION
    ).create_bucket(Bucket=bucket)
    with FaultProxy(s3_server, fail=1.0) as proxy:
        proxy.faulty = False
        options = {
            "aws_endpoint": proxy.endpoint,
            "allow_http": "true",
            "aws_region": REGION,
            "aws_access_key_id": KEY,
            "aws_secret_access_key": SECRET,
            "client_max_retries": "0",  # Lance's own per-request retries off: each try is one request
        }
        cfg = OutputConfig(
            uri=f"s3://{bucket}/db", storage_options=options, commit_attempts=3, commit_backoff_seconds=0.5
        )
        table = _images_table(cfg)
        fragments = _fragments(table, ["s/a", "s/b"])
        version = table.version
        proxy.faulty = True
        with (
            caplog.at_level(logging.WARNING, "icar.write"),
            pytest.raises(Exception, match=r"\b50[03]\b"),
        ):
            table.append(fragments)
        warnings = [r.getMessage() for r in caplog.records if r.name == "icar.write"]
        waits = [w.split("retrying in ")[1].split(" s:")[0] for w in warnings]
        assert waits == ["0.5", "1.0"]  # doubled each time
        assert [w[:31] for w in warnings] == [
            "commit failed (try 1 of 3), ret",
            "commit failed (try 2 of 3), ret",
        ]
        assert table.version == version  # nothing it believes committed

        proxy.faulty = False  # S3 back: the same fragments commit, once
        table.append(fragments)
        assert table.version == version + 1
        assert_exactly_once(lance_table(cfg.uri, "images", **options)["id"].to_pylist(), ["s/a", "s/b"])


def test_an_append_whose_answer_was_lost_is_retried_without_appending_its_fragments_twice(
    tmp_path, monkeypatch
):
    cfg = OutputConfig(uri=str(tmp_path / "db"), commit_backoff_seconds=0)
    table = _images_table(cfg)
    table.append(_fragments(table, ["before"]))
    fragments = _fragments(table, ["s/a", "s/b", "s/c"])
    commit, calls = lance.LanceDataset.commit, []

    def commit_then_lose_the_answer(*args, **kwargs):
        landed = commit(*args, **kwargs)  # committed...
        calls.append(landed.version)
        if len(calls) == 1:
            raise OSError("error sending request: connection reset by peer")  # ...but the answer never came
        return landed

    monkeypatch.setattr(lance.LanceDataset, "commit", staticmethod(commit_then_lose_the_answer))
    version = table.version
    table.append(fragments)

    assert calls == [version + 1]  # the second try found the first one's version and committed nothing
    assert table.version == version + 1  # ...and the table stands at it: the next commit builds on it
    assert_exactly_once(lance_table(cfg.uri, "images")["id"].to_pylist(), ["before", "s/a", "s/b", "s/c"])
    table.append(_fragments(table, ["s/d"]))
    assert_exactly_once(
        lance_table(cfg.uri, "images")["id"].to_pylist(), ["before", "s/a", "s/b", "s/c", "s/d"]
    )


@pytest.mark.parametrize(
    "bad",
    [
        pa.table({"x": [1]}),  # Lance: OSError, "Append with different schema ... unexpected=[x]"
        pa.table({"id": ["a"], "vector": pa.array([[1.0, 2.0]], pa.list_(pa.float32(), 2))}),  # wrong dim
    ],
    ids=["unknown-column", "wrong-vector-size"],
)
def test_a_schema_error_fails_at_the_first_try(tmp_path, bad):
    table = _images_table(OutputConfig(uri=str(tmp_path / "db"), commit_attempts=5))
    tries = []

    def commit(attempt: int) -> None:
        tries.append(attempt)
        table.append_rows(bad)

    with pytest.raises(OSError, match="different schema"):
        table._retry(commit)
    assert tries == [1]
    assert table.ds.count_rows() == 0


def test_a_delete_naming_an_unknown_column_fails_at_the_first_try(tmp_path, caplog):
    table = _images_table(OutputConfig(uri=str(tmp_path / "db"), commit_attempts=5))
    table.append(_fragments(table, ["s/a"]))
    with caplog.at_level(logging.WARNING, "icar.write"), pytest.raises(Exception, match="nope"):
        table.delete("nope = 1")
    assert [r for r in caplog.records if r.name == "icar.write"] == []  # never retried
    assert table.ds.count_rows() == 1


@pytest.mark.parametrize(
    ("error", "transient"),
    [
        (
            RuntimeError(
                "Generic S3 error: ... retry_timeout: 180s - non-2xx status code: 503 Service Unavailable"
            ),
            True,
        ),
        (RuntimeError("Generic S3 error: ... 500 Internal Server Error: <Code>InternalError</Code>"), True),
        (
            OSError("error sending request for url: tcp connect error: Connection refused (os error 111)"),
            True,
        ),
        (OSError("operation timed out"), True),
        (
            RuntimeError("Generic S3 error: ... retry_timeout: 180s - non-2xx status code: 403 Forbidden"),
            False,
        ),
        (
            RuntimeError("lost the lease on table 'images' (this job stalled past output.lease_seconds=600)"),
            False,
        ),
        (ValueError("Invalid input, cannot cast field 'vector' ... connection reset"), False),
        (RuntimeError("LanceError(Internal error): vector column has 500 rows of another size"), False),
        (OSError("Append with different schema: fields did not match, unexpected=[x]"), False),
    ],
)
def test_only_object_store_failures_that_may_pass_are_transient(error, transient):
    assert is_transient(error) is transient
