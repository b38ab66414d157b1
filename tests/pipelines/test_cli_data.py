"""`selftrain data` end to end: the real CLI in a fresh git + DVC repository."""
from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

from pipelines import dvc
from trainers.data import shards

REPO = Path(__file__).resolve().parents[2]
SMALL = {"image_size": 64, "num_classes": 4, "num_part_types": 8, "train_images": 24, "eval_images": 12, "val_images": 6}


def selftrain(cwd: Path, *args: str, ok: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "pipelines.cli", *args], cwd=cwd, capture_output=True, text=True)
    if ok:
        assert proc.returncode == 0, f"selftrain {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture()
def project(tmp_path: Path) -> Path:
    root = tmp_path / "project"
    root.mkdir()
    (root / "small.yaml").write_text(yaml.safe_dump(SMALL))
    return root


def test_generate_versions_pushes_and_reproduces_by_hash(project: Path) -> None:
    selftrain(project, "data", "generate", "-c", "small.yaml", "--shard-size", "10")
    v1 = yaml.safe_load((project / "data.dvc").read_text())["outs"][0]["md5"]
    eval_dir = project / "data" / "partworld-demo" / "eval"
    assert (eval_dir / "index.json").exists()
    val = shards.DatasetIndex.load(project / "data" / "partworld-demo" / "val")
    assert val.split == "val" and val.has_parts and val.num_samples == SMALL["val_images"]
    first = digest(project / "data")

    selftrain(project, "data", "verify", str(eval_dir))
    selftrain(project, "data", "show", str(eval_dir), "-o", "sheet.png", "-n", "4")
    with Image.open(project / "sheet.png") as im:
        assert im.width > 64 and im.height > 64

    # a second, different version replaces the work tree; the first stays reachable by its hash
    (project / "small.yaml").write_text(yaml.safe_dump({**SMALL, "seed": 7}))
    selftrain(project, "data", "generate", "-c", "small.yaml", "--shard-size", "10")
    v2 = yaml.safe_load((project / "data.dvc").read_text())["outs"][0]["md5"]
    assert v2 != v1
    shutil.rmtree(project / ".dvc" / "cache")  # only the remote has v1 now
    selftrain(project, "data", "checkout", v1, "-o", "restored")
    assert digest(project / "restored") == first


def test_generation_is_deterministic_across_runs(project: Path) -> None:
    selftrain(project, "data", "generate", "-c", "small.yaml", "--no-version", "-o", "a")
    selftrain(project, "data", "generate", "-c", "small.yaml", "--no-version", "-o", "b")
    assert digest(project / "a") == digest(project / "b")
    assert dvc.dataset_hash(project / "a") == dvc.dataset_hash(project / "b")


def test_bad_config_is_rejected_naming_file_and_key(project: Path) -> None:
    (project / "bad.yaml").write_text(yaml.safe_dump({**SMALL, "num_clases": 3, "image_size": -1}))
    proc = selftrain(project, "data", "generate", "-c", "bad.yaml", ok=False)
    assert proc.returncode == 2
    msg = " ".join(proc.stderr.split())
    assert "bad.yaml" in msg and "num_clases" in msg and "image_size" in msg
    assert not (project / "data").exists()  # nothing was started


def test_committed_data_dvc_matches_a_fresh_generation_of_the_demo(tmp_path: Path) -> None:
    """data.dvc in the repository pins the demo dataset: regenerating it anywhere gives that very hash."""
    pinned = yaml.safe_load((REPO / "data.dvc").read_text())["outs"][0]["md5"]
    selftrain(tmp_path, "data", "generate", "--no-version", "-o", "data/partworld-demo")
    assert dvc.dataset_hash(tmp_path / "data") == pinned


def test_import_folder_names_a_corrupt_image_and_quarantines_it_with_skip_bad(project: Path) -> None:
    import numpy as np

    imgs = project / "imgs"
    imgs.mkdir()
    for i in range(3):
        Image.fromarray((np.random.default_rng(i).random((20, 30, 3)) * 255).astype("uint8")).save(imgs / f"{i}.png")
    (imgs / "broken.jpg").write_bytes(b"not an image")
    proc = selftrain(project, "data", "import", "folder", "imgs", "-o", "out", ok=False)
    assert proc.returncode == 2 and "broken.jpg" in proc.stderr
    assert not (project / "out" / "index.json").exists()  # nothing half-written was published
    proc = selftrain(project, "data", "import", "folder", "imgs", "-o", "out", "--skip-bad")
    index = yaml.safe_load((project / "out" / "index.json").read_text())
    assert index["num_samples"] == 3
    assert [Path(q["source"]).name for q in index["quarantined"]] == ["broken.jpg"]


def test_export_parts_to_coco_json_loads_in_pycocotools(project: Path) -> None:
    from pycocotools.coco import COCO

    selftrain(project, "data", "generate", "-c", "small.yaml", "--no-version", "-o", "ds")
    selftrain(project, "data", "export", "ds/eval", "-o", "parts.json", "--kind", "parts")
    coco = COCO(str(project / "parts.json"))
    assert len(coco.getImgIds()) == SMALL["eval_images"] and len(coco.getAnnIds()) > 0


def test_val_split_is_generated_with_parts_and_distinct_images(project: Path) -> None:
    selftrain(project, "data", "generate", "-c", "small.yaml", "--no-version", "-o", "ds")
    raw = {split: [img for _, img, _ in shards.iter_samples(project / "ds" / split, decode=False, allow_parts=True)]
           for split in ("train", "eval", "val")}
    assert len(raw["val"]) == SMALL["val_images"] and not set(raw["val"]) & (set(raw["eval"]) | set(raw["train"]))
    assert all(r["parts"] for _, _, r in shards.iter_samples(project / "ds" / "val", allow_parts=True))
    assert not shards.DatasetIndex.load(project / "ds" / "train").has_parts


def _part_file(project: Path) -> tuple[Path, Path]:
    """A part-only COCO file as annotation tools write them: one polygon overshoots the image by 1.8 px."""
    import json

    import numpy as np

    imgs = project / "pimgs"
    imgs.mkdir()
    images, anns = [], []
    for i in range(10):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(imgs / f"{i}.png")
        images.append({"id": i, "file_name": f"{i}.png", "height": 30, "width": 40})
        anns.append({"id": 2 * i + 1, "image_id": i, "category_id": 1, "segmentation": [[2, 2, 12, 2, 12, 12, 2, 12]], "iscrowd": 0})
        anns.append({"id": 2 * i + 2, "image_id": i, "category_id": 2, "segmentation": [[12, 4, 30, 4, 30, 20, 12, 20]], "iscrowd": 0})
    anns[0]["segmentation"] = [[-1.8, 2, 12, 2, 12, 12, -1.8, 12]]
    cats = [{"id": 1, "name": "head", "supercategory": "dog"}, {"id": 2, "name": "body", "supercategory": "dog"}]
    (project / "parts.json").write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return project / "parts.json", imgs


def test_import_parts_clips_overshoot_and_names_broken_geometry(project: Path) -> None:
    import json

    parts, _ = _part_file(project)
    proc = selftrain(project, "data", "import", "parts", "parts.json", "--images", "pimgs", "-o", "ev")
    assert "1 polygon(s) in 1 annotation(s) overshot the image (by up to 1.8 px)" in " ".join(proc.stderr.split())
    index = shards.DatasetIndex.load(project / "ev")
    assert index.has_parts and index.notes["import"]["clipped_polygons"] == 1
    data = json.loads(parts.read_text())
    data["annotations"][5]["segmentation"] = [[1, 1, 5, 5]]
    (project / "broken.json").write_text(json.dumps(data))
    proc = selftrain(project, "data", "import", "parts", "broken.json", "--images", "pimgs", "-o", "bad", ok=False)
    msg = " ".join(proc.stderr.split())
    assert proc.returncode == 2 and "broken.json" in msg and "annotation 6: segmentation[0] has 2 point(s)" in msg
    assert not (project / "bad" / "index.json").exists()


def test_import_parts_as_training_then_split_val_from_the_part_set(project: Path) -> None:
    _part_file(project)
    proc = selftrain(project, "data", "import", "parts", "parts.json", "--images", "pimgs", "-o", "tr", "--as-training")
    assert "20 part annotation(s) dropped" in proc.stdout
    tr = shards.DatasetIndex.load(project / "tr")
    assert tr.split == "train" and not tr.has_parts and tr.categories == [{"id": 1, "name": "dog"}]
    recs = [r for _, _, r in shards.iter_samples(project / "tr")]  # what a training stage reads
    assert len(recs) == 10 and all(len(r["objects"]) == 1 and "parts" not in r for r in recs)

    selftrain(project, "data", "import", "parts", "parts.json", "--images", "pimgs", "-o", "pset")
    args = ("data", "split", "pset", "--fractions", "val=0.2,eval=0.3,train=0.5", "--seed", "0", "--keep-parts", "val,eval")
    proc = selftrain(project, *args, "-o", "sp")
    assert "val: 2 samples (with parts)" in proc.stdout and "train: 5 samples (objects, no parts)" in proc.stdout
    ids = {s: [r["image_id"] for _, _, r in shards.iter_samples(project / "sp" / s, allow_parts=True)] for s in ("val", "eval", "train")}
    assert sorted(sum(ids.values(), [])) == list(range(10))
    assert not shards.DatasetIndex.load(project / "sp" / "train").has_parts
    selftrain(project, *args, "-o", "sp2")
    assert digest(project / "sp") == digest(project / "sp2")
    proc = selftrain(project, "data", "split", "pset", "-f", "val=0.2,train=0.7", "-o", "sp3", ok=False)
    assert proc.returncode == 2 and "add up to 1" in proc.stderr and not (project / "sp3").exists()
