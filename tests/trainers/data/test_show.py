"""Contact sheet: a readable PNG of the documented size, overlays only on labelled pixels, atomic writes."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from trainers.data.partworld import PartWorldConfig, category_table, generate, part_category_table
from trainers.data.show import CAPTION, GAP, PAD, contact_sheet
from trainers.structures import decode_mask

CFG = PartWorldConfig(image_size=64, num_classes=6, num_part_types=10, train_images=6, eval_images=5,
                      min_object_area=32)


def _read(path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.format == "PNG"
        return np.asarray(im.convert("RGB"))


def test_eval_sheet_has_an_object_and_a_part_panel_per_sample(tmp_path):
    out = contact_sheet(generate(CFG, "eval"), tmp_path / "eval.png", cols=4,
                        categories=category_table(CFG), part_categories=part_category_table(CFG))
    sheet = _read(out)
    panel = 64 * 2
    tile_w = 2 * panel + GAP
    assert sheet.shape == (PAD + 2 * (CAPTION + panel + PAD), PAD + 4 * (tile_w + PAD), 3)


def test_train_sheet_has_one_panel_per_sample_and_parts_false_hides_parts(tmp_path):
    train = _read(contact_sheet(generate(CFG, "train"), tmp_path / "train.png", cols=3))
    assert train.shape == (PAD + 2 * (CAPTION + 128 + PAD), PAD + 3 * (128 + PAD), 3)
    no_parts = _read(contact_sheet(generate(CFG, "eval"), tmp_path / "np.png", cols=5, parts=False))
    assert no_parts.shape == (PAD + CAPTION + 128 + PAD, PAD + 5 * (128 + PAD), 3)


def test_overlay_changes_object_pixels_and_leaves_background_alone(tmp_path):
    key, img, rec = next(generate(CFG, "train"))
    sheet = _read(contact_sheet([(key, img, rec)], tmp_path / "one.png", cols=1, scale=1))
    panel = sheet[PAD + CAPTION: PAD + CAPTION + 64, PAD: PAD + 64]
    labelled = np.zeros((64, 64), dtype=bool)
    for o in rec["objects"]:
        labelled |= decode_mask(o["segmentation"])
    # class-name labels are drawn near each object's box corner; compare away from them
    near_label = np.zeros_like(labelled)
    for o in rec["objects"]:
        x, y = int(o["bbox"][0]), int(o["bbox"][1])
        near_label[max(y - 2, 0): y + 16, max(x - 2, 0): x + 60] = True
    assert (panel[~labelled & ~near_label] == img[~labelled & ~near_label]).all()
    changed = (panel != img).any(axis=2)
    assert changed[labelled & ~near_label].mean() > 0.9


def test_sheet_accepts_a_generator_reads_at_most_limit_and_writes_atomically(tmp_path):
    out = tmp_path / "sheet.png"
    out.write_bytes(b"old")
    samples = generate(CFG, "train")
    contact_sheet(samples, out, cols=2, limit=4)
    assert _read(out).shape[0] == PAD + 2 * (CAPTION + 128 + PAD)
    assert next(samples)[0] == "train-00000004"  # the rest of the stream was not consumed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sheet.png"]


def test_empty_input_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no samples"):
        contact_sheet([], tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()
