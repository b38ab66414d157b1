"""The pixel-attention stage's trained module (PASS sec. 4.3, eq. 6): only the attention is a parameter, and the
clustering loss on attention-pooled embeddings reaches every one of its weights (the frozen representation gets none)."""
import torch

from trainers.luss.losses import swapped_prediction, swav_codes
from trainers.luss.model import RepresentationModel, sub_state
from trainers.stages.pixel_attention import AttentionTrainer


def test_the_clustering_loss_reaches_every_attention_weight_and_nothing_else():
    torch.manual_seed(0)
    rep = RepresentationModel("test_convnext", 16, feat_dim=8, hidden_dim=16, num_prototypes=8)
    state = rep.state_dict()
    doc = {"timm_name": "test_convnext", "state_dict": sub_state(state, "backbone.net"),
           "extra": {"model_kwargs": {"output_stride": 16}, "config": {"feat_dim": 8, "hidden_dim": 16, "num_prototypes": 8},
                     "heads": {"projection": sub_state(state, "projection"), "prototypes": sub_state(state, "prototypes")}}}
    model = AttentionTrainer(doc, upsample=4, queue_length=0).train()
    assert {n for n, _ in model.named_parameters()} == {f"attention.{n}" for n, _ in model.attention.named_parameters()}
    out = model(torch.rand(2 * 6, 3, 64, 64))  # two crops of 6 images, view-major
    logits = list(out["logits"].split(6))
    loss = swapped_prediction(logits, swav_codes(logits, out["embeddings"], out["prototypes"], None, 0.05, 3), 0.1)
    loss.backward()
    for name, p in model.attention.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    frozen = model.frozen
    assert all(p.grad is None for p in [*frozen.backbone.parameters(), *frozen.projection.parameters()])
