"""Rewrite the README's measured numbers from the latest results files (run after bench or frontier).

python jobs/readme.py            # rewrite README.md in place
python jobs/readme.py --check    # exit 1 when README.md is stale (what the tests check)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from icar_lab.readme import update

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--check", action="store_true", help="only report whether README.md is up to date")
    args = parser.parse_args()
    path = ROOT / "README.md"
    current = path.read_text()
    fresh = update(current, ROOT / "results")
    if args.check:
        if fresh != current:
            print("README.md is stale: run python jobs/readme.py", file=sys.stderr)
            return 1
        return 0
    path.write_text(fresh)
    return 0


if __name__ == "__main__":
    sys.exit(main())
