"""The GPU bench, prepared for one CUDA GPU (sized to finish within 8 minutes on one H100):

1. encoder A/B for ViT-B-32, ViT-B-16 and ViT-L-14 (random weights, fp16 autocast): open_clip's
   `encode_image` against the adaptive encoder at full depth and on each shipped merge schedule, the
   candidates timed in alternating rounds on the same images (icar_lab.timing: speedups are medians of
   same-round ratios);
2. `icar tune` on ViT-L-14 (random weights) for about 200 optimizer steps on rendered scenes, through the
   same Ray task the command runs (one GPU), reporting its cost summary.

    make bench-gpu            # python jobs/bench_gpu.py [--out results/bench/gpu.json]

Writes one JSON file naming the device. Without CUDA it refuses and writes nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import ray
import torch

from icar_lab.catalogue import FULL, SHIPPED_TAIL_SCHEDULES, merge_schedule
from icar_lab.outputs import output_path
from icar_lab.scenes.shards import write_corpus
from icar_lab.timing import alternate, paired_speedup, throughput
from icar_lab.training.heads import HeadSettings
from icar_lab.training.tails import TailSettings
from icar_lab.tune.request import TuneRequest
from icar_lab.tune.worker import tune_on_ray
from pipeline.config import ModelConfig
from pipeline.encode.model import LoadedModel, load_model, normalize_uint8
from pipeline.encode.routed import RoutedEncoder

MODELS = {"ViT-B-32": 256, "ViT-B-16": 256, "ViT-L-14": 128}  # model -> batch size
IMAGES = 1024  # per model, timed each round
ROUNDS = 5
TUNE_MODEL, TUNE_IMAGES, TUNE_STEPS = "ViT-L-14", 1024, 200


@contextmanager
def fp16():
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16):
        yield


def encoder_rounds(loaded: LoadedModel, batch_size: int, log) -> dict:
    """Images/s of encode_image and of each route, and each route's same-round speedup over it."""
    routes = [FULL, *(merge_schedule(s, tuned=False) for s in SHIPPED_TAIL_SCHEDULES)]
    encoder = RoutedEncoder(loaded, routes, device="cuda")
    size = loaded.preprocess.size
    images = np.random.default_rng(0).integers(0, 256, (IMAGES, *size, 3), dtype=np.uint8)
    batches = [images[i : i + batch_size] for i in range(0, IMAGES, batch_size)]

    def baseline() -> None:
        with fp16():
            for b in batches:
                x = normalize_uint8(torch.from_numpy(b).to("cuda"), loaded.mean, loaded.std)
                loaded.model.encode_image(x, normalize=True).float().cpu()  # the copy waits for the GPU

    def routed(route_id: int):
        def run() -> None:
            with fp16():
                for b in batches:
                    encoder.encode(b, np.full(len(b), route_id))

        return run

    calls = {"encode_image": baseline, **{r.name: routed(i) for i, r in enumerate(routes)}}
    seconds = alternate(calls, ROUNDS, warmup=2)
    log(f"{loaded.model_id}: " + ", ".join(f"{k} {IMAGES / min(v):.0f} img/s" for k, v in seconds.items()))
    return {
        name: {
            "images_per_second": throughput(times, IMAGES),
            "speedup_vs_encode_image": paired_speedup(seconds["encode_image"], times),
        }
        for name, times in seconds.items()
    }


def tune_steps(log) -> dict:
    """About TUNE_STEPS optimizer steps of `icar tune` (heads, then one tail) on rendered scenes."""
    train = TUNE_IMAGES - round(TUNE_IMAGES * TuneRequest.heldout_share)
    per_epoch = math.ceil(train / HeadSettings.batch_size) + math.ceil(train / TailSettings.batch_size)
    epochs = math.ceil(TUNE_STEPS / per_epoch)
    with tempfile.TemporaryDirectory() as tmp:
        write_corpus(Path(tmp) / "scenes", seed=0, split="heads", num_images=TUNE_IMAGES, shard_size=256)
        request = TuneRequest(
            model=TUNE_MODEL, pretrained=None, inputs=[str(Path(tmp) / "scenes")], out=str(Path(tmp) / "out"),
            schedules=[SHIPPED_TAIL_SCHEDULES[-1]], images=TUNE_IMAGES, epochs=epochs,
        )  # fmt: skip
        started = time.perf_counter()
        summary = tune_on_ray(request)
        seconds = time.perf_counter() - started
    log(f"tune {TUNE_MODEL}: {epochs * per_epoch} steps in {seconds:.0f} s")
    return {"steps": epochs * per_epoch, "epochs": epochs, "wall_seconds": seconds,
            "cost": summary["cost"], "precision": summary["precision"]}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="results/bench/gpu.json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_gpu: no CUDA device here; this bench runs on one NVIDIA GPU only", file=sys.stderr)
        return 2
    out = output_path(args.out)

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "encoders": {}}
    for name, batch_size in MODELS.items():
        loaded = load_model(ModelConfig(name=name), pretrained=False)
        points = encoder_rounds(loaded, batch_size, log)
        result["encoders"][name] = {"batch_size": batch_size, "points": points}
        del loaded
        torch.cuda.empty_cache()
    ray.init(num_gpus=1, include_dashboard=False)
    result["tune"] = tune_steps(log)
    out.write_text(json.dumps(result, indent=2) + "\n")
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
