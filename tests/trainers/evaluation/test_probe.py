"""The linear probe learns a linearly separable labelling and is scored without matching."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from trainers.evaluation.probe import LinearProbe, identity_scores
from trainers.evaluation.semantic import Confusion


def test_the_probe_separates_linearly_separable_pixels():
    torch.manual_seed(0)
    centres = torch.eye(3, 8) * 4
    labels = torch.randint(0, 3, (600,))
    feats = centres[labels] + torch.randn(600, 8) * 0.3
    probe = LinearProbe(8, 3)
    probe.fit(feats, labels, epochs=30, lr=0.05)
    fmap = (centres[torch.tensor([[0, 1], [2, 0]])] + torch.randn(2, 2, 8) * 0.3).permute(2, 0, 1)[None]
    assert probe.logits(fmap).argmax(1)[0].tolist() == [[0, 1], [2, 0]]


def test_identity_scores_do_not_match_clusters_to_classes():
    conf = Confusion(2, 2)
    conf.add(np.array([1, 1, 0, 0]), np.array([0, 0, 1, 1]))  # perfectly swapped: Hungarian would say 1.0
    s = identity_scores(conf)
    assert s.miou == 0.0 and s.pixel_accuracy == 0.0
    conf.add(np.array([0, 1]), np.array([0, 1]))
    assert identity_scores(conf).pixel_accuracy == pytest.approx(2 / 6)


def test_an_empty_probe_set_is_an_error():
    with pytest.raises(ValueError, match="no labelled pixel"):
        LinearProbe(4, 2).fit(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long))
