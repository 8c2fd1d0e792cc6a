"""Benchmarks, one module per measurement (encoder, machine, pipeline_run, router, query, serve_load);
`suite.py` composes them at a named size and `report.py` writes the JSON, markdown and plots.
`jobs/bench.py` is the command line; `lab/studies/projection.py` projects its result to LAION-2B."""
