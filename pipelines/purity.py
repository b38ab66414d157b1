"""Purity evaluation by manual rating (PartDistillation sec. 5.2, Fig. 4): library side of ``selftrain purity``.

Thin wrappers over ``trainers.evaluation.purity`` (torch-free): purity grids of a labels dataset to rate,
and the precision-vs-rating curve of one or more ratings files.
"""
from __future__ import annotations

from pathlib import Path


def grids(labels_dataset: str | Path, out_dir: str | Path, max_classes: int | None = None, seed: int = 0) -> Path:
    """One 3x3 purity grid per (object class, part cluster), ``index.html`` and a ratings template in ``out_dir``."""
    from trainers.evaluation.purity import make_purity_grids

    return make_purity_grids(labels_dataset, out_dir, max_classes=max_classes, seed=seed)


def curve(ratings_files: list[str | Path], out_png: str | Path,
          names: list[str] | None = None) -> dict[str, dict[int, float]]:
    """Fig. 4 for several methods: each ratings file is one method (named by its file stem unless ``names``)."""
    from trainers.evaluation.purity import load_ratings, plot_precision_curve

    files = [Path(f) for f in ratings_files]
    labels = list(names) if names else [f.stem for f in files]
    if len(labels) != len(files):
        raise ValueError(f"{len(files)} ratings files but {len(labels)} names")
    if len(set(labels)) != len(labels):
        raise ValueError(f"method names must be distinct, got {labels} (pass --name for each file)")
    return plot_precision_curve({n: load_ratings(f) for n, f in zip(labels, files)}, out_png)
