"""Purity evaluation by manual rating (PartDistillation sec. 5.2, Fig. 4): library side of ``selftrain purity``.

Thin wrappers over ``trainers.evaluation.purity`` (torch-free): purity grids to rate -- of a labels dataset, or of a
trained model's predictions on held-out images (a predictions folder as evaluate-parts or ``selftrain predict``
writes it) -- with the paper's filter of parts larger than half their object (sec. 5.4), and the precision-vs-rating
curve of one or more ratings files.
"""
from __future__ import annotations

from pathlib import Path

from trainers.evaluation.purity import MAX_PART_FRACTION


def grids(labels: str | Path, out_dir: str | Path, max_classes: int | None = None, seed: int = 0,
          dataset: str | Path | None = None, setting: str = "gt",
          max_part_fraction: float | None = MAX_PART_FRACTION) -> Path:
    """One 3x3 purity grid per (object class, part cluster), ``index.html`` and a ratings template in ``out_dir``.

    ``labels``: a labels dataset (rank-parts, cluster-pixels), or a predictions folder (``images.json``; then
    ``dataset`` is the dataset it was predicted on, whose images are drawn, and ``setting`` the one to draw).
    Parts larger than ``max_part_fraction`` of their object are left out (None: none)."""
    from trainers.evaluation.purity import make_prediction_purity_grids, make_purity_grids

    if (Path(labels) / "images.json").is_file():
        if dataset is None:
            raise ValueError(f"{labels} is a predictions folder: give the dataset it was predicted on (its images)")
        return make_prediction_purity_grids(labels, dataset, out_dir, setting=setting, max_classes=max_classes, seed=seed,
                                            max_part_fraction=max_part_fraction)
    if dataset is not None:
        raise ValueError(f"{labels} is a labels dataset (no images.json): it holds its images, give no dataset")
    return make_purity_grids(labels, out_dir, max_classes=max_classes, seed=seed, max_part_fraction=max_part_fraction)


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
