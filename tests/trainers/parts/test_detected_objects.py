"""The detections parts are assigned to without GT objects: deduplicated alike for models and the k-means baseline."""
from __future__ import annotations

import torch

from trainers.models.segmenter import InstancePredictions
from trainers.parts.objects import image_objects
from trainers.parts.pixel_clusters import _not_duplicates

CATEGORIES = [{"id": 7, "name": "a"}, {"id": 9, "name": "b"}]


def _detections() -> InstancePredictions:
    masks = torch.zeros(4, 8, 8, dtype=torch.bool)
    masks[0, :4, :4] = True             # an object
    masks[1, :4, :3] = True             # the same object again, another class (IoU 0.75 with 0), lower score
    masks[2, 4:, 4:] = True             # another object
    masks[3, 4:, :2] = True             # below the score threshold
    return InstancePredictions(scores=torch.tensor([0.9, 0.8, 0.7, 0.2]), labels=torch.tensor([0, 1, 1, 0]), masks=masks,
                               query_features=torch.zeros(4, 2), query_indices=torch.arange(4))


def test_a_duplicate_detection_of_another_class_is_dropped_only_when_asked():
    record = {"height": 8, "width": 8, "objects": []}
    masks, _, cats = image_objects(record, _detections(), 0.5, CATEGORIES, torch.device("cpu"))
    assert cats == [7, 9, 9] and masks.shape[0] == 3
    masks, ids, cats = image_objects(record, _detections(), 0.5, CATEGORIES, torch.device("cpu"), nms_iou=0.5)
    assert cats == [7, 9] and ids == [None, None]
    assert masks[0].sum() == 16 and masks[1][4:, 4:].all()  # the better-scored copy and the other object, in order
    masks, _, cats = image_objects(record, _detections(), 0.5, CATEGORIES, torch.device("cpu"), nms_iou=0.8)
    assert cats == [7, 9, 9]  # IoU 0.75 is not above 0.8


def test_cluster_pixels_drops_the_same_duplicates():
    pred = _detections()
    keep = pred.scores > 0.5
    assert _not_duplicates(pred.masks[keep], pred.scores[keep], None) == [True, True, True]
    assert _not_duplicates(pred.masks[keep], pred.scores[keep], 0.5) == [True, False, True]
