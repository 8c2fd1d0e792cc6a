"""The lab: how the runtime's numbers are made (scenes, held-out sets, training, quality, calibration,
benchmarks). It imports the runtime; the runtime (`pipeline.*` outside this package) never imports it,
and nothing here writes into the installed package: every job takes an output path."""
