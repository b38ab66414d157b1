"""Benchmark the input size (issue 11 item 5): one model's inference on 512 px images as stored vs at min_size 128
(``trainers.data.batches.AtInputSize``: resized on the way in, masks answered at 512 px), in the same process.

One thread (torch, OpenMP/BLAS), so figures are per core; median of ``--repeats`` runs (>= 3) of ``predict`` on a
batch of ``--images`` images of the dataset. Prints a markdown table (seconds per image, ratio native / resized).

    python benchmarks/bench_input_size.py MODEL.pt DATASET --min-size 128
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_v] = "1"


def main() -> None:
    import torch

    from trainers.data.batches import AtInputSize, InputSize, images_to_tensor, iter_batches
    from trainers.models.io import load_segmenter

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("dataset")
    ap.add_argument("--min-size", type=int, default=128)
    ap.add_argument("--max-size", type=int, default=None)
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    torch.set_num_threads(1)
    _, images, _ = next(iter_batches(a.dataset, a.images, allow_parts=True))
    x = images_to_tensor(images)
    model = load_segmenter(a.model)
    variants = {"as stored": model, f"min_size {a.min_size}": AtInputSize(model, InputSize(a.min_size, a.max_size))}
    rows = {}
    for name, m in variants.items():
        m.predict(x)  # warm-up
        times = []
        for _ in range(max(3, a.repeats)):
            t0 = time.perf_counter()
            preds = m.predict(x)
            times.append(time.perf_counter() - t0)
        rows[name] = (statistics.median(times) / len(images), tuple(preds[0].masks.shape[-2:]))
    base = rows["as stored"][0]
    print(f"| input ({tuple(x.shape[-2:])} px images) | s / image | masks at | native / this |")
    print("| --- | ---: | --- | ---: |")
    for name, (t, shape) in rows.items():
        print(f"| {name} | {t:.3f} | {shape[0]}x{shape[1]} | {base / t:.1f}x |")


if __name__ == "__main__":
    main()
