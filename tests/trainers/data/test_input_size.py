"""The input size (detectron2's ResizeShortestEdge): shapes, the training transforms, and a model seen through it."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from contract.stages import ParamsError, get
from trainers.data.batches import AtInputSize, InputSize, StrongAugment, ToTrainSample, at_input_size
from trainers.models.config import DecoderConfig, EncoderConfig, SegmenterConfig
from trainers.models.segmenter import Segmenter


@pytest.mark.parametrize("size, hw, expected", [
    (InputSize(800, 1333), (480, 640), (800, 1067)),      # detectron2: shortest edge to 800
    (InputSize(800, 1333), (400, 1200), (444, 1333)),     # ... unless the longest would exceed 1333
    (InputSize(128), (512, 512), (128, 128)),
    (InputSize(128), (96, 64), (192, 128)),               # small images grow, as detectron2's
    (InputSize(None, 256), (512, 1024), (128, 256)),      # max_size alone shrinks only large images
    (InputSize(None, 256), (100, 200), (100, 200)),
    (InputSize(), (37, 41), (37, 41)),                    # off: as stored
])
def test_shape_follows_the_shortest_edge_convention(size, hw, expected):
    assert size.shape(*hw) == expected


def test_stage_params_take_the_input_size_and_refuse_max_below_min():
    assert get("mine-parts").parse({"min_size": 128, "max_size": 256}).min_size == 128
    assert get("train-proposals").parse({}).min_size is None
    with pytest.raises(ParamsError, match="max_size"):
        get("evaluate-parts").parse({"min_size": 256, "max_size": 128})


def _record(size: int) -> dict:
    from trainers.structures import encode_mask

    m = np.zeros((size, size), dtype=bool)
    m[size // 4: size // 2, size // 4: 3 * size // 4] = True
    return {"height": size, "width": size, "proposals": [{"segmentation": encode_mask(m)}]}


def _targets(record):
    from trainers.data.batches import proposal_targets

    return proposal_targets(record)


def test_training_transforms_resize_image_and_targets_together():
    image = np.random.default_rng(0).integers(0, 255, (256, 256, 3), dtype=np.uint8)
    img, t = ToTrainSample(_targets, flip_prob=0.0, size=InputSize(64))(("k", image, _record(256)))
    assert img.shape == (3, 64, 64) and t["masks"].shape == (1, 64, 64)
    assert t["masks"][0, 16:32, 16:48].all() and t["masks"].sum() == 16 * 32   # the box, scaled by 1/4
    np.random.seed(0)
    img, t = StrongAugment(_targets, size=InputSize(64))(("k", image, _record(256)))
    assert img.shape == (3, 64, 64) and t["masks"].shape[1:] == (64, 64)
    img, t = ToTrainSample(_targets, flip_prob=0.0)(("k", image, _record(256)))   # default: as stored
    assert img.shape == (3, 256, 256) and t["masks"].shape == (1, 256, 256)


def _tiny_model() -> Segmenter:
    torch.manual_seed(0)
    cfg = SegmenterConfig(encoder=EncoderConfig(backbone="test_convnext", pixel_dim=16, mask_dim=16, norm_groups=4),
                          decoder=DecoderConfig(num_classes=1, num_queries=4, hidden_dim=16, num_heads=2,
                                                dim_feedforward=32, num_layers=1), top_k=4)
    return Segmenter(cfg).eval()


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_a_model_at_an_input_size_sees_small_images_and_answers_at_the_given_size(one_thread):
    model = _tiny_model()
    seen = []
    model.encoder.register_forward_pre_hook(lambda _, args: seen.append(tuple(args[0].shape[-2:])))
    x = torch.rand(2, 3, 128, 96)
    wrapped = at_input_size(model, get("pseudo-label").parse({"min_size": 48}))
    assert isinstance(wrapped, AtInputSize)
    preds = wrapped.predict(x)
    assert seen == [(64, 48)]                                    # shortest edge 96 -> 48
    assert len(preds) == 2 and preds[0].masks.shape == (4, 128, 96)
    # the inner model's mask logits at 64 x 48, upsampled to the stored size (not a nearest-neighbour copy of its masks)
    from trainers.models.segmenter import postprocess

    direct = postprocess(model(InputSize(48).images(x)), (128, 96), 4)
    assert torch.equal(direct[0].masks, preds[0].masks) and torch.allclose(direct[0].scores, preds[0].scores)
    assert [f.shape for f in wrapped.pixel_features(x)] == [f.shape for f in model.pixel_features(InputSize(48).images(x))]
    assert at_input_size(model, get("pseudo-label").parse({})) is model   # off: the model itself
