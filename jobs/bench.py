"""`make bench` / `make bench-quick`: encoder speed, machine limit, pipeline efficiency, router cost,
query latency and serving, written to results/bench/ (<UTC>.json, latest.json, latest.md, PNG plots).
`python lab/studies/projection.py` projects the result to indexing LAION-2B on GPUs.

    python jobs/bench.py            # full: about 25 min on 2 cores, 1M-row query table
    python jobs/bench.py --quick    # < 3 min, 100k-row query table
    python jobs/bench.py --tiny     # seconds; what tests/test_bench.py runs

Timings are only meaningful on an otherwise idle machine; the JSON records the load average.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from icar_lab.bench.suite import run_suite


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="smaller sizes, < 3 minutes")
    size.add_argument("--tiny", action="store_true", help="a handful of images, 2k-row table (tests)")
    parser.add_argument("--out", default="results/bench", help="output directory")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all CPUs)")
    parser.add_argument(
        "--routed-config",
        help="routes YAML from `icar calibrate` (default: the embedded model's shipped one)",
    )
    parser.add_argument(
        "--frontier", default="results/frontier.json", help="jobs/frontier.py's JSON: quality per point"
    )
    args = parser.parse_args()
    mode = "quick" if args.quick else "tiny" if args.tiny else "full"
    routed = Path(args.routed_config) if args.routed_config else None
    result = run_suite(mode, Path(args.out), args.threads, routed, Path(args.frontier))
    print("\n" + "\n".join(f"- {text}" for text in result["answers"].values()))
    print(f"\nwrote {args.out}/latest.md and latest.json ({result['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
