"""Visual concept discovery (SlotCon supplement A.4): for each prototype, the segments of the evaluation split it
groups, ranked by cosine similarity to it, shown as an HTML page of image crops.

Each image's pixels are assigned to prototypes (the 1x1 classifier of eq. 1); the pixels of one image sharing one
prototype form a *segment*, whose feature is the average of their embeddings. All segments go into one faiss inner-
product index (L2-normalised vectors: cosine); each prototype queries it restricted to the segments assigned to it
(a faiss ID selector) and keeps the top k.
"""
from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass, field

import faiss
import numpy as np

from contract.io import write_atomic


@dataclass
class Segment:
    key: str  # the image's dataset key
    prototype: int
    mask: np.ndarray  # bool [h, w] at feature resolution


@dataclass
class SegmentIndex:
    """Every segment's L2-normalised mean embedding in a faiss IndexFlatIP, with its image and prototype."""

    dim: int
    segments: list[Segment] = field(default_factory=list)
    vectors: list[np.ndarray] = field(default_factory=list)

    def add_image(self, key: str, assignment: np.ndarray, embedding: np.ndarray) -> None:
        """One image: ``assignment`` [h, w] prototype ids, ``embedding`` [D, h, w] pixel embeddings."""
        flat = embedding.reshape(embedding.shape[0], -1)
        for k in np.unique(assignment):
            mask = assignment == k
            v = flat[:, mask.ravel()].mean(1)
            self.vectors.append((v / max(float(np.linalg.norm(v)), 1e-12)).astype(np.float32))
            self.segments.append(Segment(key, int(k), mask))

    def extend(self, other: "SegmentIndex") -> None:
        self.segments += other.segments
        self.vectors += other.vectors

    def top_segments(self, prototypes: np.ndarray, k: int) -> dict[int, list[tuple[float, Segment]]]:
        """Per prototype with at least one segment: its top-``k`` segments by cosine similarity, highest first."""
        if not self.segments:
            return {}
        index = faiss.IndexFlatIP(self.dim)
        index.add(np.stack(self.vectors))
        protos = prototypes / np.maximum(np.linalg.norm(prototypes, axis=1, keepdims=True), 1e-12)
        owner = np.array([s.prototype for s in self.segments])
        out: dict[int, list[tuple[float, Segment]]] = {}
        for p in np.unique(owner):
            ids = np.nonzero(owner == p)[0].astype(np.int64)
            params = faiss.SearchParameters(sel=faiss.IDSelectorBatch(ids))
            sims, found = index.search(protos[p:p + 1].astype(np.float32), min(k, len(ids)), params=params)
            out[int(p)] = [(float(s), self.segments[i]) for s, i in zip(sims[0], found[0]) if i >= 0]
        return out


def crop_png(image: np.ndarray, mask: np.ndarray, pad: int = 4) -> bytes:
    """The segment's bounding box of ``image`` (HxWx3 uint8), its pixels tinted red (the supplement's red masks)."""
    from PIL import Image

    h, w = image.shape[:2]
    big = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((w, h), Image.NEAREST)) > 0
    ys, xs = np.nonzero(big)
    y0, y1 = max(0, ys.min() - pad), min(h, ys.max() + 1 + pad)
    x0, x1 = max(0, xs.min() - pad), min(w, xs.max() + 1 + pad)
    out = image[..., :3].astype(np.float32).copy()
    out[big] = 0.55 * out[big] + 0.45 * np.array([255, 0, 0], dtype=np.float32)
    buf = io.BytesIO()
    Image.fromarray(out[y0:y1, x0:x1].astype(np.uint8)).resize((96, int(96 * (y1 - y0) / max(1, x1 - x0)) or 1)).save(buf, "PNG")
    return buf.getvalue()


def write_concepts_html(path, concepts: dict[int, list[tuple[float, Segment]]], images: dict[str, np.ndarray],
                        title: str) -> None:
    """One row per prototype: its top segments as image crops with their similarity (written atomically)."""
    rows = []
    for p, segs in sorted(concepts.items(), key=lambda kv: -len(kv[1])):
        cells = []
        for sim, s in segs:
            data = base64.b64encode(crop_png(images[s.key], s.mask)).decode()
            cells.append(f'<figure><img src="data:image/png;base64,{data}"><figcaption>{html.escape(s.key)}'
                         f"<br>{sim:.3f}</figcaption></figure>")
        rows.append(f"<h3>prototype {p} ({len(segs)} shown)</h3><div class=row>{''.join(cells)}</div>")
    doc = (f"<!doctype html><html><head><meta charset=utf-8><title>{html.escape(title)}</title><style>"
           "body{font-family:sans-serif} .row{display:flex;flex-wrap:wrap;gap:6px} figure{margin:0;font-size:10px}"
           f"</style></head><body><h1>{html.escape(title)}</h1>{''.join(rows)}</body></html>")
    write_atomic(path, doc)
