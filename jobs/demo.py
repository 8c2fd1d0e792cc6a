"""`make demo`: index a generated scene corpus with the embedded model and its calibrated router into a
local LanceDB table, then show what a few text queries return.

    python jobs/demo.py [--images 1000] [--out .demo]

Rerunning is cheap: the corpus is kept, and shards already indexed are skipped (exactly-once resume).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from icar_lab.scenes.shards import write_corpus
from pipeline.alias import resolve
from pipeline.config import ConfigError, IndexConfig, load_config
from pipeline.job import run_index
from pipeline.progress import Progress, StderrFilter
from pipeline.query import Searcher
from pipeline.summary import RunSummary

QUERIES = [
    "a red circle on a plain background",
    "a large blue star on a checkerboard background",
    "two shapes on a stripes background: a green square and a yellow triangle",
    "many shapes on a noise background, the largest a purple hexagon",
]


def index(cfg: IndexConfig) -> RunSummary:
    progress = Progress()
    with StderrFilter():  # as `icar index` does: Ray's one known native line is dropped
        summary = run_index(cfg, progress)
    progress.close()
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--shard-size", type=int, default=250)
    parser.add_argument("--out", default=".demo")
    parser.add_argument("-k", type=int, default=3)
    args = parser.parse_args()

    corpus = Path(args.out) / "corpus"
    if not any(corpus.glob("*.parquet")):
        print(f"writing {args.images} scenes to {corpus}")
        write_corpus(corpus, seed=0, split="demo", num_images=args.images, shard_size=args.shard_size)
    overrides = [f"input.paths={json.dumps([str(corpus)])}", f"output.uri={Path(args.out) / 'lancedb'}"]
    cfg = load_config(None, overrides)  # the embedded model with its shipped calibrated routes
    try:
        summary = index(cfg)
    except ConfigError as exc:  # a demo table of another model or router identity: it is disposable
        print(f"{cfg.output.uri}: {exc}\nthe demo table is rebuilt from scratch")
        shutil.rmtree(cfg.output.uri)
        summary = index(cfg)
    print("\n" + summary.render() + "\n")

    searcher = Searcher.open(cfg)
    for text in QUERIES:
        print(f'query: "{text}"')
        for rank, row in enumerate(searcher.search(searcher.embed_text([text]), k=args.k), 1):
            print(f"  {rank}. {row['score']:.3f}  {row['caption']}  [{row['route']}]")
    table = f"{cfg.output.uri}/{resolve(cfg.output).table}.lance"
    print(f"\ntable: {table} — try: icar query 'a pink cross' --output {cfg.output.uri}")
    print(f"search page: icar serve --output {cfg.output.uri}, then open http://127.0.0.1:8000/")


if __name__ == "__main__":
    main()
