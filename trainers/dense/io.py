"""The representation model file every dense representation stage writes (SlotCon, Leopart, PASS).

``<workdir>/model.pt`` is ``torch.save`` of::

    {"format": "selftrain-representation/1",
     "timm_name": "<timm model name>",
     "state_dict": {...},   # backbone weights in timm's own keys (timm.create_model(timm_name).state_dict()), no classifier
     "stage": "<the stage that wrote it>",
     "extra": {"model_kwargs": {...}, "prototypes": tensor, ...}}

so that any timm-based encoder loads the backbone from it (``trainers.models.encoder.load_state_dict_source``
unwraps ``state_dict``) and the evaluation rebuilds the exact feature extractor (``extra.model_kwargs``: e.g. a CNN's
``output_stride``, a ViT's ``img_size``; they change no weight name).
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch

from contract.io import write_atomic

FORMAT = "selftrain-representation/1"


class RepresentationFileError(ValueError):
    """A file that is not a readable representation file; the message names the file and the field."""


def save_representation(path: str | Path, timm_name: str, state_dict: dict[str, torch.Tensor], stage: str,
                        extra: dict[str, Any] | None = None) -> Path:
    """Write the representation file atomically (temp file, then rename); tensors are moved to the CPU."""
    def cpu(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return v.detach().cpu().clone()
        if isinstance(v, dict):
            return {k: cpu(x) for k, x in v.items()}
        return v

    buf = io.BytesIO()
    torch.save({"format": FORMAT, "timm_name": timm_name, "state_dict": cpu(dict(state_dict)), "stage": stage,
                "extra": cpu(dict(extra or {}))}, buf)
    return write_atomic(path, buf.getvalue())


def read_representation(path: str | Path) -> dict[str, Any]:
    """The file's dict, checked: format, timm_name, a state_dict of tensors, stage, extra."""
    path = Path(path)
    if not path.is_file():
        raise RepresentationFileError(f"{path}: no such representation file")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated or foreign
        raise RepresentationFileError(f"{path}: not a readable representation file ({e})") from e
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        found = blob.get("format") if isinstance(blob, dict) else type(blob).__name__
        raise RepresentationFileError(f"{path}: format {found!r}, expected {FORMAT!r}")
    if not isinstance(blob.get("timm_name"), str) or not blob["timm_name"]:
        raise RepresentationFileError(f"{path}: field timm_name must be a timm model name")
    sd = blob.get("state_dict")
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise RepresentationFileError(f"{path}: field state_dict must be a non-empty dict of tensors")
    if not isinstance(blob.get("extra", {}), dict):
        raise RepresentationFileError(f"{path}: field extra must be a dict")
    blob.setdefault("extra", {})
    blob.setdefault("stage", "?")
    return blob
