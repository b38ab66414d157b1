"""trainers.luss.labels: the pixel-label rule of sec. 4.3 (eq. 7) and its record form."""
import numpy as np
import torch
import torch.nn.functional as F

from trainers.luss.labels import (
    LabelRule,
    border_contrast,
    features_and_attention,
    label_maps,
    labels_to_proposals,
    otsu_threshold,
    proposals_to_labels,
)


def _rule(method, k, **kw):
    return LabelRule(method=method, k=k, threshold=kw.get("threshold"), other_cluster=kw.get("other"), upsample=1,
                     timm_name="test_convnext", output_stride=16, model=None)


def test_pixels_below_the_threshold_are_other_and_the_rest_take_the_nearest_centroid():
    feats = F.normalize(torch.tensor([[[[1.0, 0.0], [0.0, 1.0]], [[0.0, 1.0], [1.0, 0.0]]]]), dim=1)  # [1, 2, 2, 2]
    att = torch.tensor([[[[0.9, 0.9], [0.9, 0.1]]]]).expand(1, 2, 2, 2)
    centroids = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    labels = label_maps(_rule("pixel_attention", 2, threshold=0.5), centroids, feats, att, (2, 2))
    assert labels.tolist() == [[[1, 2], [2, 0]]]


def test_the_kmeans_rule_maps_its_other_cluster_to_zero():
    feats = F.normalize(torch.tensor([[[[1.0, 0.0, 0.0]], [[0.0, 1.0, 0.0]], [[0.0, 0.0, 1.0]]]]), dim=1)  # [1, 3, 1, 3]
    labels = label_maps(_rule("pixel_kmeans", 2, other=1), torch.eye(3), feats, None, (1, 3))
    assert labels.tolist() == [[[1, 0, 2]]]


def test_label_maps_survive_the_record_round_trip():
    m = np.zeros((6, 6), np.int64)
    m[1:3, 1:3], m[4:, :] = 2, 5
    props = labels_to_proposals(m)
    assert sorted(p["label"] for p in props) == [2, 5]
    assert np.array_equal(proposals_to_labels({"height": 6, "width": 6, "proposals": props}), m)
    assert labels_to_proposals(np.zeros((3, 3), np.int64)) == []  # an all-'other' image


def test_otsu_splits_a_bimodal_histogram_between_its_modes():
    hist = np.zeros(100, np.int64)
    hist[20:25], hist[70:75] = 100, 50
    assert 0.25 <= otsu_threshold(hist) <= 0.70


def test_the_border_contrast_is_positive_for_attention_inside_and_negative_for_attention_on_the_border():
    inside = torch.zeros(2, 3, 16, 16)
    inside[:, :, 4:12, 4:12] = 1.0  # an object in the middle
    c = border_contrast(inside)
    assert c.shape == (2,) and torch.allclose(c, torch.full((2,), 64 / 144))  # inside (12x12): 64 ones of 144; border: 0
    assert torch.allclose(border_contrast(1.0 - inside), -c)
    assert border_contrast(torch.rand(1, 3, 2, 2)).tolist() == [0.0]  # no inside at this size: no evidence


def test_a_flipped_rule_uses_one_minus_the_attention():
    class Backbone(torch.nn.Module):
        def forward(self, images):
            return [images[:, :2]]

    class Attention(torch.nn.Module):
        def forward(self, feats):
            return feats.abs()

    images = torch.rand(1, 3, 4, 4)
    feats, att = features_and_attention(Backbone(), Attention(), images, 1)
    _, flipped = features_and_attention(Backbone(), Attention(), images, 1, flipped=True)
    assert torch.allclose(flipped, 1 - att)
    assert LabelRule(method="pixel_attention", k=1, threshold=0.5, other_cluster=None, upsample=1, timm_name="t",
                     output_stride=16, model=None).attention_flipped is False  # rule files from before the check load as before
