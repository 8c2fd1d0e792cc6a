"""`icar`: index shards, query or serve the table, build its indexes. Every command takes --config and --set.

Other packages add commands through the `icar.commands` entry-point group (a `register(subparsers)`
function); that is how the lab's `icar calibrate` joins without the runtime importing the lab.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from importlib.metadata import entry_points
from typing import Any

from pipeline.config import ConfigError, IndexConfig, load_config

EXIT_BUSY = 3  # another job holds the output table (or took it over): nothing of this run was lost


def _config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config file (fields: docs/configuration.md)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="override one config field, e.g. --set encoder.batch_size=128 (repeatable)",
    )
    parser.add_argument("--input", nargs="+", help="shorthand for input.paths")
    parser.add_argument("--output", help="shorthand for output.uri (LanceDB directory or s3:// URI)")


def config_from_args(args: argparse.Namespace) -> IndexConfig:
    overrides = list(args.overrides)
    if getattr(args, "keep_removed", False):
        overrides.append("reindex.delete_removed=false")
    if getattr(args, "no_thumbnails", False):
        overrides.append("output.thumbnail_side=0")
    if getattr(args, "host", None):
        overrides.append(f"serve.host={json.dumps(args.host)}")
    if getattr(args, "port", None) is not None:
        overrides.append(f"serve.port={args.port}")
    if getattr(args, "input", None):
        overrides.append(f"input.paths={json.dumps(args.input)}")
    if getattr(args, "output", None):
        overrides.append(f"output.uri={json.dumps(args.output)}")
    return load_config(args.config, overrides)


def _run_job(args: argparse.Namespace, job_name: str) -> Any:
    """Run the job `pipeline.<job_name>`(cfg, progress, verbose=, wait=) with one progress line and Ray's
    known noise filtered (all of it shown with --verbose). Returns None when another job holds the table
    (message printed). Ray starts while the job's modules import on another thread (about 4 s and 3 s
    on a 2-core machine, measured, and they barely compete for a core)."""
    from pipeline.cluster import init_ray
    from pipeline.lease import LeaseLost, OutputBusy
    from pipeline.progress import Progress, StderrFilter

    cfg = config_from_args(args)
    if not cfg.input.paths:
        raise ConfigError("input.paths is empty: pass --input PATH... or set it in the config")
    module, function = job_name.rsplit(".", 1)
    with ThreadPoolExecutor(1) as pool:
        imported = pool.submit(importlib.import_module, f"pipeline.{module}")
        init_ray(cfg, args.verbose)
        job = getattr(imported.result(), function)
    progress = Progress(verbose=args.verbose)
    try:
        with contextlib.nullcontext() if args.verbose else StderrFilter():
            return job(cfg, progress, verbose=args.verbose, wait=args.wait)
    except (OutputBusy, LeaseLost) as exc:
        progress.close()  # end the progress line before the message
        print(f"icar: {exc}", file=sys.stderr)
        return None
    finally:
        progress.close()


def cmd_index(args: argparse.Namespace) -> int:
    summary = _run_job(args, "job.run_index")
    if summary is None:
        return EXIT_BUSY
    print(summary.render())
    return 1 if summary.shards_failed else 0


def cmd_reindex(args: argparse.Namespace) -> int:
    report = _run_job(args, "reindex.run_reindex")
    if report is None:
        return EXIT_BUSY
    print(report.markdown())
    print(f"report: {report.paths[0]}")
    return 1 if report.summary["shards_failed"] else 0


def _print_results(rows: list[dict]) -> None:
    for rank, row in enumerate(rows, 1):
        print(
            f"{rank:>3}. {row['score']:.3f}  {row['caption']!s:<70}  [{row['route']}, "
            f"{row['gflops']:.2f} GFLOPs]  {row['id']}"
        )


def cmd_query(args: argparse.Namespace) -> int:
    from pipeline.query import Searcher

    cfg = config_from_args(args)
    searcher = Searcher.open(cfg)
    searcher.check_model()
    vector = None
    if args.mode != "text":
        vector = searcher.embed_image(args.image) if args.image else searcher.embed_text([args.text])
    rows = searcher.search(vector, k=args.k, where=args.where, text=args.text, mode=args.mode)
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
    else:
        _print_results(rows)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from pipeline.serve.app import create_app
    except ImportError as exc:
        print(f"icar: serve needs pip install 'icar-pipeline[serve]' ({exc})", file=sys.stderr)
        return 2
    cfg = config_from_args(args)
    app = create_app(cfg)  # refuses an exposed host without a token, then loads the model and table
    print(
        f"icar: serving {cfg.output.uri} table {cfg.output.table!r} on http://{cfg.serve.host}:{cfg.serve.port}"
        f" (answering Host: {', '.join(cfg.serve.allowed_hosts)})"
    )
    uvicorn.run(app, host=cfg.serve.host, port=cfg.serve.port, log_level="warning")
    return 0


def cmd_build_index(args: argparse.Namespace) -> int:
    from pipeline.query import build_indexes

    info = build_indexes(config_from_args(args), args.partitions, args.sub_vectors)
    print(json.dumps(info))
    tuned = info["search"]
    if tuned:
        verdict = "reaches" if tuned["reached"] else "best found; does NOT reach"
        print(
            f"search settings: nprobes {tuned['nprobes']}, refine_factor {tuned['refine_factor']} "
            f"(recall@10 {tuned['recall']:.3f}, {verdict} target {tuned['target']:g}; p50 "
            f"{tuned['p50_ms']:.1f} ms over {tuned['queries']} of the table's rows), stored with the table",
            file=sys.stderr,
        )
    return 0


def _job_args(parser: argparse.ArgumentParser) -> None:
    """The options of the commands that run the indexing job (index, reindex)."""
    _config_args(parser)
    parser.add_argument(
        "--verbose", action="store_true", help="a line per shard plus Ray's and Ray Data's own logs"
    )
    parser.add_argument(
        "--wait",
        action="store_true",
        help="if another job is writing the table, wait for it (default: exit 3)",
    )
    parser.add_argument(
        "--no-thumbnails", action="store_true", help="store no thumbnails (output.thumbnail_side=0)"
    )


def _add_job_commands(sub: argparse._SubParsersAction) -> None:
    index = sub.add_parser(
        "index", help="index parquet shards into LanceDB (embedded Ray unless ray.address)"
    )
    _job_args(index)
    index.set_defaults(func=cmd_index)

    reindex = sub.add_parser(
        "reindex",
        help="the nightly run: index new and changed shards, delete removed ones, maintain, report",
    )
    _job_args(reindex)
    reindex.add_argument(
        "--keep-removed", action="store_true", help="keep the rows of shards no longer in the input"
    )
    reindex.set_defaults(func=cmd_reindex)


def _add_query_command(sub: argparse._SubParsersAction) -> None:
    query = sub.add_parser("query", help="search the table by text or by an image file")
    _config_args(query)
    query.add_argument("text", nargs="?", help="text query, e.g. 'a red circle on a plain background'")
    query.add_argument("--image", help="query by this image file instead of text")
    query.add_argument("-k", type=int, default=10, help="results to return (default 10)")
    query.add_argument("--where", help="SQL filter applied before the search, e.g. \"route = 'full'\"")
    query.add_argument(
        "--mode",
        choices=["vector", "text", "hybrid"],
        default="vector",
        help="vector (by embedding, default), text (full text on captions) or hybrid (both, rank-fused)",
    )
    query.add_argument("--json", action="store_true", help="print JSON rows")
    query.set_defaults(func=cmd_query)


def _check_query_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Exit with a usage error for a query whose text, image and mode do not fit together."""
    if not (args.text or args.image):
        parser.error("query needs a text or --image PATH")
    if args.mode != "vector" and not args.text:
        parser.error(f"--mode {args.mode} needs a text (its words search the captions)")
    if args.mode == "text" and args.image:
        parser.error("--mode text searches the captions only: drop --image, or use --mode hybrid")


def _add_table_commands(sub: argparse._SubParsersAction) -> None:
    serve = sub.add_parser("serve", help="the HTTP search API and page over the table (serve extra)")
    _config_args(serve)
    serve.add_argument("--host", help="shorthand for serve.host (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="shorthand for serve.port (default 8000)")
    serve.set_defaults(func=cmd_serve)

    build = sub.add_parser(
        "build-index",
        help="build the IVF_PQ vector index, tune its search settings on the table, FTS and scalar indexes",
    )
    _config_args(build)
    build.add_argument("--partitions", type=int, help="IVF partitions (default sqrt(rows))")
    build.add_argument("--sub-vectors", type=int, help="PQ sub-vectors (default dim/8)")
    build.set_defaults(func=cmd_build_index)


def _parser() -> argparse.ArgumentParser:
    """`icar` and its commands, those of the `icar.commands` entry points included."""
    parser = argparse.ArgumentParser(prog="icar", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_job_commands(sub)
    _add_query_command(sub)
    _add_table_commands(sub)
    for plugin in entry_points(group="icar.commands"):
        plugin.load()(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "query":
        _check_query_args(parser, args)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"icar: {exc}", file=sys.stderr)
        return 2


def script() -> int:
    """The `icar` console script: `main`, then an exit that skips the interpreter's final garbage
    collection of every torch, Ray and Lance object still alive (about 1.5 s on a 2-core machine,
    measured). Exit handlers still run (Ray shuts down in its own); the job has committed by then."""
    code = main()
    gc.freeze()
    return code


if __name__ == "__main__":
    sys.exit(script())
