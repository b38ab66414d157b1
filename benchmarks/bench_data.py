"""Data benchmark (issue 3): PartWorld generation, shard vs per-file folder reading, bytes per sample.

    python benchmarks/bench_data.py [--train 1500] [--eval 300] [--runs 3] [--out benchmarks/results/bench_data.json]

Compares the WebDataset shards (masks as COCO RLE inside the JSON record) with the same data
as a folder of per-image files: ``<key>.png`` image, ``<key>.json`` record without masks and one
1-bit PNG per object (and, for eval, per part) mask. Both readers return the image array and
every mask decoded to a bool array. Prints a markdown table; writes every run to JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainers.data import partworld, shards  # noqa: E402
from trainers.structures import decode_mask, decode_masks  # noqa: E402

MASK_LISTS = ("objects", "parts")


def time_runs(fn, runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def time_pairs(fa, fb, runs: int) -> tuple[list[float], list[float]]:
    """Time a and b alternately, so load from other processes drifts over both alike."""
    a, b = [], []
    for _ in range(runs):
        a += time_runs(fa, 1)
        b += time_runs(fb, 1)
    return a, b


def write_folder(samples, out: Path) -> None:
    """The per-file baseline: image PNG, record JSON with mask file names, one 1-bit PNG per mask."""
    out.mkdir(parents=True, exist_ok=True)
    for key, image, rec in samples:
        Image.fromarray(image).save(out / f"{key}.png", compress_level=6)
        rec = json.loads(json.dumps(rec))
        for name in MASK_LISTS:
            for i, ann in enumerate(rec.get(name, [])):
                mask_file = f"{key}.{name}{i}.png"
                Image.fromarray(decode_mask(ann.pop("segmentation"))).save(out / mask_file, compress_level=6)
                ann["mask_file"] = mask_file
        (out / f"{key}.json").write_text(json.dumps(rec, separators=(",", ":")))


def read_folder(folder: Path) -> int:
    n = 0
    for jf in sorted(folder.glob("*.json")):
        rec = json.loads(jf.read_text())
        with Image.open(folder / f"{jf.stem}.png") as im:
            np.asarray(im.convert("RGB"))
        for name in MASK_LISTS:
            for ann in rec.get(name, []):
                with Image.open(folder / ann["mask_file"]) as m:
                    np.asarray(m, dtype=bool)
        n += 1
    return n


def read_shards(d: Path) -> int:
    n = 0
    for _, image, rec in shards.iter_samples(d, allow_parts=True):
        for name in MASK_LISTS:
            decode_masks([a["segmentation"] for a in rec.get(name, [])], rec["height"], rec["width"])
        n += 1
    return n


def dir_bytes(d: Path) -> tuple[int, int, int]:
    """(sum of file sizes, disk usage in allocated blocks, number of files)."""
    files = [p.stat() for p in d.iterdir() if p.is_file()]
    return sum(st.st_size for st in files), sum(st.st_blocks * 512 for st in files), len(files)


def bench_split(cfg, split: str, n: int, runs: int, shard_size: int, work: Path) -> dict:
    samples = list(partworld.generate(cfg, split, 0, n))
    sd, fd = work / f"{split}-shards", work / f"{split}-folder"
    write_s, write_f = time_pairs(lambda: shards.write_dataset(
        iter(samples), sd, name=f"bench-{split}", split=split, categories=partworld.category_table(cfg),
        part_categories=partworld.part_category_table(cfg) if split == "eval" else None, shard_size=shard_size),
        lambda: write_folder(samples, fd), runs)
    assert read_shards(sd) == read_folder(fd) == n  # also warms the page cache for both
    read_s, read_f = time_pairs(lambda: read_shards(sd), lambda: read_folder(fd), runs)
    s_bytes, s_disk, s_files = dir_bytes(sd)
    f_bytes, f_disk, f_files = dir_bytes(fd)
    rle_bytes = sum(len(json.dumps(a["segmentation"], separators=(",", ":"))) for _, _, r in samples
                    for name in MASK_LISTS for a in r.get(name, []))
    png_mask_bytes = sum(p.stat().st_size for p in fd.iterdir() if any(f".{name}" in p.name for name in MASK_LISTS))
    masks = sum(len(r.get(name, [])) for _, _, r in samples for name in MASK_LISTS)
    med = statistics.median
    return {
        "split": split, "images": n, "masks": masks, "shard_size": shard_size,
        "write_shards_s": write_s, "write_folder_s": write_f, "read_shards_s": read_s, "read_folder_s": read_f,
        "read_shards_img_per_s": n / med(read_s), "read_folder_img_per_s": n / med(read_f),
        "read_ratio_shards_over_folder": med(read_f) / med(read_s),
        "read_ratio_per_run_median": med(f / s for s, f in zip(read_s, read_f)),
        "write_shards_img_per_s": n / med(write_s), "write_folder_img_per_s": n / med(write_f),
        "shard_bytes_per_sample": s_bytes / n, "folder_bytes_per_sample": f_bytes / n,
        "shard_disk_bytes_per_sample": s_disk / n, "folder_disk_bytes_per_sample": f_disk / n,
        "shard_files": s_files, "folder_files": f_files,
        "rle_bytes_per_mask": rle_bytes / max(masks, 1), "png_bytes_per_mask": png_mask_bytes / max(masks, 1),
    }


def main(argv=None) -> dict:
    cfg0 = partworld.PartWorldConfig.demo()
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--train", type=int, default=cfg0.train_images, help="train images (demo: %(default)s)")
    ap.add_argument("--eval", type=int, default=cfg0.eval_images, help="eval images (demo: %(default)s)")
    ap.add_argument("--gen", type=int, default=300, help="images per generation run and split")
    ap.add_argument("--runs", type=int, default=3, help="runs per measurement; medians are reported")
    ap.add_argument("--shard-size", type=int, default=500)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "bench_data.json")
    args = ap.parse_args(argv)
    if args.runs < 3:
        ap.error("--runs must be >= 3 (medians of at least 3 runs)")
    cfg = cfg0
    result = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                          "loadavg_at_start": os.getloadavg()},
              "config": "PartWorld demo (112 px)", "args": {k: str(v) for k, v in vars(args).items()}, "generation": {}, "splits": []}
    for split in ("train", "eval"):
        runs = time_runs(lambda: list(partworld.generate(cfg, split, 0, args.gen)), args.runs)
        result["generation"][split] = {"images": args.gen, "runs_s": runs, "img_per_s": args.gen / statistics.median(runs)}
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        for split, n in (("train", args.train), ("eval", args.eval)):
            if n > 0:
                result["splits"].append(bench_split(cfg, split, n, args.runs, args.shard_size, Path(tmp)))
    result["machine"]["loadavg_at_end"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(markdown(result, args.runs))
    return result


def markdown(r: dict, runs: int) -> str:
    g = r["generation"]
    lines = [f"PartWorld generation (median of {runs}): train {g['train']['img_per_s']:.0f} img/s, "
             f"eval {g['eval']['img_per_s']:.0f} img/s ({g['train']['images']} images per run)", "",
             "| split | images | masks | read shards img/s | read folder img/s | shards/folder read | "
             "bytes/sample shards / folder | on disk shards / folder | RLE B/mask | PNG B/mask | files shards / folder |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in r["splits"]:
        lines.append(f"| {s['split']} | {s['images']} | {s['masks']} | {s['read_shards_img_per_s']:.0f} | "
                     f"{s['read_folder_img_per_s']:.0f} | {s['read_ratio_shards_over_folder']:.2f}x | "
                     f"{s['shard_bytes_per_sample']:.0f} / {s['folder_bytes_per_sample']:.0f} | "
                     f"{s['shard_disk_bytes_per_sample']:.0f} / {s['folder_disk_bytes_per_sample']:.0f} | "
                     f"{s['rle_bytes_per_mask']:.0f} | {s['png_bytes_per_mask']:.0f} | {s['shard_files']} / {s['folder_files']} |")
    lines.append("")
    lines.append("Writing (median): " + ", ".join(
        f"{s['split']} shards {s['write_shards_img_per_s']:.0f} img/s vs folder {s['write_folder_img_per_s']:.0f} img/s"
        for s in r["splits"]))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
