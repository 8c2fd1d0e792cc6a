"""The writer's commits ride out a transient object-store failure (bounded, with backoff) and fail at once
on anything else; a retried append never duplicates a row whose first commit went through.

tests/test_faults.py runs the whole job through an S3 outage; these are the writer's own rules."""

from __future__ import annotations

import logging

import boto3
import pyarrow as pa
import pytest
from conftest import lance_table
from faults import FaultProxy
from processes import assert_exactly_once

from pipeline.config import OutputConfig
from pipeline.write import LanceWriter, images_schema, is_transient

DIM = 4
KEY = SECRET = "testing"
REGION = "us-east-1"


def _images(ids: list[str], shard: str = "s") -> pa.Table:
    rows = [{"id": i, "shard": shard, "key": i, "vector": [0.0] * DIM, "model_id": "m"} for i in ids]
    return pa.Table.from_pylist(rows, schema=images_schema(DIM, "float32"))


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
        writer = LanceWriter(cfg, "m", DIM)
        proxy.faulty = True
        with caplog.at_level(logging.WARNING, "icar.write"), pytest.raises(RuntimeError, match=r"\b50[03]\b"):
            writer.put_part("s", _images(["s/a", "s/b"]), pa.table({}), "append")
        warnings = [r.getMessage() for r in caplog.records if r.name == "icar.write"]
        waits = [w.split("retrying in ")[1].split(" s:")[0] for w in warnings]
        assert waits == ["0.5", "1.0"]  # doubled each time
        assert [w[:31] for w in warnings] == [
            "commit failed (try 1 of 3), ret",
            "commit failed (try 2 of 3), ret",
        ]

        proxy.faulty = False  # S3 back: the same part commits, once
        writer.put_part("s", _images(["s/a", "s/b"]), pa.table({}), "append")
        assert_exactly_once(lance_table(cfg.uri, "images", **options)["id"].to_pylist(), ["s/a", "s/b"])


def test_an_append_whose_answer_was_lost_is_retried_as_an_upsert_not_a_second_append(tmp_path):
    writer = LanceWriter(OutputConfig(uri=str(tmp_path / "db"), commit_backoff_seconds=0), "m", DIM)
    add, calls = writer.images.add, []

    def add_then_lose_the_answer(rows, *args, **kwargs):
        calls.append(rows.num_rows)
        add(rows, *args, **kwargs)  # committed...
        raise OSError("error sending request: connection reset by peer")  # ...but the answer never came

    writer.images.add = add_then_lose_the_answer
    writer.put_part("s", _images(["s/a", "s/b", "s/c"]), pa.table({}), "append")
    assert calls == [3]  # the second try did not append
    assert_exactly_once(lance_table(str(tmp_path / "db"), "images")["id"].to_pylist(), ["s/a", "s/b", "s/c"])


@pytest.mark.parametrize(
    "bad",
    [
        pa.table({"x": [1]}),  # LanceDB: ValueError, field 'x' does not exist in table schema
        pa.table({"id": ["a"], "vector": pa.array([[1.0, 2.0]], pa.list_(pa.float32(), 2))}),  # wrong dim
    ],
    ids=["unknown-column", "wrong-vector-size"],
)
def test_a_schema_error_fails_at_the_first_try(tmp_path, bad):
    writer = LanceWriter(OutputConfig(uri=str(tmp_path / "db"), commit_attempts=5), "m", DIM)
    tries = []

    def commit(attempt: int) -> None:
        tries.append(attempt)
        writer.images.add(bad)

    with pytest.raises(ValueError):
        writer._commit(commit)
    assert tries == [1]


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
    ],
)
def test_only_object_store_failures_that_may_pass_are_transient(error, transient):
    assert is_transient(error) is transient
