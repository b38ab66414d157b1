"""PartWorld: a procedural dataset of objects built from a shared vocabulary of part types.

Stands in for PartImageNet (PartDistillation sec. 5): object classes are templates of 3-6 parts,
part types (shape + texture + colour family) are shared across classes, and part masks exist
only in the ``val`` split (model selection: promotion, early stopping) and the ``eval`` split
(the reported figures); ``train`` has object labels only. With ``stuff_classes > 0`` the background becomes
horizontal bands of textured stuff (sky/ground-like regions, CaSP sec. 3.3 "entities"): their masks are the record's
``stuff`` list and their categories follow the object classes in ``category_table``, marked ``isthing: 0`` as COCO
panoptic marks them (objects ``isthing: 1``); off by default, and then every byte is as before. Every sample is a pure function of ``(config, split, index)`` and every
class template a pure function of ``(config, class_id)``, so any sample can be rendered by index,
streams are trivially parallel, and 10k classes or 10M images need no storage up front.
"""
from __future__ import annotations

import functools
import itertools
import math
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, model_serializer, model_validator

from trainers.structures import annotation_from_mask

SPLITS = ("train", "eval", "val")  # order fixes each split's seed stream: appending keeps train and eval unchanged
PART_SPLITS = ("eval", "val")  # splits whose records carry part masks
SHAPES = ("ellipse", "box", "diamond", "triangle")
TEXTURES = ("solid", "stripes", "dots", "checker", "gradient")
HUE_FAMILIES = 8  # colour families: hue ranges 45 degrees apart
STUFF_NAMES = ("sky", "ground", "water", "grass", "wall", "sand", "snow", "road")  # stuff category names, in id order
STUFF_TEXTURES = ("gradient", "dots", "stripes", "checker", "solid")
STUFF_FIELDS = ("stuff_classes", "max_stuff_regions")  # left out of a dump when stuff is off (the demo's bytes)

# First word of every SeedSequence entropy, so samples, classes and part types never share a stream.
_SAMPLE, _CLASS, _PART_TYPE, _VOCAB, _STUFF, _STUFF_TYPE = 0, 1, 2, 3, 4, 5


class PartWorldConfig(BaseModel):
    """Everything that determines a PartWorld dataset; defaults are the demo values (configs/partworld-demo.yaml)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    seed: int = Field(0, ge=0, description="Root seed: part vocabulary, class templates and every sample derive from it.")
    image_size: int = Field(112, ge=32, le=4096, description="Side of the square images, in pixels.")
    num_classes: int = Field(12, ge=1, description="Number of object classes (category ids 1..num_classes).")
    num_part_types: int = Field(18, ge=1, le=160, description="Size of the shared part vocabulary (part category ids 1..num_part_types).")
    min_parts: int = Field(3, ge=1, description="Fewest parts in a class template.")
    max_parts: int = Field(6, ge=1, description="Most parts in a class template.")
    min_instances: int = Field(1, ge=1, description="Fewest object instances drawn per image.")
    max_instances: int = Field(4, ge=1, description="Most object instances drawn per image.")
    train_images: int = Field(1500, ge=0, description="Size of the train split (what generate() yields by default).")
    eval_images: int = Field(300, ge=0, description="Size of the eval split (part masks; the reported figures only).")
    val_images: int = Field(100, ge=0, description="Size of the val split (part masks; model selection only: promotion, early stopping).")
    min_object_scale: float = Field(0.35, gt=0, le=1.5, description="Smallest object extent, as a fraction of the image side.")
    max_object_scale: float = Field(0.65, gt=0, le=1.5, description="Largest object extent, as a fraction of the image side.")
    max_rotation_deg: float = Field(30.0, ge=0, le=180, description="Instances are rotated uniformly in [-max, max] degrees.")
    flip_prob: float = Field(0.5, ge=0, le=1, description="Probability that an instance is mirrored horizontally.")
    max_occlusion: float = Field(0.3, ge=0, le=1, description="Most of an instance's in-frame area that later instances may cover (placements beyond it are retried).")
    placement_tries: int = Field(8, ge=1, description="Positions tried per instance before it is left out of the image.")
    min_visible_fraction: float = Field(0.3, ge=0, le=1, description="Objects whose visible area is below this fraction of their in-frame area are dropped, with their parts.")
    min_object_area: int = Field(64, ge=1, description="Objects with fewer visible pixels are dropped, with their parts.")
    min_part_area: int = Field(4, ge=1, description="Visible parts with fewer pixels are left out of the eval and val records.")
    clutter: float = Field(0.5, ge=0, le=1, description="Strength of the textured-noise background (0 = flat colour).")
    min_distractors: int = Field(0, ge=0, description="Fewest distractor shapes (belonging to no object) per image.")
    max_distractors: int = Field(3, ge=0, description="Most distractor shapes per image.")
    distractor_scale: float = Field(0.15, gt=0, le=1, description="Largest distractor extent, as a fraction of the image side.")
    hue_jitter_deg: float = Field(8.0, ge=0, le=22.5, description="Per-instance hue jitter of a part, in degrees (colour families are 45 degrees apart).")
    tone_jitter: float = Field(0.12, ge=0, le=0.5, description="Per-instance jitter of a part's saturation and value.")
    size_jitter: float = Field(0.12, ge=0, le=0.5, description="Per-instance relative jitter of part sizes and positions.")
    texture_jitter: float = Field(0.2, ge=0, le=0.5, description="Per-instance relative jitter of texture period and angle.")
    pixel_noise: float = Field(0.03, ge=0, le=0.5, description="Std of the Gaussian pixel noise, as a fraction of the full intensity range.")
    stuff_classes: int = Field(0, ge=0, le=len(STUFF_NAMES), description="Stuff categories of the background (0 = off: the clutter background, no stuff). Ids num_classes+1.., names sky, ground, water, ...; their regions are the records' 'stuff' masks (CaSP entities).")
    max_stuff_regions: int = Field(3, ge=1, le=len(STUFF_NAMES), description="Most stuff regions (horizontal bands with wavy borders, each a different stuff category) per image; at least min(2, stuff_classes).")

    @model_validator(mode="after")
    def _ranges(self) -> "PartWorldConfig":
        for lo, hi in (("min_parts", "max_parts"), ("min_instances", "max_instances"),
                       ("min_object_scale", "max_object_scale"), ("min_distractors", "max_distractors")):
            if getattr(self, lo) > getattr(self, hi):
                raise ValueError(f"{lo} ({getattr(self, lo)}) must be <= {hi} ({getattr(self, hi)})")
        if self.max_parts > self.num_part_types:
            raise ValueError(f"max_parts ({self.max_parts}) must be <= num_part_types ({self.num_part_types}): a template uses distinct part types")
        return self

    @model_serializer(mode="wrap")
    def _without_stuff_when_off(self, handler):
        """Without stuff the dump (partworld.yaml beside a generated dataset) is what it was before stuff existed."""
        out = handler(self)
        if self.stuff_classes == 0 and isinstance(out, dict):
            for f in STUFF_FIELDS:
                out.pop(f, None)
        return out

    @classmethod
    def demo(cls) -> "PartWorldConfig":
        """The demo dataset: 112 px, 12 classes, 18 part types, 1500 train / 300 eval / 100 val images."""
        return cls()

    @classmethod
    def from_yaml(cls, path: str | Path) -> "PartWorldConfig":
        import yaml

        return cls.model_validate(yaml.safe_load(Path(path).read_text()) or {})

    def split_size(self, split: str) -> int:
        return {"train": self.train_images, "eval": self.eval_images, "val": self.val_images}[_check_split(split)]


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return split


def _rng(*entropy: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(list(entropy)))


# ---------------------------------------------------------------------------------------------
# Vocabulary: part types and class templates
# ---------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=64)
def _vocab_order(seed: int) -> tuple[int, int]:
    """Seed-level hue rotation (degrees) and texture rotation, so seeds differ in their vocabulary."""
    rng = _rng(seed, _VOCAB)
    return int(rng.integers(0, 45)), int(rng.integers(0, len(TEXTURES)))


@functools.lru_cache(maxsize=1024)
def _part_type(seed: int, part_type: int) -> dict:
    t = part_type - 1
    hue_rot, tex_rot = _vocab_order(seed)
    # (texture, hue family) is unique for the first 5 x 8 = 40 types and consecutive types differ in
    # both, so a small vocabulary is spread over all textures and colours; later blocks sit between hues.
    r, a = t % len(TEXTURES), t // len(TEXTURES)
    block = t // (len(TEXTURES) * HUE_FAMILIES)
    hue = (((a + 3 * r) % HUE_FAMILIES) * 45.0 + hue_rot + 45.0 * (1 - 0.5 ** block)) % 360.0
    rng = _rng(seed, _PART_TYPE, part_type)
    texture = TEXTURES[(r + tex_rot) % len(TEXTURES)]
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    dark = bool(rng.random() < 0.6)  # secondary tone: a dark shade of the hue, else a pale tint
    return {
        "id": part_type,
        "name": f"part-{part_type:02d}:{shape}-{texture}",
        "shape": shape,
        "texture": texture,
        "hue": hue,
        "saturation": float(rng.uniform(0.6, 0.9)),
        "value": float(rng.uniform(0.75, 0.95)),
        "secondary": "dark" if dark else "pale",
        "period": float(rng.uniform(4.5, 7.0)),  # texture period in pixels
        "angle": float(rng.uniform(0.0, 180.0)),  # texture orientation in degrees
    }


def part_type(cfg: PartWorldConfig, part_type_id: int) -> dict:
    """Appearance of one part type (shape, texture, colour family, texture period/angle); ids 1..num_part_types."""
    if not 1 <= part_type_id <= cfg.num_part_types:
        raise ValueError(f"part_type_id must be in 1..num_part_types={cfg.num_part_types}, got {part_type_id}")
    return dict(_part_type(cfg.seed, part_type_id))


@functools.lru_cache(maxsize=4096)
def _template(seed: int, num_part_types: int, min_parts: int, max_parts: int, class_id: int) -> dict:
    rng = _rng(seed, _CLASS, class_id)
    n = int(rng.integers(min_parts, max_parts + 1))
    types = [int(t) + 1 for t in rng.choice(num_part_types, size=n, replace=False)]
    # Part 0 is the body at the origin; the others are attached around its rim, evenly spread with
    # jitter, their long axis pointing outwards. Drawn in order, so appendages overlap the body.
    body = (float(rng.uniform(0.5, 0.7)), float(rng.uniform(0.32, 0.5)))
    parts = [{"part_type": types[0], "center": [0.0, 0.0], "size": list(body), "angle": float(rng.uniform(-15, 15))}]
    phase = rng.uniform(0, 2 * math.pi)
    for k in range(1, n):
        phi = phase + 2 * math.pi * (k - 1) / (n - 1) + rng.uniform(-0.25, 0.25)
        half = (float(rng.uniform(0.2, 0.34)), float(rng.uniform(0.14, 0.26)))
        rim = np.array([body[0] * math.cos(phi), body[1] * math.sin(phi)])
        center = rim * rng.uniform(0.95, 1.1) + np.array([math.cos(phi), math.sin(phi)]) * half[0] * 0.45
        parts.append({"part_type": types[k], "center": [float(center[0]), float(center[1])],
                      "size": list(half), "angle": float(math.degrees(phi) % 360.0)})
    # Normalise: the template's bounding box (of the parts' rotated boxes) is centred and spans [-1, 1].
    corners = []
    for p in parts:
        c, s, ang = np.array(p["center"]), np.array(p["size"]), math.radians(p["angle"])
        rot = np.array([[math.cos(ang), -math.sin(ang)], [math.sin(ang), math.cos(ang)]])
        corners.append(c + (rot @ (np.array([[-1, -1], [-1, 1], [1, -1], [1, 1]]) * s).T).T)
    corners = np.concatenate(corners)
    lo, hi = corners.min(0), corners.max(0)
    mid, span = (lo + hi) / 2, float((hi - lo).max() / 2)
    for p in parts:
        p["center"] = [float((p["center"][0] - mid[0]) / span), float((p["center"][1] - mid[1]) / span)]
        p["size"] = [float(p["size"][0] / span), float(p["size"][1] / span)]
    return {"class_id": class_id, "name": f"class-{class_id:02d}", "parts": parts}


def class_template(cfg: PartWorldConfig, class_id: int) -> dict:
    """Object class ``class_id`` (= its category id, 1..num_classes): part types and their layout.

    Returns ``{"class_id", "name", "parts": [{"part_type", "center": [x, y], "size": [half_w, half_h],
    "angle": deg}]}`` in object coordinates spanning [-1, 1]; parts are listed in drawing order.
    """
    if not 1 <= class_id <= cfg.num_classes:
        raise ValueError(f"class_id must be in 1..num_classes={cfg.num_classes}, got {class_id}")
    t = _template(cfg.seed, cfg.num_part_types, cfg.min_parts, cfg.max_parts, class_id)
    return {**t, "parts": [dict(p) for p in t["parts"]]}


def category_table(cfg: PartWorldConfig) -> list[dict]:
    """COCO categories of the object classes, ids 1..num_classes; with stuff, each marked ``isthing: 1`` and followed
    by the stuff categories (ids num_classes+1.., ``isthing: 0``), as COCO panoptic's category list."""
    things = [{"id": c, "name": f"class-{c:02d}", "supercategory": "object"} for c in range(1, cfg.num_classes + 1)]
    if cfg.stuff_classes == 0:
        return things
    return [{**c, "isthing": 1} for c in things] + [
        {"id": cfg.num_classes + s, "name": STUFF_NAMES[s - 1], "supercategory": "stuff", "isthing": 0}
        for s in range(1, cfg.stuff_classes + 1)]


def part_category_table(cfg: PartWorldConfig) -> list[dict]:
    """COCO categories of the part types, ids 1..num_part_types, named ``part-07:<shape>-<texture>``."""
    return [{"id": t, "name": _part_type(cfg.seed, t)["name"], "supercategory": "part"}
            for t in range(1, cfg.num_part_types + 1)]


# ---------------------------------------------------------------------------------------------
# Painting
# ---------------------------------------------------------------------------------------------

def _hsv(h: float, s: float, v: float) -> np.ndarray:
    """One HSV colour (h in degrees, s/v in [0, 1]) -> RGB float in [0, 1]."""
    h = (h % 360.0) / 60.0
    c = v * s
    x = c * (1 - abs(h % 2 - 1))
    rgb = [(c, x, 0), (x, c, 0), (0, c, x), (0, x, c), (x, 0, c), (c, 0, x)][int(h) % 6]
    return np.array(rgb) + (v - c)


def _shape_mask(shape: str, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Inside test in a part's unit frame (x, y scaled by its half sizes); areas kept comparable."""
    if shape == "ellipse":
        return x * x + y * y <= 1.0
    if shape == "box":
        return (np.abs(x) <= 0.9) & (np.abs(y) <= 0.9)
    if shape == "diamond":
        return np.abs(x) + np.abs(y) <= 1.25
    if shape == "triangle":  # pointing along +x
        return (x >= -1.0) & (np.abs(y) <= (1.25 - x) / 1.8)
    raise ValueError(f"unknown shape {shape!r}")


def _texture(kind: str, xp: np.ndarray, yp: np.ndarray, extent: float, period: float, angle: float,
             phase: tuple[float, float], primary: np.ndarray, secondary: np.ndarray) -> np.ndarray:
    """RGB (N x 3) of a texture at pixel-unit coordinates (xp, yp) in the part's frame."""
    ca, sa = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    u = xp * ca + yp * sa
    v = -xp * sa + yp * ca
    if kind == "solid":  # flat colour with a soft shading across the part
        return primary * (1.0 - 0.12 * np.clip(u / max(extent, 1.0), -1, 1))[:, None]
    if kind == "stripes":
        w = (np.sin(2 * math.pi * (u / period + phase[0])) > 0).astype(np.float64)
    elif kind == "dots":
        p = period * 1.25
        du = (u / p + phase[0]) % 1.0 - 0.5
        dv = (v / p + phase[1]) % 1.0 - 0.5
        w = (du * du + dv * dv < 0.09).astype(np.float64)
    elif kind == "checker":
        p = period * 0.75
        w = ((np.floor(u / p + phase[0]) + np.floor(v / p + phase[1])) % 2).astype(np.float64)
    elif kind == "gradient":
        w = np.clip(0.5 + 0.5 * u / max(extent, 1.0), 0, 1)
    else:
        raise ValueError(f"unknown texture {kind!r}")
    return primary * (1 - w)[:, None] + secondary * w[:, None]


def _background(rng: np.random.Generator, cfg: PartWorldConfig) -> np.ndarray:
    """Textured-noise clutter: a muted base colour plus coarse and fine colour noise (HxWx3 float)."""
    size = cfg.image_size
    base = _hsv(rng.uniform(0, 360), rng.uniform(0.05, 0.3), rng.uniform(0.3, 0.6))
    img = np.broadcast_to(base, (size, size, 3)).astype(np.float64)
    if cfg.clutter > 0:
        for cells, amp in ((4, 0.35), (max(size // 6, 4), 0.2)):
            grid = rng.uniform(0, 255, size=(cells, cells, 3)).astype(np.uint8)
            noise = np.asarray(Image.fromarray(grid).resize((size, size), Image.BILINEAR), dtype=np.float64) / 255.0
            img = img + cfg.clutter * amp * (noise - 0.5)
    return img


def _distractors(rng: np.random.Generator, cfg: PartWorldConfig, img: np.ndarray) -> np.ndarray:
    """Shapes with part-like textures in random colours that belong to no object, painted on the background; returns
    their pixels (void in the stuff masks, as COCO panoptic leaves unlabeled pixels)."""
    size = cfg.image_size
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    painted = np.zeros((size, size), dtype=bool)
    for _ in range(int(rng.integers(cfg.min_distractors, cfg.max_distractors + 1))):
        half = rng.uniform(0.4, 1.0) * cfg.distractor_scale * size / 2
        hx, hy = half, half * rng.uniform(0.5, 1.0)
        cx, cy = rng.uniform(0, size, size=2)
        ang = rng.uniform(0, 2 * math.pi)
        dx, dy = xx - cx, yy - cy
        u = (dx * math.cos(ang) + dy * math.sin(ang))
        v = (-dx * math.sin(ang) + dy * math.cos(ang))
        inside = _shape_mask(SHAPES[int(rng.integers(len(SHAPES)))], u / hx, v / hy)
        if not inside.any():
            continue
        prim = _hsv(rng.uniform(0, 360), rng.uniform(0.2, 0.9), rng.uniform(0.4, 0.95))
        sec = prim * rng.uniform(0.3, 0.6)
        img[inside] = _texture(TEXTURES[int(rng.integers(len(TEXTURES)))], u[inside], v[inside], hx,
                               rng.uniform(4, 8), rng.uniform(0, 180), tuple(rng.uniform(0, 1, 2)), prim, sec)
        painted |= inside
    return painted


@functools.lru_cache(maxsize=256)
def _stuff_type(seed: int, stuff: int) -> dict:
    """Appearance of stuff category ``stuff`` (1-based): a colour family and a coarse texture, both its own."""
    rng = _rng(seed, _STUFF_TYPE, stuff)
    hue_rot, _ = _vocab_order(seed)
    return {"texture": STUFF_TEXTURES[(stuff - 1) % len(STUFF_TEXTURES)],
            "hue": ((stuff - 1) * 135.0 + hue_rot + 22.5) % 360.0,  # 135 deg apart: 8 distinct hues
            "saturation": float(rng.uniform(0.25, 0.55)), "value": float(rng.uniform(0.45, 0.8)),
            "period": float(rng.uniform(9.0, 14.0)), "angle": float(rng.uniform(0.0, 180.0))}


def _stuff(cfg: PartWorldConfig, split_id: int, index: int, img: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """Paint the stuff regions over the background: horizontal bands with wavy borders, each a different stuff
    category; returns (stuff category 1.., band mask) per band. Its own seed stream, so the objects, distractors and
    noise of a sample are those of the same config without stuff."""
    rng = _rng(cfg.seed, _STUFF, split_id, index)
    size = cfg.image_size
    hi = min(cfg.max_stuff_regions, cfg.stuff_classes)
    n = int(rng.integers(min(2, hi), hi + 1))
    cats = [int(c) + 1 for c in rng.choice(cfg.stuff_classes, size=n, replace=False)]
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    band = np.zeros((size, size), dtype=np.int16)
    for b in sorted(rng.uniform(0.2, 0.8, size=n - 1) * size):  # border k: below it, band k+1
        amp, freq, phase = rng.uniform(0.02, 0.08) * size, rng.uniform(0.5, 2.0), rng.uniform(0, 2 * math.pi)
        band[yy > b + amp * np.sin(2 * math.pi * freq * xx / size + phase)] += 1
    out = []
    for k, cat in enumerate(cats):
        m = band == k
        if not m.any():
            continue
        st = _stuff_type(cfg.seed, cat)
        hue = st["hue"] + rng.uniform(-cfg.hue_jitter_deg, cfg.hue_jitter_deg)
        primary = _hsv(hue, st["saturation"], st["value"])
        secondary = _hsv(hue, st["saturation"], st["value"] * rng.uniform(0.55, 0.75))
        tex = _texture(st["texture"], xx[m] - size / 2, yy[m] - size / 2, size / 2, st["period"], st["angle"] + rng.uniform(-20, 20),
                       tuple(rng.uniform(0, 1, 2)), primary, secondary)
        img[m] = 0.75 * tex + 0.25 * img[m]  # a quarter of the clutter shows through
        out.append((cat, m))
    return out


# ---------------------------------------------------------------------------------------------
# Instances: geometry first (masks, occlusion, drops), then paint what survives
# ---------------------------------------------------------------------------------------------

def _instance(rng: np.random.Generator, cfg: PartWorldConfig) -> dict:
    """Sample one instance's class, pose and per-part jitter (everything but its position)."""
    class_id = int(rng.integers(1, cfg.num_classes + 1))
    tmpl = _template(cfg.seed, cfg.num_part_types, cfg.min_parts, cfg.max_parts, class_id)
    sj, tj = cfg.size_jitter, cfg.texture_jitter
    parts = []
    for p in tmpl["parts"]:
        pt = _part_type(cfg.seed, p["part_type"])
        hue = pt["hue"] + rng.uniform(-cfg.hue_jitter_deg, cfg.hue_jitter_deg)
        sat = float(np.clip(pt["saturation"] + rng.uniform(-cfg.tone_jitter, cfg.tone_jitter), 0.35, 1.0))
        val = float(np.clip(pt["value"] + rng.uniform(-cfg.tone_jitter, cfg.tone_jitter), 0.45, 1.0))
        primary = _hsv(hue, sat, val)
        secondary = (_hsv(hue, sat, val * rng.uniform(0.3, 0.45)) if pt["secondary"] == "dark"
                     else _hsv(hue, sat * rng.uniform(0.15, 0.35), min(1.0, val + 0.15)))
        parts.append({
            "part_type": p["part_type"], "shape": pt["shape"], "texture": pt["texture"],
            "center": np.array(p["center"]) * (1 + rng.uniform(-sj, sj, size=2) * 0.5),
            "size": np.array(p["size"]) * (1 + rng.uniform(-sj, sj, size=2)),
            "angle": math.radians(p["angle"] + rng.uniform(-10, 10) * sj / 0.12),
            "period": pt["period"] * (1 + rng.uniform(-tj, tj)),
            "tex_angle": pt["angle"] + rng.uniform(-45, 45) * tj,
            "phase": tuple(rng.uniform(0, 1, size=2)),
            "primary": primary, "secondary": secondary,
        })
    scale = rng.uniform(cfg.min_object_scale, cfg.max_object_scale) * cfg.image_size / 2  # px per object unit
    return {"class_id": class_id, "parts": parts, "scale": float(scale),
            "theta": math.radians(rng.uniform(-cfg.max_rotation_deg, cfg.max_rotation_deg)),
            "flip": bool(rng.random() < cfg.flip_prob)}


def _place(inst: dict, cx: float, cy: float, size: int) -> dict | None:
    """Rasterise an instance centred at (cx, cy): its box in the image and a local part-index map (-1 = outside)."""
    r = inst["scale"] * 1.42  # the template spans [-1, 1]^2; any rotation stays within radius sqrt(2)
    x0, x1 = max(int(cx - r), 0), min(int(math.ceil(cx + r)), size)
    y0, y1 = max(int(cy - r), 0), min(int(math.ceil(cy + r)), size)
    if x0 >= x1 or y0 >= y1:
        return None
    yy, xx = np.mgrid[y0:y1, x0:x1] + 0.5
    dx, dy = xx - cx, yy - cy
    ct, st = math.cos(inst["theta"]), math.sin(inst["theta"])
    u = (dx * ct + dy * st) / inst["scale"]
    v = (-dx * st + dy * ct) / inst["scale"]
    if inst["flip"]:
        u = -u
    label = np.full(u.shape, -1, dtype=np.int8)
    local = []
    for k, p in enumerate(inst["parts"]):
        ca, sa = math.cos(p["angle"]), math.sin(p["angle"])
        pu, pv = u - p["center"][0], v - p["center"][1]
        lu, lv = pu * ca + pv * sa, -pu * sa + pv * ca
        label[_shape_mask(p["shape"], lu / p["size"][0], lv / p["size"][1])] = k
        local.append((lu * inst["scale"], lv * inst["scale"]))  # part frame in pixels, for textures
    if not (label >= 0).any():
        return None
    return {"box": (y0, y1, x0, x1), "label": label, "local": local, "area": int((label >= 0).sum())}


def _compose(placed: list[dict], size: int) -> np.ndarray:
    """Instance-index map (-1 = none) with later instances on top."""
    owner = np.full((size, size), -1, dtype=np.int16)
    for i, g in enumerate(placed):
        y0, y1, x0, x1 = g["box"]
        owner[y0:y1, x0:x1][g["label"] >= 0] = i
    return owner


def render_sample(cfg: PartWorldConfig, split: str, index: int) -> tuple[str, np.ndarray, dict]:
    """Sample ``index`` of ``split``: (key, HxWx3 uint8 image, record as in trainers.structures).

    A pure function of (cfg, split, index) via SeedSequence([seed, split, index]), so the splits never
    share an image. Parts are in the record only for the PART_SPLITS (eval, val); masks are the
    visible pixels after occlusion.
    """
    split_id = SPLITS.index(_check_split(split))
    if index < 0:
        raise ValueError(f"index must be >= 0, got {index}")
    rng = _rng(cfg.seed, _SAMPLE, split_id, index)
    size = cfg.image_size

    img = _background(rng, cfg)
    stuff = _stuff(cfg, split_id, index, img) if cfg.stuff_classes else []
    distracted = _distractors(rng, cfg, img)

    # Geometry: place instances one by one; a position is rejected when it would leave an earlier
    # instance with less than (1 - max_occlusion) of its in-frame area visible.
    insts, placed = [], []
    for _ in range(int(rng.integers(cfg.min_instances, cfg.max_instances + 1))):
        inst = _instance(rng, cfg)
        margin = min(inst["scale"] * 0.7, size / 2)
        for _try in range(cfg.placement_tries):
            cx, cy = rng.uniform(margin, size - margin, size=2)
            g = _place(inst, float(cx), float(cy), size)
            if g is None:
                continue
            owner = _compose(placed + [g], size)
            visible = np.bincount(owner[owner >= 0].ravel(), minlength=len(placed) + 1)
            if all(visible[j] >= (1 - cfg.max_occlusion) * placed[j]["area"] for j in range(len(placed))):
                insts.append(inst)
                placed.append(g)
                break

    # Drop what is too occluded or too small (dropping only uncovers the rest), then paint survivors.
    owner = _compose(placed, size)
    visible = np.bincount(owner[owner >= 0].ravel(), minlength=len(placed))
    keep = [i for i, g in enumerate(placed)
            if visible[i] >= max(cfg.min_object_area, cfg.min_visible_fraction * g["area"])]
    insts, placed = [insts[i] for i in keep], [placed[i] for i in keep]
    owner = _compose(placed, size)
    part_of = np.full((size, size), -1, dtype=np.int8)
    for inst, g in zip(insts, placed):
        y0, y1, x0, x1 = g["box"]
        win = img[y0:y1, x0:x1]
        pwin = part_of[y0:y1, x0:x1]
        for k, p in enumerate(inst["parts"]):
            m = g["label"] == k
            if not m.any():
                continue
            lu, lv = g["local"][k]
            extent = float(p["size"][0] * inst["scale"])
            win[m] = _texture(p["texture"], lu[m], lv[m], extent, p["period"], p["tex_angle"], p["phase"],
                              p["primary"], p["secondary"])
            pwin[m] = k

    if cfg.pixel_noise > 0:
        img = img + rng.normal(0.0, cfg.pixel_noise, size=img.shape)
    image = (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)

    key = f"{split}-{index:08d}"
    record: dict = {"image_id": index, "file_name": f"{split}/{index:08d}.png", "height": size, "width": size,
                    "objects": []}
    parts: list[dict] = []
    for i, inst in enumerate(insts):
        obj_mask = owner == i
        obj_id = i + 1
        record["objects"].append({**annotation_from_mask(obj_mask, id=obj_id, category_id=inst["class_id"]),
                                  "iscrowd": 0})
        if split in PART_SPLITS:
            for k, p in enumerate(inst["parts"]):
                pm = obj_mask & (part_of == k)
                if int(pm.sum()) >= cfg.min_part_area:
                    parts.append(annotation_from_mask(pm, id=len(parts) + 1, object_id=obj_id,
                                                      category_id=p["part_type"]))
    if split in PART_SPLITS:
        record["parts"] = parts
    if cfg.stuff_classes:  # the band's pixels no object or distractor covers; too small a remainder is left out
        record["stuff"] = []
        for cat, band in stuff:
            m = band & (owner < 0) & ~distracted
            if int(m.sum()) >= cfg.min_object_area:
                record["stuff"].append({**annotation_from_mask(m, id=len(record["stuff"]) + 1,
                                                               category_id=cfg.num_classes + cat), "iscrowd": 0})
    return key, image, record


def generate(cfg: PartWorldConfig, split: str, start: int = 0, count: int | None = None
             ) -> Iterator[tuple[str, np.ndarray, dict]]:
    """Samples ``start .. start+count-1`` of ``split``; count=None runs to the split's configured size."""
    stop = cfg.split_size(split) if count is None else start + count
    for index in range(start, stop):
        yield render_sample(cfg, split, index)


def stream(cfg: PartWorldConfig, split: str = "train", start: int = 0) -> Iterator[tuple[str, np.ndarray, dict]]:
    """Endless samples from ``start`` on (ignores the split size); stores nothing."""
    _check_split(split)
    for index in itertools.count(start):
        yield render_sample(cfg, split, index)
