"""Stage ``rank-pseudo-label``: the next final-self-training round's labels from the part ranker (PartDistillation sec. 4.3).

The ranker ``inputs.models.ranker`` (a ``train-ranker`` model) predicts parts on ``inputs.datasets.images``, each
scored within the class of the object it belongs to (``trainers.parts.ranking.relabel``), filtered like rank-parts'
candidates (score and area); objects are the records' (``objects: gt``) or the instance teacher's detections.
Records as rank-parts' (``label`` = cluster id, ``score`` = the class-conditioned score); the ranker's label map
is copied to ``<dataset>/label_map.json``. A map over shards (``trainers.shardmap``).
Params: ``python -m trainers rank-pseudo-label --help``.
"""
from __future__ import annotations

import torch

from contract.io import write_json
from contract.spec import StageSpec
from contract.stages import params_of
from trainers.data.batches import at_input_size
from trainers.inputs import StageInputError, load_model_input, model_input_path
from trainers.models.io import load_ranker
from trainers.parts.candidates import RankPartsStats
from trainers.parts.label_map import LABEL_MAP_FILE
from trainers.parts.objects import image_objects
from trainers.parts.ranking import relabel
from trainers.shardmap import ShardMap

UNUSED = ("candidates", "dropped_bad_feature")  # rank-parts' counters that relabelling never moves


def run(spec: StageSpec):
    """This rank's share relabelled by the ranker into ``<out>/rank-<r>``; rank 0 merges and copies the label map."""
    p = params_of(spec)
    sm = ShardMap(spec, p, name="ranked-parts")
    try:
        model, lmap = load_ranker(model_input_path(spec, "ranker"), sm.dist.device)
        model = at_input_size(model, p)
    except ValueError as e:
        raise StageInputError(f"inputs.models.ranker: {e}") from e

    def labeller(d):
        teacher = at_input_size(load_model_input(spec, "instance_teacher", d.device), p) if p.objects == "detected" else None

        def label(keys, images, records, stats: RankPartsStats) -> list[list[dict]]:
            with torch.no_grad():
                object_preds = teacher.predict(images, top_k=p.max_detections) if teacher is not None else None
            objects = [image_objects(r, None if object_preds is None else object_preds[b], p.object_score_threshold,
                                     sm.index.categories, d.device) for b, r in enumerate(records)]
            stats.images += len(keys)
            stats.objects += sum(len(o[1]) for o in objects)
            return relabel(model, images, objects, lmap, p.score_threshold, p.min_part_area, stats)

        return label

    def metrics(total: RankPartsStats, wall: float, merged) -> dict[str, float]:
        out = {f"rank_pseudo_label/{k}": float(v) for k, v in total.to_dict().items() if k not in UNUSED}
        out["time/wall_s"] = wall
        return out

    return sm.run(labeller, RankPartsStats(), metrics=metrics,
                  publish=lambda out: write_json(out / LABEL_MAP_FILE, lmap.doc, indent=1))
