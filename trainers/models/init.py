"""Initialising a segmenter from another one's weights (CaSP sec. 3.2: finetuning starts from the pretrained target).

Every weight is copied from the source except the class head (``*class_embed.*``, C + 1 logits: the classes and
no-object) when the class counts differ. Then ``head_init`` decides (sec. 3.2, "two ways to initialize the multi-class
classification layer"): ``random`` keeps the target's seeded random init; ``agnostic`` copies the source's
class-agnostic channel (a 1-class source) into every class channel and its no-object channel into no-object.
The architectures must otherwise agree: a missing or differently shaped weight is an error naming it.

``parts`` (CaSP Table 10, the initialisation ablation) names which of the model's parts come from the source:
``backbone`` (``encoder.backbone.*``), ``neck`` (the pixel decoder, ``encoder.pixel_decoder.*``) and ``head`` (the
transformer decoder: queries, attention layers, mask embedding; ``decoder.*`` but the class head). A part left out
keeps the target's seeded random init; the classifier is always ``head_init``'s.
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import nn

HEAD = "class_embed."
PARTS = {"backbone": "encoder.backbone.", "neck": "encoder.pixel_decoder.", "head": "decoder."}


def part_of(key: str) -> str | None:
    """The Table 10 part a weight belongs to (None: the classifier, or a weight of no named part)."""
    if HEAD in key:
        return None
    return next((name for name, prefix in PARTS.items() if key.startswith(prefix)), None)


def init_from(model: nn.Module, source: dict[str, torch.Tensor], head_init: Literal["random", "agnostic"] = "random",
              parts: tuple[str, ...] | list[str] = tuple(PARTS)) -> dict[str, int]:
    """Load ``source`` into ``model`` in place (see the module doc); returns counts ``copied``, ``head_from_agnostic``
    and ``kept_random`` (weights of the parts left out)."""
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise ValueError(f"unknown init part(s) {unknown}: the parts are {', '.join(PARTS)}")
    own = model.state_dict()
    problems = [k for k in own if HEAD not in k and (k not in source or source[k].shape != own[k].shape)]
    if problems:
        detail = ", ".join(f"{k} ({'missing' if k not in source else f'{tuple(source[k].shape)} vs {tuple(own[k].shape)}'})"
                           for k in problems[:5])
        raise ValueError(f"the init model's architecture differs from this one in {len(problems)} weight(s): {detail}")
    copied = head = kept = 0
    new = dict(own)
    for k, v in own.items():
        src = source[k] if k in source else None
        if src is None:
            continue
        part = part_of(k)
        if part is not None and part not in parts:
            kept += 1
            continue
        if src.shape == v.shape:
            new[k] = src.to(v.dtype)
            copied += 1
        elif HEAD in k and head_init == "agnostic":
            if src.shape[0] != 2:
                raise ValueError(f"head_init 'agnostic' needs a class-agnostic init model (1 class + no-object), "
                                 f"{k} has {src.shape[0] - 1} classes")
            rows = torch.cat([src[:1].expand(v.shape[0] - 1, *src.shape[1:]), src[1:]], 0)
            new[k] = rows.to(v.dtype).clone()
            head += 1
    model.load_state_dict(new)
    return {"copied": copied, "head_from_agnostic": head, "kept_random": kept}
