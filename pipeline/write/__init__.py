"""Stage 5, the write path: rows written where they were embedded, made visible by the driver in rounds.

plan (job.py) -> stream (stream.py) -> write fragments on the workers (`fragments`) -> collect whole shards
in the driver (`collect`) -> commit them in rounds (`commit`) through fenced tables (`fenced`) -> record
them in the shard manifest (`manifest`). `output` opens an alias's three tables; `schema` defines them.
Only fragment metadata, counts and timings cross from the workers to the driver.
"""
