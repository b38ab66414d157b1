"""trainers.luss.multicrop: views, their overlap grids (the P2P pixel pairs) and images-only transforms."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from trainers.luss.multicrop import ImagesOnly, MultiCrop, collate_views, crop, overlap_grids, to_tensor


def _ramp(h=40, w=48):
    """An image whose pixels say where they are: R = x, G = y."""
    img = np.zeros((h, w, 3), np.uint8)
    img[..., 0] = np.linspace(0, 255, w)[None, :]
    img[..., 1] = np.linspace(0, 255, h)[:, None]
    return img


@pytest.mark.parametrize("flip_a,flip_b", [(False, False), (True, False), (False, True), (True, True)])
def test_the_overlap_grids_sample_the_same_image_positions_in_both_views(flip_a, flip_b):
    x = to_tensor(_ramp())
    box_a, box_b = (-0.8, -0.6, 0.4, 0.7), (-0.2, -0.9, 0.9, 0.3)
    va, vb = crop(x, box_a, flip_a, 64), crop(x, box_b, flip_b, 64)
    grids, valid = overlap_grids(box_a, flip_a, box_b, flip_b, 5)
    assert valid
    sa = F.grid_sample(va[None], torch.from_numpy(grids[0])[None], align_corners=False)[0]
    sb = F.grid_sample(vb[None], torch.from_numpy(grids[1])[None], align_corners=False)[0]
    assert torch.allclose(sa[:2], sb[:2], atol=0.02)  # same x and y colour codes: the same positions


def test_views_that_do_not_overlap_are_invalid():
    _, valid = overlap_grids((-1, -1, -0.5, -0.5), False, (0, 0, 1, 1), False, 3)
    assert not valid


def test_multicrop_batches_views_view_major_and_never_sees_the_record():
    mc = MultiCrop(32, (0.3, 1.0), 16, 3, (0.05, 0.3), 4)
    t = ImagesOnly(mc)
    items = [t(("k", _ramp(), {"objects": "never read"})) for _ in range(2)]
    b = collate_views(items)
    assert b["globals"].shape == (4, 3, 32, 32) and b["locals"].shape == (6, 3, 16, 16)
    assert b["grids"].shape == (2, 2, 4, 4, 2) and b["valid"].shape == (2,)
    assert torch.equal(b["globals"][1], items[1]["globals"][0])  # view 0 of image 1 follows view 0 of image 0
