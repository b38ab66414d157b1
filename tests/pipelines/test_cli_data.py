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

REPO = Path(__file__).resolve().parents[2]
SMALL = {"image_size": 64, "num_classes": 4, "num_part_types": 8, "train_images": 24, "eval_images": 12}


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
