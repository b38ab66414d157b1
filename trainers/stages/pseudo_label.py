"""Stage ``pseudo-label``: the next round's part proposals from the current part model (PartDistillation sec. 4.2).

The part model ``inputs.models.parts`` (the ``teacher`` alias of the part-proposal model) predicts part masks on
``inputs.datasets.images``; the instances are the instance teacher's detections (``inputs.models.instance_teacher``)
or, with ``objects: gt``, the records' own object masks. The predictions are filtered and clipped to their
instance by the self-training filters of ``trainers.parts.filters``. A map over shards (``trainers.shardmap``):
records are the input record with ``proposals`` replaced. Params: ``python -m trainers pseudo-label --help``.
"""
from __future__ import annotations

import torch

from contract.spec import StageSpec
from contract.stages import params_of
from trainers.data.batches import at_input_size
from trainers.inputs import load_model_input
from trainers.parts.filters import PseudoLabelStats, filter_parts
from trainers.parts.objects import detected_objects, gt_objects
from trainers.shardmap import ShardMap


def run(spec: StageSpec):
    """Pseudo-label this rank's share into ``<out>/rank-<r>``; rank 0 publishes the merged dataset and returns counts."""
    p = params_of(spec)
    sm = ShardMap(spec, p, name="pseudo-labels")

    def labeller(d):
        parts = at_input_size(load_model_input(spec, "parts", d.device), p)
        teacher = at_input_size(load_model_input(spec, "instance_teacher", d.device), p) if p.objects == "detected" else None

        def label(keys, images, records, stats: PseudoLabelStats) -> list[list[dict]]:
            with torch.no_grad():
                part_preds = parts.predict(images)
                object_preds = teacher.predict(images, top_k=p.max_detections) if teacher is not None else None
            out = []
            for b, record in enumerate(records):
                if object_preds is None:
                    masks, ids = gt_objects(record, d.device)
                else:
                    masks, ids = detected_objects(object_preds[b], record, p.object_score_threshold)
                stats.images += 1
                stats.objects += len(ids)
                stats.images_without_objects += not ids
                proposals = filter_parts(part_preds[b].masks, part_preds[b].scores, masks, ids, p, stats)
                stats.images_without_proposals += not proposals
                out.append(proposals)
            return out

        return label

    return sm.run(labeller, PseudoLabelStats(), allow_parts=p.allow_parts)
