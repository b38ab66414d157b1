"""Class-specific part labels (PartDistillation sec. 4.3): object class ``c``'s cluster ``k`` is label ``offset[c] + k``.

``rank-parts`` and ``cluster-pixels`` write ``<dataset>/label_map.json`` (:func:`label_map_doc`); ``train-ranker``
reads it (:class:`LabelMap`) to size its class head, and ``rank-pseudo-label`` copies it to the next round's labels.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

LABEL_MAP_FILE = "label_map.json"  # <dataset>/label_map.json: per object class k_c and its label offset


@dataclass(frozen=True)
class LabelMap:
    """Class-specific part labels: object class ``c``'s cluster ``k`` is label ``offset[c] + k`` (k < num_clusters[c])."""

    offsets: dict[int, int]
    num_clusters: dict[int, int]
    doc: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_doc(cls, doc: dict) -> "LabelMap":
        """From a ``label_map.json`` document (``{"classes": [{"category_id", "num_clusters", "offset"}, ...]}``)."""
        classes = doc["classes"]
        return cls(offsets={int(c["category_id"]): int(c["offset"]) for c in classes},
                   num_clusters={int(c["category_id"]): int(c["num_clusters"]) for c in classes}, doc=doc)

    @classmethod
    def load(cls, dataset_dir: str | Path) -> "LabelMap":
        from trainers.inputs import StageInputError

        path = Path(dataset_dir) / LABEL_MAP_FILE
        try:
            return cls.from_doc(json.loads(path.read_text()))
        except (OSError, ValueError, KeyError) as e:
            raise StageInputError(f"{path}: no readable label map (is this a rank-parts dataset?): {e}") from e

    @property
    def num_labels(self) -> int:
        return sum(self.num_clusters.values())

    def label(self, category_id: int, cluster: int) -> int | None:
        """The class-specific label, or None when the class has no such cluster."""
        c = int(category_id)
        if not 0 <= int(cluster) < self.num_clusters.get(c, 0):
            return None
        return self.offsets[c] + int(cluster)


def label_map_doc(categories: list[dict], cluster_info: dict[int, dict], k: int) -> dict:
    """``label_map.json``: per object class (dataset order, then any other spilled class) k_c and its label offset."""
    order = [int(c["id"]) for c in categories]
    order += sorted(set(cluster_info) - set(order))
    classes, offset = [], 0
    for c in order:
        info = cluster_info.get(c, {})
        kc = int(info.get("k", 0))
        classes.append({"category_id": c, "num_clusters": kc, "offset": offset,
                        "num_candidates": int(info.get("num_candidates", 0)), "counts": info.get("counts", [])})
        offset += kc
    return {"k": k, "num_labels": offset, "classes": classes}


def cluster_info(clusters_dir: Path, counts: dict[int, int]) -> dict[int, dict]:
    """Per class of ``counts``: clusters found, members clustered and cluster sizes (what :func:`label_map_doc` reads)."""
    from trainers.parts.class_clusters import load_class_clusters

    out = {}
    for c in counts:
        res = load_class_clusters(clusters_dir, c)
        out[int(c)] = {"k": int(len(res["counts"])), "num_candidates": int(res["num_candidates"]),
                       "counts": [int(v) for v in res["counts"]]}
    return out
