"""trainers.data.imagenet_s: the benchmark's PNG encoding both ways, the importer, bad label maps, the semantic maps."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from trainers.data import shards
from trainers.data.imagenet_s import (
    IGNORE_ID,
    IGNORE_LABEL,
    class_indices,
    decode_label_png,
    encode_label_png,
    import_imagenet_s,
    semantic_map,
    write_label_png,
)


def test_ids_round_trip_through_the_r_plus_256_g_encoding():
    ids = np.array([[0, 1, 255], [256, 919, IGNORE_ID]])
    png = encode_label_png(ids)
    rgb = np.asarray(Image.open(__import__("io").BytesIO(png)).convert("RGB"))
    assert rgb[1, 1].tolist() == [919 % 256, 919 // 256, 0] and rgb[1, 2].tolist() == [1000 % 256, 3, 0]
    assert decode_label_png(png).tolist() == ids.tolist()


def _folder(root: Path, maps: dict[str, np.ndarray], categories: list[str]) -> tuple[Path, Path, Path]:
    images, labels = root / "validation", root / "validation-segmentation"
    for rel, ids in maps.items():
        (images / rel).parent.mkdir(parents=True, exist_ok=True)
        (labels / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((*ids.shape, 3), 128, np.uint8)).save(images / f"{rel}.JPEG", format="JPEG")
        (labels / f"{rel}.png").write_bytes(encode_label_png(ids))
    cats = root / "categories.txt"
    cats.write_text("\n".join(categories) + "\n")
    return images, labels, cats


def test_import_writes_one_object_per_category_and_the_ignore_mask(tmp_path):
    ids = np.zeros((8, 10), dtype=np.int64)
    ids[1:4, 1:4] = 2
    ids[5:7, 2:9] = 1
    ids[0, :] = IGNORE_ID
    images, labels, cats = _folder(tmp_path, {"n02/ILSVRC2012_val_1": ids}, ["n01", "n02"])
    idx = import_imagenet_s(labels, images, cats, tmp_path / "out")
    assert idx.num_samples == 1 and [c["name"] for c in idx.categories] == ["n01", "n02"]
    _, _, record = next(shards.iter_samples(tmp_path / "out"))
    assert record["file_name"] == "n02/ILSVRC2012_val_1.JPEG"
    assert sorted(o["category_id"] for o in record["objects"]) == [1, 2]
    painted = semantic_map(record, class_indices(idx.categories))
    assert (painted == np.where(ids == IGNORE_ID, IGNORE_LABEL, ids)).all()


def test_a_label_map_with_ids_outside_the_category_list_is_named_and_quarantined_with_skip_bad(tmp_path):
    good, bad = np.zeros((4, 4), np.int64), np.zeros((4, 4), np.int64)
    good[0, 0] = 1
    bad[0, 0], bad[1, 1] = 7, 1
    images, labels, cats = _folder(tmp_path, {"n01/a": good, "n01/b": bad}, ["n01"])
    with pytest.raises(shards.DataError, match=r"b\.png.*ids 7 outside the category list \(1\.\.1"):
        import_imagenet_s(labels, images, cats, tmp_path / "strict")
    idx = import_imagenet_s(labels, images, cats, tmp_path / "lenient", skip_bad=True)
    assert idx.num_samples == 1 and len(idx.quarantined) == 1
    assert idx.quarantined[0]["source"].endswith("b.png") and "ids 7" in idx.quarantined[0]["error"]


def test_a_label_map_without_its_image_is_a_bad_sample(tmp_path):
    images, labels, cats = _folder(tmp_path, {"n01/a": np.zeros((4, 4), np.int64)}, ["n01"])
    (images / "n01" / "a.JPEG").unlink()
    idx = import_imagenet_s(labels, images, cats, tmp_path / "out", skip_bad=True)
    assert idx.num_samples == 0 and "no image n01/a.JPEG" in idx.quarantined[0]["error"]


def test_predictions_are_written_where_the_benchmark_tooling_looks(tmp_path):
    pred = np.array([[0, 3], [1, 300]])
    path = write_label_png(tmp_path, "n01/ILSVRC2012_val_9.JPEG", pred)
    assert path == tmp_path / "n01" / "ILSVRC2012_val_9.png"
    assert decode_label_png(path).tolist() == pred.tolist()
    with pytest.raises(ValueError, match="inside the output folder"):
        write_label_png(tmp_path, "../escape.png", pred)


def test_partworld_objects_paint_the_semantic_ground_truth_with_other_around_them():
    from trainers.data.partworld import PartWorldConfig, category_table, generate

    cfg = PartWorldConfig(image_size=48, num_classes=3, num_part_types=4, min_parts=2, max_parts=3, max_instances=2,
                          min_object_area=16, max_distractors=1)
    _, _, record = next(iter(generate(cfg, "val", 0, 1)))
    classes = class_indices(category_table(cfg))
    m = semantic_map(record, classes)
    assert set(np.unique(m)) == {0} | {classes[o["category_id"]] for o in record["objects"]}
    with pytest.raises(ValueError, match="not among the dataset's categories"):
        semantic_map(record, {})


def test_the_cli_imports_a_folder_pair_and_names_the_quarantined_map(tmp_path):
    import subprocess
    import sys

    good, bad = np.zeros((4, 4), np.int64), np.full((4, 4), 9, np.int64)
    images, labels, cats = _folder(tmp_path, {"n01/a": good, "n01/b": bad}, ["n01"])
    program = ("import sys\nfrom pipelines.cli import main\ntry:\n    main()\nexcept SystemExit as e:\n"
               "    assert 'torch' not in sys.modules, 'the importer loaded torch'\n    raise\n")
    proc = subprocess.run([sys.executable, "-c", program,
                           "data", "import", "imagenet-s", str(labels), "--images", str(images), "--categories", str(cats),
                           "-o", str(tmp_path / "out"), "--skip-bad"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "1 samples" in proc.stdout and "b.png" in proc.stderr and "ids 9" in proc.stderr
