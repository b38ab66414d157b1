"""Purity grids, ratings and the precision curve (PartDistillation sec. 5.2, Fig. 4, Fig. 5)."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from trainers.data import shards
from trainers.data.partworld import PartWorldConfig, category_table, generate
from trainers.evaluation.purity import (CAPTION, GRID, PAD, TILE, RatingsError, load_ratings, make_purity_grids,
                                        plot_precision_curve, precision_curve, sample_part_clusters)

WORLD64 = PartWorldConfig(image_size=64, num_classes=3, num_part_types=4, min_parts=2, max_parts=3, max_instances=2,
                          min_object_area=32, max_distractors=0)


def gt_parts_as_labels(samples):
    """Evaluation samples whose GT parts become labelled proposals: cluster id = part type, class = the object's."""
    for key, image, record in samples:
        classes = {o["id"]: o["category_id"] for o in record["objects"]}
        parts = record.pop("parts")
        record["proposals"] = [{"object_id": p["object_id"], "segmentation": p["segmentation"], "score": 1.0,
                                "area": p["area"], "label": int(p["category_id"]),
                                "category_id": classes[p["object_id"]]} for p in parts]
        yield key, image, record


@pytest.fixture(scope="module")
def labels(tmp_path_factory):
    out = tmp_path_factory.mktemp("purity") / "labels"
    shards.write_dataset(gt_parts_as_labels(generate(WORLD64, "eval", 0, 20)), out, name="labels", split="train",
                         categories=category_table(WORLD64), shard_size=5)
    return out


def grid_tiles(png: Path) -> int:
    """Tiles of a purity grid that hold a picture (non-uniform), counted from the PNG itself."""
    a = np.asarray(Image.open(png).convert("RGB")).astype(int)
    n = 0
    for t in range(GRID * GRID):
        x = PAD + (t % GRID) * (TILE + PAD)
        y = CAPTION + PAD + (t // GRID) * (TILE + PAD)
        tile = a[y + 2:y + TILE - 2, x + 2:x + TILE - 2]
        n += bool((tile != tile[0, 0]).any() and (tile[..., 0] > 200).any())  # something drawn, with red in it
    return n


def test_one_grid_per_class_and_cluster_with_nine_tiles_or_all_instances(labels, tmp_path):
    clusters, unusable = sample_part_clusters(labels)
    assert unusable == 0 and clusters
    page = make_purity_grids(labels, tmp_path / "grids")
    pngs = sorted(p.relative_to(tmp_path / "grids").as_posix() for p in (tmp_path / "grids").rglob("*.png"))
    assert pngs == sorted(c.grid_name for c in clusters.values())
    assert any(c.instances >= 9 for c in clusters.values()) and any(c.instances < 9 for c in clusters.values())
    for c in clusters.values():
        img = Image.open(tmp_path / "grids" / c.grid_name)
        assert img.size == (PAD + GRID * (TILE + PAD), CAPTION + PAD + GRID * (TILE + PAD))
        assert grid_tiles(tmp_path / "grids" / c.grid_name) == min(9, c.instances)
    html = page.read_text()
    assert set(re.findall(r"src='([^']+\.png)'", html)) == set(pngs)
    for cid in {c.object_class for c in clusters.values()}:
        assert f"id='class-{cid}'" in html


def test_max_classes_keeps_a_subset_of_classes(labels, tmp_path):
    make_purity_grids(labels, tmp_path / "g", max_classes=1)
    assert len(list((tmp_path / "g").glob("class-*"))) == 1


def test_the_ratings_template_lists_every_grid_and_loads_once_filled(labels, tmp_path):
    make_purity_grids(labels, tmp_path / "g")
    lines = (tmp_path / "g" / "ratings-template.csv").read_text().splitlines()
    filled = tmp_path / "filled.csv"
    filled.write_text("\n".join([lines[0]] + [f"{line}7" for line in lines[1:]]) + "\n")
    ratings = load_ratings(filled)
    assert len(ratings) == len(list((tmp_path / "g").rglob("*.png"))) and {r.rating for r in ratings} == {7}


@pytest.mark.parametrize("bad", ["2", "10", "7.5", "seven", ""])
def test_a_bad_rating_is_an_error_naming_the_line(tmp_path, bad):
    f = tmp_path / "r.csv"
    f.write_text(f"object_class,cluster,rating\n# a comment\n1,0,9\n1,1,{bad}\n")
    with pytest.raises(RatingsError, match=r"r\.csv:4: rating"):
        load_ratings(f)


def test_a_bad_header_or_duplicate_is_an_error_naming_the_line(tmp_path):
    f = tmp_path / "r.csv"
    f.write_text("class,cluster,score\n1,0,9\n")
    with pytest.raises(RatingsError, match=r"r\.csv:1: header"):
        load_ratings(f)
    f.write_text("object_class,cluster,rating\n1,0,9\n\n1,0,3\n")
    with pytest.raises(RatingsError, match=r"r\.csv:4: .*already rated on line 2"):
        load_ratings(f)


def test_precision_curve_is_monotone_and_starts_at_one():
    curve = precision_curve([3, 5, 9, 9, 7, 4])
    assert list(curve) == list(range(3, 10))
    values = list(curve.values())
    assert values[0] == 1.0 and all(a >= b for a, b in zip(values, values[1:]))
    assert curve[9] == pytest.approx(2 / 6) and curve[6] == pytest.approx(3 / 6)


def test_plot_writes_one_png_for_several_methods(tmp_path):
    a, b = tmp_path / "ours.csv", tmp_path / "supervised.csv"
    a.write_text("object_class,cluster,rating\n1,0,9\n1,1,8\n2,0,6\n")
    b.write_text("object_class,cluster,rating\n1,0,4\n1,1,5\n")
    curves = plot_precision_curve({"ours": load_ratings(a), "supervised": load_ratings(b)}, tmp_path / "c.png")
    assert set(curves) == {"ours", "supervised"} and curves["ours"][9] == pytest.approx(1 / 3)
    assert Image.open(tmp_path / "c.png").format == "PNG"


def test_cli_grids_and_curve(labels, tmp_path):
    from typer.testing import CliRunner

    from pipelines.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["purity", "grids", str(labels), "-o", str(tmp_path / "g")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "g" / "index.html").exists()
    r = tmp_path / "m.csv"
    r.write_text("object_class,cluster,rating\n1,0,9\n1,1,3\n")
    res = runner.invoke(app, ["purity", "curve", str(r), "-o", str(tmp_path / "c.png")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "c.png").exists() and ">=9: 0.500" in res.output
    r.write_text("object_class,cluster,rating\n1,0,11\n")
    res = runner.invoke(app, ["purity", "curve", str(r), "-o", str(tmp_path / "c.png")])
    assert res.exit_code == 2 and "m.csv:2" in res.output
