"""`icar calibrate` as a script (same arguments; see `icar calibrate --help`).

    python jobs/make_corpus.py --out .demo/calib --split calib --images 2000
    python jobs/calibrate.py --input .demo/calib --out results/routes.yaml
    python jobs/calibrate.py --input .demo/calib --out results/routes-budget.yaml --max-gflops 0.2

Writes the routes YAML (model: + router:), its report (<out>.report.json) and, when a learned scorer
routes, <out>.scorer.json beside it. The shipped pipeline/models/icar-tiny-vit.routes.yaml is read-only
package data: replacing it with a new calibration is a deliberate copy.
"""

from __future__ import annotations

import sys

from pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main(["calibrate", *sys.argv[1:]]))
