"""One file per trained model: its SegmenterConfig plus its plain state_dict.

The registered-model artifact of every PartDistillation stage is such a file, so any later stage
(or a person) rebuilds the exact model from ``models:/<name>@teacher`` alone.
"""
from __future__ import annotations

import io
from pathlib import Path

import torch

from contract.io import write_atomic
from trainers.models.config import SegmenterConfig
from trainers.models.segmenter import Segmenter

FORMAT = "selftrain.segmenter/v1"


def save_segmenter(path: str | Path, cfg: SegmenterConfig, state_dict: dict[str, torch.Tensor], **extra) -> Path:
    """Write ``{"format", "config", "state_dict", **extra}`` atomically (temp file, then rename)."""
    buf = io.BytesIO()
    torch.save({"format": FORMAT, "config": cfg.model_dump(mode="json"),
                "state_dict": {k: v.detach().cpu() for k, v in state_dict.items()}, **extra}, buf)
    return write_atomic(path, buf.getvalue())


def read_segmenter_file(path: str | Path) -> dict:
    path = Path(path)
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such model file") from None
    except Exception as e:  # a truncated or foreign file
        raise ValueError(f"{path}: not a readable model file ({e})") from e
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise ValueError(f"{path}: not a selftrain segmenter file (expected format {FORMAT!r}); "
                         "a plain state_dict needs its SegmenterConfig: use load_segmenter(path, cfg=...)")
    return blob


def load_segmenter(path: str | Path, *, cfg: SegmenterConfig | None = None, encoder=None,
                   map_location: str | torch.device = "cpu") -> Segmenter:
    """Rebuild a Segmenter from a segmenter file (or a plain state_dict plus ``cfg``), in eval mode."""
    if cfg is None:
        blob = read_segmenter_file(path)
        cfg, state = SegmenterConfig.model_validate(blob["config"]), blob["state_dict"]
        # the file holds every weight: never fetch pretrained ones again (clusters have no internet)
        cfg = cfg.model_copy(update={"encoder": cfg.encoder.model_copy(update={"pretrained": None})})
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state)
    model = Segmenter(cfg, encoder=encoder)
    missing, unexpected = model.load_state_dict(state, strict=encoder is None)
    if encoder is not None and unexpected:
        raise ValueError(f"{path}: unexpected weights {unexpected[:5]}")
    return model.to(map_location).eval()


def load_ranker(path: str | Path, device: torch.device | str = "cpu"):
    """``(Segmenter in eval mode, LabelMap)`` of a ``train-ranker`` model file (a segmenter file with ``label_map``)."""
    from trainers.parts.label_map import LabelMap

    blob = read_segmenter_file(path)
    if "label_map" not in blob:
        raise ValueError(f"{path}: not a part-ranker model (no label_map)")
    return load_segmenter(path).to(device).eval(), LabelMap.from_doc(blob["label_map"])
