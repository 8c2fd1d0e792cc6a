"""`icar tune`: exit heads and tuned tails for any allow-listed open_clip ViT, distilled on the user's own
shards to the model's own full-depth embeddings, then routes calibrated for them.

request.py (what to tune) -> data.py (the user's images and their targets) -> run.py (the stages, with
checkpoints and costs) -> worker.py (the one Ray training worker) -> cli.py (the command, calibration).
"""
