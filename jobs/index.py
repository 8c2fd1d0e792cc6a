"""Ray job entrypoint for the indexing job.

    ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/index.py --config my-index.yaml

Inside a submitted job Ray sets RAY_ADDRESS, so the job joins that cluster; run directly, it starts an
embedded local Ray (same as `icar index`). Exit status: 0 ok, 1 when a shard failed, 2 on bad config.
"""

from __future__ import annotations

import sys

from pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main(["index", *sys.argv[1:]]))
