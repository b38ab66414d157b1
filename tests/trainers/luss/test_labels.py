"""trainers.luss.labels: the pixel-label rule of sec. 4.3 (eq. 7) and its record form."""
import numpy as np
import torch
import torch.nn.functional as F

from trainers.luss.labels import LabelRule, label_maps, labels_to_proposals, otsu_threshold, proposals_to_labels


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
