"""Benchmark CaSP's pseudo-labeling stage (``detect-pseudo-label``, sec. 3.1) at 1x and 10x the images.

Each run is the real stage (``python -m trainers detect-pseudo-label``, one rank, the shard map, shards written and
published) in a child process on a PartWorld split at the demo size (112 px). Reported per scale, median of
``--repeats`` runs: images/s (the stage's own ``pseudo/images_per_s``: wall time of its labeling loop), the share of
that time spent outside the detector's forward pass (``pseudo/share_outside_forward``; goal <= 10%), bytes per
pseudo-labeled sample of the published dataset, and the peak resident memory of the stage process (``wait4``
rusage; goal: flat from 1x to 10x, as the stage streams shards). The 1x figures are the baseline of the 10x ones
(ratio printed beside them).

``--baseline-ref <git commit>`` runs the stage of that commit too (its ``contract/`` and ``trainers/`` extracted by
``git archive`` into a temporary folder), interleaved with the working tree's run by run, so both see the same load:
the before/after of a change to the labelling loop in one invocation, its ratio printed beside it.

The detector is ``--detector <segmenter file>`` (e.g. a demo run's ``early-pretrain/model.pt``) or, without one, the
demo's default Segmenter architecture at random init with delta 0 (every top-k prediction kept: the write path is
exercised at its full size; the forward pass costs the same as a trained model's).

    python benchmarks/bench_pseudo_label.py                       # 64 and 640 images, 3 repeats
    python benchmarks/bench_pseudo_label.py --images 128 --repeats 5 --detector ../.selftrain/runs/<run>/early-pretrain/model.pt
    python benchmarks/bench_pseudo_label.py --baseline-ref 8cb65f9 --repeats 5   # before/after, interleaved
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tarfile
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


def extract_ref(ref: str, out: Path) -> Path:
    """``contract/`` and ``trainers/`` of git commit ``ref`` in ``out`` (the code the stage runs for the baseline)."""
    out.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", "--format=tar", ref, "contract", "trainers"], cwd=REPO,
                             capture_output=True, check=False)
    if archive.returncode != 0:
        raise SystemExit(f"git archive {ref} failed: {archive.stderr.decode(errors='replace')}")
    with tarfile.open(fileobj=__import__("io").BytesIO(archive.stdout)) as tar:
        tar.extractall(out, filter="data")
    return out


def run_stage(images: Path, detector: Path, work: Path, delta: float, batch_size: int, code: Path = REPO,
              threads: int = 1) -> dict:
    """The stage in a child process (world of one) running the code in ``code``; its metrics plus the child's peak
    RSS."""
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
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "TQDM_DISABLE": "1", "PYTHONPATH": str(code),
           "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.Popen([sys.executable, "-m", "trainers", "detect-pseudo-label", "--spec", "env:SELFTRAIN_SPEC"],
                            env=env, cwd=code, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"detect-pseudo-label failed ({proc.returncode}):\n{output.decode(errors='replace')[-4000:]}")
    metrics = json.loads((work / "work" / "result.json").read_text())["metrics"]
    return {"images_per_s": metrics["pseudo/images_per_s"], "share_outside_forward": metrics["pseudo/share_outside_forward"],
            "bytes_per_sample": metrics["pseudo/bytes_per_sample"], "labels": metrics["pseudo/labels"],
            "images": metrics["pseudo/images"], "peak_rss_mb": usage.ru_maxrss / 1024,
            "forward_ms_per_image": 1000 * metrics["pseudo/forward_s"] / max(1.0, metrics["pseudo/images"]),
            # the labelling loop alone (the stage's wall time less its set-up): what an overlap can speed up
            "loop_images_per_s": metrics["pseudo/images"] / max(
                1e-9, metrics["pseudo/images"] / metrics["pseudo/images_per_s"] - metrics["pseudo/load_s"])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=64, help="images at 1x (10x runs ten times as many)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--detector", help="a segmenter file (default: the demo architecture at random init, delta 0)")
    ap.add_argument("--delta", type=float, help="score threshold (default: 0.2 with --detector, 0 without)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the stage process")
    ap.add_argument("--baseline-ref", help="git commit whose stage runs too, interleaved (before/after)")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=DIR",
                    help="a folder holding another contract/ and trainers/ to run too, interleaved (an experiment)")
    ap.add_argument("--scales", default="1,10", help="multiples of --images to run (the first is the baseline)")
    ap.add_argument("-o", "--out", default=str(REPO / "benchmarks" / "results" / "bench_pseudo_label.json"))
    args = ap.parse_args()
    delta = args.delta if args.delta is not None else (0.2 if args.detector else 0.0)
    scales = [int(x) for x in args.scales.split(",")]
    rows, loads = {}, []
    with tempfile.TemporaryDirectory(prefix="bench-pseudo-") as tmp:
        tmp = Path(tmp)
        detector = Path(args.detector) if args.detector else make_detector(tmp / "detector.pt")
        codes = {"this tree": REPO}
        if args.baseline_ref:
            codes = {args.baseline_ref: extract_ref(args.baseline_ref, tmp / "baseline"), **codes}
        for v in args.variant:
            name, _, folder = v.partition("=")
            codes[name] = Path(folder).resolve()
        for scale in scales:
            images = make_images(tmp / f"images-{scale}x", args.images * scale)
            runs: dict[str, list[dict]] = {name: [] for name in codes}
            for r in range(args.repeats):
                for name, code in codes.items():  # interleaved: the same load for both
                    work = tmp / f"run-{scale}x-{r}-{len(runs[name])}-{abs(hash(name))}"
                    loads.append(os.getloadavg()[0])
                    runs[name].append(run_stage(images, detector, work, delta, args.batch_size, code, args.threads))
                    print(f"{scale}x [{name}] run {r + 1}/{args.repeats}: {runs[name][-1]}", file=sys.stderr)
            for name, rs in runs.items():
                rows[(name, f"{scale}x")] = {k: statistics.median(x[k] for x in rs) for k in rs[0]}
    first = f"{scales[0]}x"
    lines = [f"detect-pseudo-label, {platform.machine()} {os.cpu_count()} cores, one rank, OMP_NUM_THREADS={args.threads}, "
             f"median of {args.repeats}; detector: {args.detector or 'demo architecture, random init'}; delta {delta:g}; "
             f"load average (1 min) during the runs {min(loads):.1f}-{max(loads):.1f}",
             "| code | scale | images | images/s | loop images/s | share outside forward | forward ms/image | bytes/sample | peak RSS (MB) |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    first_code = list(codes)[0]
    for (name, scale), v in rows.items():
        notes = []
        if scale != first:
            base = rows[(name, first)]
            notes.append(("images_per_s", f" ({v['images_per_s'] / base['images_per_s']:.2f}x {first})"))
            notes.append(("peak_rss_mb", f" ({v['peak_rss_mb'] / base['peak_rss_mb']:.2f}x {first})"))
        if name != first_code:
            base = rows[(first_code, scale)]
            notes.append(("images_per_s", f" ({v['images_per_s'] / base['images_per_s']:.2f}x {first_code})"))
            notes.append(("loop_images_per_s", f" ({v['loop_images_per_s'] / base['loop_images_per_s']:.2f}x {first_code})"))
        note = {k: "".join(t for kk, t in notes if kk == k) for k in v}
        lines.append(f"| {name} | {scale} | {int(v['images'])} | {v['images_per_s']:.1f}{note['images_per_s']} | "
                     f"{v['loop_images_per_s']:.1f}{note['loop_images_per_s']} | "
                     f"{100 * v['share_outside_forward']:.1f}% | {v['forward_ms_per_image']:.1f} | {v['bytes_per_sample']:.0f} | "
                     f"{v['peak_rss_mb']:.0f}{note['peak_rss_mb']} |")
    print("\n".join(lines))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    from contract.io import write_json

    write_json(args.out, {"delta": delta, "detector": args.detector, "repeats": args.repeats, "threads": args.threads,
                          "baseline_ref": args.baseline_ref, "load_average": [min(loads), max(loads)],
                          "rows": [{"code": n, "scale": sc, **v} for (n, sc), v in rows.items()]})


if __name__ == "__main__":
    main()
