"""Stage ``mine-parts``: class-agnostic part proposals by k-means inside object instances (PartDistillation sec. 4.2).

The teacher's multi-scale pixel features inside each instance (its detections, or the records' objects with
``objects: gt``) are clustered by k-means (``trainers.parts.mining``); every cluster that covers enough of its
instance is a proposal, scored by the instance's score times the cluster's cohesion
(``trainers.parts.mining.proposal_score``). Output: every input record plus ``proposals``
(``{"object_id", "segmentation", "score", "area", "label": 0, "object_score"}``, see ``trainers.structures``);
``parts`` are never copied. A map over shards (``trainers.shardmap``). Params: ``python -m trainers mine-parts --help``.

Metrics (summed over ranks): ``mine/<counter>`` of :class:`~trainers.parts.mining.MiningStats`,
``mine/proposals_per_object``, ``mine/share_outside_forward``, ``mine/wall_seconds`` (slowest rank),
``mine/images_per_second``, ``mine/objects_per_second``, ``mine/dataset_samples``.
"""
from __future__ import annotations

from contract.spec import StageSpec
from contract.stages import params_of
from trainers.data.batches import at_input_size
from trainers.inputs import load_model_input
from trainers.parts.mining import MiningStats, mine_batch
from trainers.shardmap import ShardMap


def run(spec: StageSpec):
    """Mine this rank's share into ``<dataset>/rank-<r>``, then rank 0 publishes the merged dataset."""
    p = params_of(spec)
    sm = ShardMap(spec, p, name=spec.name)

    def labeller(d):
        model = at_input_size(load_model_input(spec, "teacher", d.device), p)
        return lambda keys, images, records, stats: mine_batch(model, keys, images, records, p, stats)

    def metrics(total: MiningStats, wall: float, merged) -> dict[str, float]:
        wall = max(wall, 1e-9)
        out = total.as_metrics()
        out["mine/wall_seconds"] = wall
        out["mine/images_per_second"] = total.images / wall
        out["mine/objects_per_second"] = (total.objects - total.objects_too_small) / wall
        if merged is not None:
            out["mine/dataset_samples"] = float(merged.num_samples)
        return out

    return sm.run(labeller, MiningStats(), same_size=True, allow_parts=p.allow_parts, metrics=metrics)
