"""Contact sheets: a PNG grid of samples with their object (and, for eval data, part) masks overlaid.

Reads any iterable of ``(key, image, record)`` samples (trainers.structures records), e.g. from
``trainers.data.partworld.generate`` or a shard reader, so a dataset can be checked by eye.
"""
from __future__ import annotations

import colorsys
import itertools
import math
from pathlib import Path
from typing import Iterable

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy.ndimage import binary_erosion

from contract.io import atomic_open
from trainers.structures import decode_mask

PAD = 4  # pixels around and between tiles
GAP = 2  # pixels between the two panels of a tile
CAPTION = 12  # height of the key strip above each tile
ALPHA = 0.35  # opacity of mask fills
LABEL_MIN_AREA = 24  # parts smaller than this (pixels) get no text label, only their colour


def _colour(i: int) -> tuple[int, int, int]:
    """Well-spread colour number i (golden-ratio hues)."""
    r, g, b = colorsys.hsv_to_rgb((i * 0.618034) % 1.0, 0.85, 1.0)
    return int(r * 255), int(g * 255), int(b * 255)


def _as_rgb(image) -> np.ndarray:
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise ValueError(f"image must be HxW, HxWx3 or HxWx4, got shape {arr.shape}")
    return np.ascontiguousarray(arr[:, :, :3]).astype(np.uint8)


def _overlay(base: np.ndarray, masks: list[tuple[np.ndarray, tuple[int, int, int]]], scale: int) -> np.ndarray:
    """Fill each mask translucently and outline it in its colour, then upscale (nearest) by ``scale``."""
    out = base.astype(np.float64)
    edges = []
    for m, c in masks:
        out[m] = (1 - ALPHA) * out[m] + ALPHA * np.asarray(c, dtype=np.float64)
        edges.append((m & ~binary_erosion(m), c))
    for e, c in edges:
        out[e] = c
    out = np.clip(out, 0, 255).astype(np.uint8)
    return out.repeat(scale, axis=0).repeat(scale, axis=1)


def _label(draw: ImageDraw.ImageDraw, font, xy: tuple[float, float], text: str, colour) -> None:
    x0, y0, x1, y1 = draw.textbbox(xy, text, font=font)
    draw.rectangle((x0 - 1, y0 - 1, x1 + 1, y1 + 1), fill=(0, 0, 0))
    draw.text(xy, text, fill=colour, font=font)


def contact_sheet(samples: Iterable[tuple[str, object, dict]], out_png: str | Path, cols: int = 4, parts: bool = True,
                  categories: list[dict] | None = None, part_categories: list[dict] | None = None,
                  scale: int = 2, limit: int | None = 64) -> Path:
    """Write a grid of samples with instance overlays (and part overlays) to ``out_png``, atomically.

    Each tile is a caption strip with the key above one panel (image, a translucent colour and an
    outline per object, its class name) and, when ``parts`` is true and any record has ``parts``, a
    second panel with the parts coloured by part type. Panels are the largest image upscaled by
    ``scale``; the sheet is ``PAD + cols * (tile_w + PAD)`` wide (cols = min(cols, n)) and
    ``PAD + rows * (CAPTION + panel_h + PAD)`` high, with ``tile_w = panels * panel_w + (panels - 1) * GAP``.
    ``categories`` / ``part_categories`` (COCO category lists) name the ids; at most ``limit`` samples are read.
    """
    if cols < 1:
        raise ValueError(f"cols must be >= 1, got {cols}")
    if scale < 1:
        raise ValueError(f"scale must be >= 1, got {scale}")
    items = list(samples if limit is None else itertools.islice(samples, limit))
    if not items:
        raise ValueError("contact_sheet got no samples")
    names = {c["id"]: c["name"] for c in categories or []}
    part_names = {c["id"]: c["name"] for c in part_categories or []}
    images = [_as_rgb(img) for _, img, _ in items]
    h = max(i.shape[0] for i in images)
    w = max(i.shape[1] for i in images)
    show_parts = parts and any("parts" in rec for _, _, rec in items)
    panels = 2 if show_parts else 1
    pw, ph = w * scale, h * scale
    tile_w = panels * pw + (panels - 1) * GAP
    cols = min(cols, len(items))
    rows = math.ceil(len(items) / cols)
    sheet = Image.new("RGB", (PAD + cols * (tile_w + PAD), PAD + rows * (CAPTION + ph + PAD)), (32, 32, 32))
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()

    for n, ((key, _, rec), img) in enumerate(zip(items, images)):
        x = PAD + (n % cols) * (tile_w + PAD)
        y = PAD + (n // cols) * (CAPTION + ph + PAD)
        draw.text((x, y), str(key)[: max(tile_w // 6, 4)], fill=(220, 220, 220), font=font)
        y += CAPTION
        objects = rec.get("objects", [])
        obj_masks = [decode_mask(o["segmentation"]) for o in objects]
        panel = _overlay(img, [(m, _colour(i)) for i, m in enumerate(obj_masks)], scale)
        sheet.paste(Image.fromarray(panel), (x, y))
        for i, o in enumerate(objects):
            bx, by = o["bbox"][0] * scale, o["bbox"][1] * scale
            cid = o.get("category_id")
            _label(draw, font, (x + bx + 1, y + by + 1), names.get(cid, f"#{cid}"), _colour(i))
        if show_parts:
            px = x + pw + GAP
            grey = img.mean(axis=2, keepdims=True).repeat(3, axis=2) * 0.6  # dimmed so part colours read
            part_list = rec.get("parts", [])
            part_masks = [(decode_mask(p["segmentation"]), _colour(int(p["category_id"]))) for p in part_list]
            panel = _overlay(grey.astype(np.uint8), part_masks, scale)
            for m in obj_masks:  # object outlines in white over the parts
                e = (m & ~binary_erosion(m)).repeat(scale, axis=0).repeat(scale, axis=1)
                panel[e] = 255
            sheet.paste(Image.fromarray(panel), (px, y))
            for p in part_list:
                if p.get("area", 0) < LABEL_MIN_AREA:
                    continue
                bx, by, bw, bh = p["bbox"]
                cid = int(p["category_id"])
                text = part_names.get(cid, f"p{cid}").split(":")[0].replace("part-", "p")
                _label(draw, font, (px + (bx + bw / 2) * scale - 5, y + (by + bh / 2) * scale - 5), text, _colour(cid))

    out = Path(out_png)
    with atomic_open(out, "wb") as f:
        sheet.save(f, format="PNG")
    return out
