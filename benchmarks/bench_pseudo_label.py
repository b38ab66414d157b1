"""Benchmark CaSP's pseudo-labeling stage (``detect-pseudo-label``, sec. 3.1) at 1x and 10x the images.

Each run is the real stage (``python -m trainers detect-pseudo-label``, one rank, the shard map, shards written and
published) in a child process on a PartWorld split at the demo size (112 px). Reported per scale, median of
``--repeats`` runs: images/s (the stage's own ``pseudo/images_per_s``: wall time of its labeling loop), the share of
that time spent outside the detector's forward pass (``pseudo/share_outside_forward``; goal <= 10%), bytes per
pseudo-labeled sample of the published dataset, and the peak resident memory of the stage process (``wait4``
rusage; goal: flat from 1x to 10x, as the stage streams shards). The 1x figures are the baseline of the 10x ones
(ratio printed beside them).

The detector is ``--detector <segmenter file>`` (e.g. a demo run's ``early-pretrain/model.pt``) or, without one, the
demo's default Segmenter architecture at random init with delta 0 (every top-k prediction kept: the write path is
exercised at its full size; the forward pass costs the same as a trained model's).

    python benchmarks/bench_pseudo_label.py                       # 64 and 640 images, 3 repeats
    python benchmarks/bench_pseudo_label.py --images 128 --repeats 5 --detector ../.selftrain/runs/<run>/early-pretrain/model.pt
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def make_images(out: Path, count: int) -> Path:
    from trainers.data.partworld import PartWorldConfig, category_table, generate
    from trainers.data.shards import write_dataset

    world = PartWorldConfig.demo()
    write_dataset(generate(world, "train", 0, count), out, name="bench-pseudo", split="train", categories=category_table(world), shard_size=64)
    return out


def make_detector(path: Path, num_classes: int = 1) -> Path:
    import torch

    from trainers.models.io import save_segmenter
    from trainers.models.presets import teacher_config
    from trainers.models.segmenter import Segmenter

    torch.manual_seed(0)
    cfg = teacher_config({}, num_classes)
    return save_segmenter(path, cfg, Segmenter(cfg).state_dict())


def run_stage(images: Path, detector: Path, work: Path, delta: float, batch_size: int) -> dict:
    """The stage in a child process (world of one); its metrics plus the child's peak RSS."""
    from contract.io import free_port
    from contract.spec import StageSpec

    spec = StageSpec.model_validate({
        "stage": "detect-pseudo-label", "name": "bench-pseudo-label",
        "inputs": {"datasets": {"images": {"path": str(images)}}, "models": {"detector": {"uri": str(detector)}}},
        "outputs": {"workdir": str(work / "work"), "dataset": str(work / "pseudo")},
        "params": {"delta": delta, "batch_size": batch_size},
        "resources": {"nproc_per_node": 1},
        "tracking": {"mlflow_uri": f"sqlite:///{work / 'unused.db'}"},
    })
    env = {**os.environ, "SELFTRAIN_SPEC": spec.to_json(), "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "TQDM_DISABLE": "1", "PYTHONPATH": str(REPO),
           "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "trainers", "detect-pseudo-label", "--spec", "env:SELFTRAIN_SPEC"],
                            env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"detect-pseudo-label failed ({proc.returncode}):\n{output.decode(errors='replace')[-4000:]}")
    metrics = json.loads((work / "work" / "result.json").read_text())["metrics"]
    return {"images_per_s": metrics["pseudo/images_per_s"], "share_outside_forward": metrics["pseudo/share_outside_forward"],
            "bytes_per_sample": metrics["pseudo/bytes_per_sample"], "labels": metrics["pseudo/labels"],
            "images": metrics["pseudo/images"], "peak_rss_mb": usage.ru_maxrss / 1024}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=64, help="images at 1x (10x runs ten times as many)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--detector", help="a segmenter file (default: the demo architecture at random init, delta 0)")
    ap.add_argument("--delta", type=float, help="score threshold (default: 0.2 with --detector, 0 without)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("-o", "--out", default=str(REPO / "benchmarks" / "results" / "bench_pseudo_label.json"))
    args = ap.parse_args()
    delta = args.delta if args.delta is not None else (0.2 if args.detector else 0.0)
    rows = {}
    with tempfile.TemporaryDirectory(prefix="bench-pseudo-") as tmp:
        tmp = Path(tmp)
        detector = Path(args.detector) if args.detector else make_detector(tmp / "detector.pt")
        for scale in (1, 10):
            images = make_images(tmp / f"images-{scale}x", args.images * scale)
            runs = []
            for r in range(args.repeats):
                work = tmp / f"run-{scale}x-{r}"
                runs.append(run_stage(images, detector, work, delta, args.batch_size))
                print(f"{scale}x run {r + 1}/{args.repeats}: {runs[-1]}", file=sys.stderr)
            rows[f"{scale}x"] = {k: statistics.median(x[k] for x in runs) for k in runs[0]}
    base = rows["1x"]
    lines = [f"detect-pseudo-label, {platform.machine()} {os.cpu_count()} cores, one rank, median of {args.repeats}; "
             f"detector: {args.detector or 'demo architecture, random init'}; delta {delta:g}",
             "| scale | images | images/s | share outside forward | bytes/sample | peak RSS (MB) |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, v in rows.items():
        ratio = lambda k: "" if name == "1x" else f" ({v[k] / base[k]:.2f}x)"  # noqa: E731
        lines.append(f"| {name} | {int(v['images'])} | {v['images_per_s']:.1f}{ratio('images_per_s')} | "
                     f"{100 * v['share_outside_forward']:.1f}% | {v['bytes_per_sample']:.0f} | "
                     f"{v['peak_rss_mb']:.0f}{ratio('peak_rss_mb')} |")
    print("\n".join(lines))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    from contract.io import write_json

    write_json(args.out, {"delta": delta, "detector": args.detector, "repeats": args.repeats, "rows": rows})


if __name__ == "__main__":
    main()
