"""The lab: how the runtime's numbers are made (scenes, held-out sets, training, quality, calibration,
benchmarks), and `icar tune`, which makes exit heads and tuned tails for a user's own model. It imports
the runtime; the runtime (`pipeline`) never imports it, and nothing here writes into the installed
runtime: every job takes an output path. One-off studies that use it live apart, in `lab/studies/`."""
