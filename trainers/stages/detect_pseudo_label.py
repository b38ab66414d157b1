"""Stage ``detect-pseudo-label``: the pseudo-label set D^p of CaSP (sec. 3.1, eq. 2-3).

The labeling detector ``inputs.models.detector`` predicts instances on ``inputs.datasets.images`` (after the
augmentation ``params.augment``); after a mask NMS (``params.nms_iou``), predictions with score > delta become the
image's ``proposals`` (``trainers.data.pseudo_labels``), class-agnostic under alpha(.) or with their class; an image
left without one is dropped and counted (eq. 3); ground-truth objects of the input are never copied. A map over
shards (``trainers.shardmap``). An empty D^p is an error naming delta and the score distribution.
Params: ``python -m trainers detect-pseudo-label --help``.
"""
from __future__ import annotations

import time

import torch

from contract.spec import StageSpec
from contract.stages import params_of
from trainers.data.pseudo_labels import EmptyPseudoLabels, PseudoLabelCounts, augment, empty_message, pseudo_labels, with_pseudo_labels
from trainers.data.panoptic import is_thing
from trainers.inputs import StageInputError, load_model_input, model_input_path
from trainers.shardmap import ShardMap


def run(spec: StageSpec):
    """Label this rank's share into ``<out>/rank-<r>``; rank 0 publishes the merged D^p and returns the counts."""
    p = params_of(spec)
    sm = ShardMap(spec, p, name="pseudo-labels")
    d = sm.dist
    if not p.class_agnostic and not sm.index.categories:
        raise StageInputError(f"inputs.datasets.images ({sm.images}) has no categories (an imported image folder?): "
                              "class-specific pseudo-labels (class_agnostic: false) name the classes of the images' "
                              "category list; label it class-agnostic, or split it from a labeled dataset")
    things = [c for c in sm.index.categories if is_thing(c)]  # class indices of a class-specific detector: things only
    index_to_cat = None if p.class_agnostic else {i: int(c["id"]) for i, c in enumerate(things)}
    _check_entities(spec, p.entities)

    def samples(counts: PseudoLabelCounts):
        """The shard map's overlapped loop (trainers/shardmap.py "Overlap"): decode + augment in its loader thread,
        the forward pass in its labelling thread, thresholding + RLE encoding here as the shards are written."""
        detector = load_model_input(spec, "detector", d.device)
        # everything since the map started (the input checks, importing the model code, loading the detector) is
        # set-up, apart from the labelling loop the share outside the forward pass is about
        counts.load_s += time.perf_counter() - sm.t0

        def label(keys, images, records, stats: PseudoLabelCounts):
            t0 = time.perf_counter()
            with torch.no_grad():
                preds = detector.predict(images, top_k=p.max_detections)
            stats.forward_s += time.perf_counter() - t0
            return preds

        def finish(key, blob, image, record, pred):
            counts.images += 1
            counts.gt_objects_dropped += len(record.get("objects", [])) + len(record.get("stuff", []))
            counts.count_scores(pred.scores)
            labels = pseudo_labels(pred, p.delta, index_to_cat, p.nms_iou, counts)
            if not labels:  # eq. 3: D^p holds images with at least one pseudo-label
                counts.images_without_labels += 1
                return None
            counts.labels += len(labels)
            return key, blob if p.augment == "none" else image, with_pseudo_labels(record, labels)

        prepare = None if p.augment == "none" else (lambda key, image: augment(image, key, p.augment, p.seed))
        return sm.labelled(label, counts, prepare=prepare, finish=finish)

    counts = PseudoLabelCounts()
    counts = sm.write_part(lambda: samples(counts), counts)

    def metrics(total: PseudoLabelCounts, wall: float, merged) -> dict[str, float]:
        if total.labels == 0:  # every rank raises: nothing waits on a collective
            raise EmptyPseudoLabels(empty_message(p.delta, total))
        out = total.as_metrics()
        # the labeling loop: every rank's wall time less its detector load; outside forward = decode, augment,
        # RLE-encode, write shards, publish (docs/architecture.md "Scale")
        loop_s = max(wall * d.world_size - total.load_s, 1e-9)
        out["pseudo/images_per_s"] = total.images / max(wall, 1e-9)
        out["pseudo/share_outside_forward"] = max(0.0, 1.0 - total.forward_s / loop_s)
        if merged is not None:
            out["pseudo/bytes_per_sample"] = sum(
                f.stat().st_size for f in sm.out.rglob("*") if f.is_file()) / max(1, merged.num_samples)
        return out

    return sm.finish(counts, metrics)


def _check_entities(spec: StageSpec, entities: bool) -> None:
    """params.entities must say what the detector is (CaSP sec. 3.3): an entity detector's object pseudo-labels would
    carry stuff regions, and an object detector finds no stuff to keep."""
    from trainers.models.io import read_segmenter_file

    path = model_input_path(spec, "detector")
    try:
        trained_on = bool(read_segmenter_file(path).get("entities", False))
    except (FileNotFoundError, ValueError) as e:
        raise StageInputError(f"inputs.models.detector: {e}") from e
    if trained_on != entities:
        what = "entities (things and stuff)" if trained_on else "objects only"
        raise StageInputError(f"inputs.models.detector ({path}) was trained on {what} but params.entities is "
                              f"{str(entities).lower()}: set entities: {str(trained_on).lower()}, or label with a "
                              "detector trained the other way (instance-teacher entities)")
