"""Diagnosis of a LUSS (PASS) run's representation and pixel attention (issue 13; BENCHMARKS.md "PASS / LUSS").

    python benchmarks/luss_diagnose.py <run-dir> data/partworld-demo/val [--images 300]

For every model file of the run it finds (``random-init``, ``represent``, ``pixel-attention``), on the first
``--images`` images of the split:

- **collapse**: the effective rank (exp of the entropy of the normalised singular values) of sampled pixel features,
  and the mean pairwise cosine of the images' pooled embeddings (attention-pooled where the file has an attention);
- **attention** (pixel-attention files): the AUROC of the mean attention as a foreground detector against the split's
  ground-truth objects, and the label-free border prior the labelling stage uses
  (``trainers.luss.labels.border_contrast``): mean attention inside minus on the image border.

It reads the split's ground truth: a diagnosis, never part of the method (no stage reads what this prints).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from trainers.data import shards  # noqa: E402
from trainers.data.batches import images_to_tensor  # noqa: E402
from trainers.luss.labels import border_contrast, features_and_attention  # noqa: E402
from trainers.luss.model import PixelAttention, attention_pool, backbone_from, read_model_file  # noqa: E402
from trainers.structures import decode_mask  # noqa: E402


def effective_rank(x: np.ndarray) -> float:
    s = np.linalg.svd(x - x.mean(0), compute_uv=False)
    p = s / s.sum()
    p = p[p > 0]
    return float(np.exp(-(p * np.log(p)).sum()))


def auroc(score: np.ndarray, label: np.ndarray) -> float:
    order = np.argsort(score, kind="stable")
    ranks = np.empty(len(score))
    ranks[order] = np.arange(1, len(score) + 1)
    pos = label.sum()
    neg = len(label) - pos
    return float((ranks[label].sum() - pos * (pos + 1) / 2) / max(pos * neg, 1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("split", type=Path)
    ap.add_argument("--images", type=int, default=300)
    ap.add_argument("--upsample", type=int, default=4)
    a = ap.parse_args()
    torch.set_grad_enabled(False)
    samples = []
    for i, (_, image, record) in enumerate(shards.iter_samples(a.split, allow_parts=True)):
        if i >= a.images:
            break
        fg = np.zeros(image.shape[:2], dtype=bool)
        for o in record.get("objects", []):
            fg |= decode_mask(o["segmentation"])
        samples.append((image, fg))
    rng = np.random.default_rng(0)
    print(f"{a.split}: {len(samples)} images, foreground share {np.mean([fg.mean() for _, fg in samples]):.3f}")
    for name in ("random-init", "represent", "pixel-attention"):
        path = a.run / name / "model.pt"
        if not path.is_file():
            continue
        doc = read_model_file(path)
        backbone = backbone_from(doc).eval()
        attention = None
        if "pixel_attention" in doc["extra"]:
            attention = PixelAttention(backbone.out_channels)
            attention.load_state_dict(doc["extra"]["pixel_attention"])
            attention.eval()
        pix, emb, att_scores, att_fg, contrast = [], [], [], [], []
        for j in range(0, len(samples), 32):
            group = samples[j:j + 32]
            images = images_to_tensor([g[0] for g in group])
            feats, att = features_and_attention(backbone, attention, images, a.upsample)
            flat = feats.flatten(2).permute(0, 2, 1)  # [B, hw, C]
            idx = rng.integers(0, flat.shape[1], size=16)
            pix.append(flat[:, idx].reshape(-1, flat.shape[-1]).numpy())
            pooled = attention_pool(feats, att) if att is not None else feats.mean((2, 3))
            emb.append(torch.nn.functional.normalize(pooled, dim=1).numpy())
            if att is not None:
                up = torch.nn.functional.interpolate(att.mean(1, keepdim=True), size=images.shape[-2:], mode="bilinear",
                                                     align_corners=False)[:, 0].numpy()
                contrast.append(border_contrast(att).numpy())
                for m, (_, fg) in zip(up, group):
                    att_scores.append(m[: fg.shape[0], : fg.shape[1]].ravel())
                    att_fg.append(fg.ravel())
        e = np.concatenate(emb)
        cos = e @ e.T
        mean_cos = float((cos.sum() - len(e)) / (len(e) * (len(e) - 1)))
        line = f"{name:16s} effective rank {effective_rank(np.concatenate(pix)):6.1f}  mean embedding cosine {mean_cos:.3f}"
        if att_scores:
            c = np.concatenate(contrast)
            line += (f"  attention AUROC (fg) {auroc(np.concatenate(att_scores), np.concatenate(att_fg)):.3f}"
                     f"  border contrast {c.mean():+.4f} (images with inside > border: {(c > 0).mean():.2f})")
        print(line)


if __name__ == "__main__":
    main()
