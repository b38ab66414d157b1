"""Label-free semantic segmentation from a dense representation, scored against ground truth.

The protocol (SlotCon supplement A.3, on PartWorld and on COCO-Stuff-style data): every pixel of the evaluated split
gets a cluster id, the clusters are matched to the ground-truth categories (``trainers.evaluation.semantic``) and
mIoU and pixel accuracy are reported. The ground truth of an image is its object classes, with background (no
object) a category of its own, as COCO-Stuff's stuff classes are: ``n_gt = classes + 1``. Cluster ids come from

- ``kmeans``: spherical k-means (faiss) of the L2-normalised backbone features, K = n_gt, Hungarian matching;
- ``overcluster``: the same with K > n_gt, many-to-one matching (Leopart's overclustering);
- ``community``: the overclusters merged by community detection (``trainers.dense.community``), Hungarian matching;
- ``prototypes``: the learned prototypes as a 1x1 classifier (SlotCon eq. 1), Hungarian and many-to-one;
- ``probe``: a linear classifier trained on a labelled split (``trainers.evaluation.probe``), identity mapping.

Logits are computed on the feature grid and bilinearly resized to the image before the argmax (eq. 1). The k-means
are fitted on a sample of the evaluated split's own pixels (no label read: Leopart's protocol on PVOC val). Two
streaming passes: one samples pixels for k-means, one assigns and counts; no per-image state is kept except the
segments of the concept index (one vector per image and prototype).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import faiss
import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from trainers.comm import Dist, all_gather
from trainers.data import shards
from trainers.data.batches import category_labels, images_to_tensor, iter_batches
from trainers.dense.backbone import DenseBackbone, load_backbone
from trainers.dense.community import Cooccurrence, communities, merge_rows
from trainers.dense.heads import Projector, prototype_scores
from trainers.evaluation.concepts import SegmentIndex
from trainers.evaluation.probe import LinearProbe, identity_scores
from trainers.evaluation.semantic import Confusion, score
from trainers.structures import decode_mask


@dataclass
class Representation:
    """A backbone, and for a learned representation its projector and prototypes (the 1x1 classifier)."""

    backbone: DenseBackbone
    projector: Projector | None = None
    prototypes: Tensor | None = None
    stage: str = "random-init"

    @classmethod
    def from_blob(cls, blob: dict[str, Any]) -> "Representation":
        """From a representation file's dict (``trainers.dense.io.read_representation``)."""
        extra = blob["extra"]
        projector = None
        if extra.get("projector_config") and extra.get("projector"):
            projector = Projector.from_config(extra["projector_config"])
            projector.load_state_dict(extra["projector"])
            projector.eval()
        protos = extra.get("prototypes")
        return cls(load_backbone(blob), projector, protos.float() if isinstance(protos, Tensor) else None, blob["stage"])

    @torch.no_grad()
    def features(self, images: Tensor) -> Tensor:
        """L2-normalised backbone features [B, C, h, w]."""
        return F.normalize(self.backbone(images).float(), dim=1)

    @torch.no_grad()
    def prototype_logits(self, images: Tensor) -> tuple[Tensor, Tensor] | None:
        """(scores [B, K, h, w], embeddings [B, D, h, w]) of the prototypes as a 1x1 classifier; None without them."""
        if self.prototypes is None:
            return None
        feats = self.backbone(images).float()
        z = self.projector(feats) if self.projector is not None else feats
        return prototype_scores(z, self.prototypes), F.normalize(z, dim=1)


def ground_truth(record: dict, labels: dict[int, int]) -> np.ndarray:
    """[H, W] int64: 0 background, 1 + class index for each object's pixels (later objects drawn over earlier)."""
    gt = np.zeros((int(record["height"]), int(record["width"])), dtype=np.int64)
    for o in record.get("objects", []):
        cat = int(o["category_id"])
        if cat not in labels:
            raise ValueError(f"sample {record.get('key')!r}: object category {cat} not in the dataset's categories")
        gt[decode_mask(o["segmentation"]).astype(bool)] = labels[cat] + 1
    return gt


@dataclass
class EvalSettings:
    batch_size: int = 16
    eval_size: int | None = None
    kmeans_k: int | None = None
    overcluster_k: int = 50
    fit_pixels: int = 20000
    kmeans_iterations: int = 30
    probe_pixels: int = 20000
    probe_images: int = 200
    probe_epochs: int = 100
    probe_lr: float = 1e-2
    community_resolution: float = 1.0
    concepts_top_k: int = 8
    seed: int = 0


@dataclass
class EvalOutput:
    metrics: dict[str, float]
    details: dict[str, Any]
    concepts: SegmentIndex | None = None
    concept_prototypes: np.ndarray | None = None
    images_needed: set[str] = field(default_factory=set)


def _resized(images: Tensor, size: int | None) -> Tensor:
    return images if size is None else F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)


def _batches(path: str, s: EvalSettings, d: Dist):
    """(keys, images [B, 3, H, W] in [0, 1], records) of this rank's share."""
    for keys, images, records in iter_batches(path, s.batch_size, rank=d.rank, world_size=d.world_size, allow_parts=True):
        yield keys, images_to_tensor(images).to(d.device), records


def _sample(feats: Tensor, n: int, rng: np.random.Generator) -> np.ndarray:
    """Up to ``n`` random pixel vectors [n, C] of a feature map [C, h, w]."""
    flat = feats.flatten(1).T.cpu().numpy()
    take = rng.choice(flat.shape[0], size=min(n, flat.shape[0]), replace=False)
    return flat[take].astype(np.float32)


def _kmeans(x: np.ndarray, k: int, s: EvalSettings) -> np.ndarray:
    """Spherical k-means centroids [k, C] (faiss), seeded."""
    if x.shape[0] < k:
        raise ValueError(f"k-means with k={k} needs at least {k} sampled pixels, got {x.shape[0]}")
    km = faiss.Kmeans(x.shape[1], k, niter=s.kmeans_iterations, seed=s.seed, spherical=True, verbose=False)
    km.train(np.ascontiguousarray(x))
    return km.centroids.copy()


def _broadcast(obj: Any, d: Dist) -> Any:
    holder = [obj]
    if d.world_size > 1:
        dist.broadcast_object_list(holder, src=0)
    return holder[0]


def _labels(logits: Tensor, size: tuple[int, int]) -> np.ndarray:
    """argmax over K of logits [K, h, w] bilinearly resized to ``size`` (SlotCon supplement eq. 1)."""
    up = F.interpolate(logits[None].float(), size=size, mode="bilinear", align_corners=False)[0]
    return up.argmax(0).cpu().numpy()


def _per_image(path: str, total: int) -> int:
    """Pixels to sample from each image so that a split gives about ``total``."""
    return max(1, -(-total // max(1, shards.DatasetIndex.load(path).num_samples)))


def _probe(rep: Representation, path: str, s: EvalSettings, d: Dist, n_gt: int) -> LinearProbe:
    """A linear probe trained (rank 0, then broadcast) on pixels sampled from the labelled split ``path``."""
    labels, rng = category_labels(path), np.random.default_rng(s.seed + d.rank)
    n_images = min(s.probe_images, shards.DatasetIndex.load(path).num_samples)
    xs, ys, per_image, seen = [], [], max(1, -(-s.probe_pixels // n_images)), 0
    for _, x, records in _batches(path, s, d):
        if seen >= -(-n_images // d.world_size):
            break
        seen += len(records)
        feats = rep.features(_resized(x, s.eval_size))
        for f, rec in zip(feats, records):
            gt = torch.from_numpy(ground_truth(rec, labels))[None, None].float()
            g = F.interpolate(gt, size=f.shape[-2:], mode="nearest")[0, 0].long().flatten()
            flat = f.flatten(1).T.cpu()
            take = torch.from_numpy(rng.choice(flat.shape[0], size=min(flat.shape[0], per_image), replace=False))
            xs.append(flat[take])
            ys.append(g[take])
    gathered = all_gather((torch.cat(xs) if xs else torch.zeros(0), torch.cat(ys) if ys else torch.zeros(0, dtype=torch.long)))
    probe = LinearProbe(rep.backbone.dim, n_gt)
    if d.is_main:
        x = torch.cat([g[0] for g in gathered if g[0].numel()])
        y = torch.cat([g[1] for g in gathered if g[1].numel()])
        if x.shape[0] > s.probe_pixels:
            keep = torch.from_numpy(np.random.default_rng(s.seed).choice(x.shape[0], s.probe_pixels, replace=False))
            x, y = x[keep], y[keep]
        torch.manual_seed(s.seed)
        probe.fit(x, y, epochs=s.probe_epochs, lr=s.probe_lr, seed=s.seed)
    probe.load_state_dict(_broadcast(probe.state_dict(), d))
    return probe


def evaluate(rep: Representation, eval_path: str, d: Dist, s: EvalSettings, probe_path: str | None = None) -> EvalOutput | None:
    """Every metric of the module doc on ``eval_path``; rank 0 gets the output, the other ranks None."""
    labels = category_labels(eval_path)
    n_gt = len(labels) + 1
    k = s.kmeans_k or n_gt
    rep.backbone.to(d.device).eval()
    probe = _probe(rep, probe_path, s, d, n_gt) if probe_path else None

    # pass 1: pixels for k-means, sampled evenly over this rank's images
    rng = np.random.default_rng(s.seed + 1000 + d.rank)
    per_image = _per_image(eval_path, s.fit_pixels)
    samples = []
    for _, x, _ in _batches(eval_path, s, d):
        for f in rep.features(_resized(x, s.eval_size)):
            samples.append(_sample(f, per_image, rng))
    centroids = None
    pooled = [a for part in all_gather(samples) for a in part]
    if d.is_main:
        pooled = np.concatenate(pooled)
        pooled = pooled[np.random.default_rng(s.seed).permutation(pooled.shape[0])[: s.fit_pixels]]
        centroids = {"kmeans": _kmeans(pooled, k, s), "overcluster": _kmeans(pooled, s.overcluster_k, s)}
    centroids = {n: torch.from_numpy(c) for n, c in _broadcast(centroids, d).items()}

    # pass 2: assign every pixel, count against the ground truth
    n_proto = 0 if rep.prototypes is None else rep.prototypes.shape[0]
    conf = {"kmeans": Confusion(k, n_gt), "overcluster": Confusion(s.overcluster_k, n_gt)}
    if n_proto:
        conf["prototypes"] = Confusion(n_proto, n_gt)
    if probe is not None:
        conf["probe"] = Confusion(n_gt, n_gt)
    cooc = Cooccurrence(s.overcluster_k)
    concept_dim = rep.prototypes.shape[1] if n_proto else rep.backbone.dim
    index = SegmentIndex(concept_dim)
    for keys, x, records in _batches(eval_path, s, d):
        xs = _resized(x, s.eval_size)
        feats = rep.features(xs)
        protos = rep.prototype_logits(xs)
        for i, (key, rec) in enumerate(zip(keys, records)):
            gt = ground_truth(rec, labels)
            size = gt.shape
            f = feats[i]
            for name in ("kmeans", "overcluster"):
                lab = _labels(torch.einsum("chw,kc->khw", f, centroids[name]), size)
                conf[name].add(lab, gt)
                if name == "overcluster":
                    cooc.add(lab)
            if protos is not None:
                conf["prototypes"].add(_labels(protos[0][i], size), gt)
                index.add_image(key, protos[0][i].argmax(0).cpu().numpy(), protos[1][i].cpu().numpy())
            else:
                index.add_image(key, torch.einsum("chw,kc->khw", f, centroids["kmeans"]).argmax(0).cpu().numpy(),
                                f.cpu().numpy())
            if probe is not None:
                conf["probe"].add(_labels(probe.logits(f[None])[0], size), gt)

    parts = all_gather((conf, cooc, index))
    if not d.is_main:
        return None
    conf, cooc, index = parts[0]
    for c2, co2, ix2 in parts[1:]:
        for n in conf:
            conf[n].merge(c2[n])
        cooc.merge(co2)
        index.extend(ix2)
    metrics: dict[str, float] = {"eval/images": float(cooc.images), "eval/categories": float(n_gt)}
    details: dict[str, Any] = {}

    def put(name: str, sc) -> None:
        metrics.update(sc.as_metrics(f"eval/{name}"))
        details[name] = {"miou": sc.miou, "pixel_accuracy": sc.pixel_accuracy, "iou": sc.iou, "mapping": sc.mapping}

    put("kmeans", score(conf["kmeans"], "hungarian"))
    put("overcluster", score(conf["overcluster"], "many_to_one"))
    mapping = communities(cooc, s.community_resolution, s.seed)
    put("community", score(merge_rows(conf["overcluster"].counts, mapping), "hungarian"))
    metrics["eval/community/clusters"] = float(mapping.max() + 1)
    if n_proto:
        put("prototypes", score(conf["prototypes"], "hungarian"))
        metrics["eval/prototypes/many_to_one_miou"] = score(conf["prototypes"], "many_to_one").miou
        metrics["eval/prototypes/active"] = float((conf["prototypes"].counts.sum(1) > 0).sum())
    if probe is not None:
        put("probe", identity_scores(conf["probe"]))
    concept_protos = rep.prototypes.numpy() if n_proto else centroids["kmeans"].numpy()
    return EvalOutput(metrics, details, index, concept_protos)
