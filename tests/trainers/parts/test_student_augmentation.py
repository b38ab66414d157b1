"""Self-training as the paper intends (issue 11 item 4): the student's strong augmentation and the eq. 2 score as the
pseudo-label's confidence. The teacher's labels are made on un-augmented images and move with the student's input."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from trainers.data.batches import StrongAugment, ToTrainSample, proposal_targets
from trainers.parts.label_map import LabelMap
from trainers.parts.ranking import RankerTargets
from trainers.structures import encode_mask


def _sample(h: int = 48, w: int = 64):
    """A grey image with two coloured rectangles, each a proposal."""
    image = np.full((h, w, 3), 128, dtype=np.uint8)
    a = np.zeros((h, w), dtype=bool)
    a[5:25, 4:30] = True
    b = np.zeros((h, w), dtype=bool)
    b[28:44, 36:60] = True
    image[a] = (250, 10, 10)
    image[b] = (10, 10, 250)
    record = {"height": h, "width": w, "proposals": [{"segmentation": encode_mask(a), "score": 0.9},
                                                     {"segmentation": encode_mask(b), "score": 0.2}]}
    return ("k", image, record), (a, b)


def test_the_targets_move_with_the_cropped_image():
    np.random.seed(0)
    sample, _ = _sample()
    aug = StrongAugment(proposal_targets, flip_prob=0.5, scale=(0.3, 0.6), brightness=0.0, contrast=0.0, saturation=0.0)
    crops = 0
    for _ in range(20):
        img, target = aug(sample)
        assert img.shape == (3, 48, 64) and target["masks"].shape[1:] == (48, 64)
        assert len(target["labels"]) == len(target["masks"]) >= 0
        for m in target["masks"]:
            inside = img[:, m]  # every pixel of a target mask shows its rectangle's colour (red or blue), never grey
            red, blue = inside[0] > 0.6, inside[2] > 0.6
            assert (red | blue).float().mean() > 0.8  # bilinear resizing blends the rim
        crops += int(target["masks"].sum() != sum(int(x.sum()) for x in proposal_targets(sample[2])["masks"]))
    assert crops > 10  # the crops really change the targets' extent


def test_colour_jitter_changes_the_image_not_the_targets():
    np.random.seed(1)
    sample, _ = _sample()
    plain = ToTrainSample(proposal_targets, flip_prob=0.0)(sample)
    img, target = StrongAugment(proposal_targets, flip_prob=0.0, scale=(1.0, 1.0), brightness=0.4, contrast=0.4,
                                saturation=0.4)(sample)
    assert torch.equal(target["masks"], plain[1]["masks"])
    assert not torch.allclose(img, plain[0]) and 0.0 <= float(img.min()) and float(img.max()) <= 1.0


def test_a_target_the_crop_leaves_empty_is_dropped():
    sample, (a, _) = _sample()
    aug = StrongAugment(proposal_targets, flip_prob=0.0, scale=(0.05, 0.05), brightness=0.0, contrast=0.0, saturation=0.0)
    np.random.seed(3)
    for _ in range(10):
        _, target = aug(sample)
        assert all(m.any() for m in target["masks"]) and len(target["labels"]) == len(target["masks"]) < 2


def test_bad_scale_is_an_error():
    with pytest.raises(ValueError, match="scale"):
        StrongAugment(proposal_targets, scale=(0.0, 1.0))


def test_the_eq2_score_filters_ranker_targets():
    sample, _ = _sample()
    record = {**sample[2], "proposals": [{**p, "category_id": 1, "label": i} for i, p in enumerate(sample[2]["proposals"])]}
    lmap = LabelMap.from_doc({"k": 2, "num_labels": 2, "classes": [{"category_id": 1, "num_clusters": 2, "offset": 0}]})
    assert RankerTargets(lmap)(record)["labels"].tolist() == [0, 1]
    assert RankerTargets(lmap, min_score=0.5)(record)["labels"].tolist() == [0]
