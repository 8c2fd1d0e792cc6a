"""Benchmarks, one module per measurement (encoder, machine, pipeline_run, router, query, projection);
`suite.py` composes them at a named size and `report.py` writes the JSON, markdown and plots.
`jobs/bench.py` is the command line."""
