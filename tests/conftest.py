"""Shared real components: a local Ray, a moto S3 server, generated scene shards, configs."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import lancedb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/imagefactory.py
# open_clip configs of architectures made for tests (tiny-vit-b16: ViT-B-16's patch and resolution, 4
# narrow blocks), known to this process and to every Ray worker (pipeline.encode.model reads the variable)
TEST_MODEL_CONFIGS = Path(__file__).parent / "model_configs"
os.environ["ICAR_MODEL_CONFIGS"] = str(TEST_MODEL_CONFIGS)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole session (2 CPUs, like the machine); its workers inherit the tests'
    model configs through the environment."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False)
    yield ray
    ray.shutdown()


def lance_s3_options(endpoint: str) -> dict[str, str]:
    """LanceDB storage options for moto's server at `endpoint` (moto accepts any credentials)."""
    return {
        "aws_endpoint": endpoint,
        "allow_http": "true",
        "aws_access_key_id": "testing",
        "aws_secret_access_key": "testing",
        "aws_region": "us-east-1",
    }


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 API (moto's threaded server), as s3fs's own tests use; credentials via env vars."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_REGION="us-east-1")
    yield endpoint
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def scene_shards(tmp_path_factory) -> Path:
    """Three img2dataset-style shards of 24 rendered scenes each (two row groups per shard)."""
    from icar_lab.scenes.shards import write_corpus

    out = tmp_path_factory.mktemp("scenes")
    write_corpus(out, seed=7, split="fixture", num_images=72, shard_size=24)
    return out


def index_config(input_paths: list[str], output_uri: str, *overrides: str):
    """A small-batch job config; full depth (so embeddings equal encode_image) unless a router is given."""
    from pipeline.config import load_config

    router = [] if any(o.startswith("router.") for o in overrides) else ['router.routes=[{"name": "full"}]']
    return load_config(
        None,
        [
            f"input.paths={input_paths!r}",
            f"output.uri={output_uri}",
            "encoder.batch_size=16",
            "ray.decode_batch_size=8",
            *router,
            *overrides,
        ],
    )


def lance_table(uri: str, name: str, **storage) -> pa.Table:
    """A LanceDB table read back whole, for assertions; a manifest (an append-only log) as the state of
    each shard: its row with the highest `seq`."""
    table = lancedb.connect(uri, storage_options=storage or None).open_table(name).to_arrow()
    if not name.endswith("_manifest"):
        return table
    latest = {(r["dataset"], r["shard"]): r for r in table.sort_by("seq").to_pylist()}
    return pa.Table.from_pylist(list(latest.values()), schema=table.schema)


def input_ids(shard_dir: Path) -> list[str]:
    """The row ids the pipeline must write for a folder of shards: `<file name>/<key>`."""
    ids = []
    for path in sorted(shard_dir.glob("*.parquet")):
        keys = pq.read_table(path, columns=["key"]).column("key").to_pylist()
        ids += [f"{path.name}/{key}" for key in keys]
    return ids
