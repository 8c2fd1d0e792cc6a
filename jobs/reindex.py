"""Ray job entrypoint for the nightly reindex (what infra/nightly-cronjob.yaml runs).

    ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/reindex.py --config my-index.yaml

New shards are indexed, changed ones replaced, removed ones deleted; then compaction, vector-index
maintenance and version pruning; a JSON + markdown report goes to <output.uri>/_reports/. Exit status:
0 ok, 1 a shard failed, 2 bad config (or a refused mass removal), 3 another job holds the table.
"""

from __future__ import annotations

import sys

from pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main(["reindex", *sys.argv[1:]]))
