"""Instance segmentation quality of an object model: COCO mask AP by pycocotools (PartDistillation sec. 4.1's teacher).

Inference is sharded across ranks (:func:`predict_objects`), gathered to rank 0 and scored there by COCOeval
(``iouType="segm"``), class-aware and class-agnostic (:func:`coco_mask_ap`).
"""
from __future__ import annotations

import contextlib
import io

import torch
import torch.distributed as dist

from trainers.comm import Dist
from trainers.data.batches import images_to_tensor, iter_batches


@torch.no_grad()
def predict_objects(model, dataset_dir: str, d: Dist, labels: dict[int, int], batch_size: int = 16,
                    desc: str | None = None) -> tuple[list[dict], list[dict]]:
    """This rank's share of ``dataset_dir``: (COCO images with their GT objects, COCO segm results)."""
    from tqdm.auto import tqdm

    index_to_cat = {i: c for c, i in labels.items()}
    images, results = [], []
    bar = tqdm(desc=desc, unit="img", **({} if d.is_main else {"disable": True}))  # and TQDM_DISABLE=1 (tqdm reads it)
    for keys, imgs, records in iter_batches(dataset_dir, batch_size, rank=d.rank, world_size=d.world_size,
                                            allow_parts=True):
        preds = model.predict(images_to_tensor(imgs).to(d.device))
        for key, record, p in zip(keys, records, preds):
            images.append({"key": key, "height": int(record["height"]), "width": int(record["width"]),
                           "objects": [{k: o[k] for k in ("category_id", "segmentation", "iscrowd")}
                                       for o in record.get("objects", [])]})
            for rle, score, label in zip(p.to_rle(), p.scores.tolist(), p.labels.tolist()):
                results.append({"key": key, "category_id": index_to_cat.get(int(label), -1), "segmentation": rle,
                                "score": float(score)})
        bar.update(len(keys))
    bar.close()
    return images, results


STAT_NAMES = ("mask_AP", "mask_AP50", "mask_AP75", "mask_APs", "mask_APm", "mask_APl",
              "mask_AR1", "mask_AR10", "mask_AR100", "mask_ARs", "mask_ARm", "mask_ARl")


def coco_mask_ap(images: list[dict], results: list[dict], categories: list[dict]) -> dict[str, float]:
    """Instance mask AP by pycocotools COCOeval (iouType segm): ``eval/mask_AP``, ``..._AP50``, ... and the
    class-agnostic ``eval/mask_AP_agnostic`` (what part mining needs from the teacher: its masks)."""
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    ids = {im["key"]: i + 1 for i, im in enumerate(images)}
    annotations = []
    for im in images:
        for o in im["objects"]:
            annotations.append({"id": len(annotations) + 1, "image_id": ids[im["key"]], "category_id": int(o["category_id"]),
                                "segmentation": o["segmentation"], "area": float(mask_utils.area(_pycoco(o["segmentation"]))),
                                "bbox": [float(v) for v in mask_utils.toBbox(_pycoco(o["segmentation"]))],
                                "iscrowd": int(o.get("iscrowd", 0))})
    out = {f"eval/{n}": 0.0 for n in STAT_NAMES}
    out["eval/mask_AP_agnostic"] = 0.0
    out["eval/images"] = float(len(images))
    out["eval/objects"] = float(len(annotations))
    if not annotations or not results:
        return out
    dts = [{"image_id": ids[r["key"]], "category_id": r["category_id"], "segmentation": r["segmentation"],
            "score": r["score"]} for r in results]
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints as it goes
        gt = COCO()
        gt.dataset = {"images": [{"id": ids[im["key"]], "height": im["height"], "width": im["width"]} for im in images],
                      "annotations": annotations, "categories": [{"id": int(c["id"]), "name": c["name"]} for c in categories]}
        gt.createIndex()
        dt = gt.loadRes(dts)
        for use_cats in (1, 0):
            ev = COCOeval(gt, dt, iouType="segm")
            ev.params.useCats = use_cats
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
            if use_cats:
                out.update({f"eval/{n}": float(max(v, 0.0)) for n, v in zip(STAT_NAMES, ev.stats)})
            else:
                out["eval/mask_AP_agnostic"] = float(max(ev.stats[0], 0.0))
                out["eval/mask_AP50_agnostic"] = float(max(ev.stats[1], 0.0))
    return out


def _pycoco(rle: dict) -> dict:
    counts = rle["counts"]
    return {"size": list(rle["size"]), "counts": counts.encode("ascii") if isinstance(counts, str) else counts}


def gather_predictions(images: list[dict], results: list[dict], d: Dist) -> tuple[list[dict], list[dict]]:
    """Every rank's (images, results) concatenated on rank 0 (in rank order); other ranks get theirs back."""
    if dist.is_initialized() and d.world_size > 1:
        gathered = [None] * d.world_size
        dist.gather_object((images, results), gathered if d.is_main else None, dst=0)
        if d.is_main:
            images = [im for g in gathered for im in g[0]]
            results = [r for g in gathered for r in g[1]]
    return images, results


def evaluate_instances(model, path: str, d: Dist, labels: dict[int, int], categories: list[dict],
                       batch_size: int = 16, desc: str | None = None) -> dict[str, float]:
    """Inference on every rank's share of ``path``, gathered to rank 0, COCOeval there ({} elsewhere)."""
    images, results = predict_objects(model, path, d, labels, batch_size, desc=desc)
    images, results = gather_predictions(images, results, d)
    return coco_mask_ap(images, results, categories) if d.is_main else {}


AGNOSTIC = {"id": 1, "name": "object"}


def one_category_mask_ap(images: list[dict], results: list[dict]) -> dict[str, float]:
    """Class-agnostic mask AP as CaSP reports it (AP^seg-a): COCOeval (segm, useCats=1) after mapping every
    ground-truth object and every prediction to one category ``object``. Keys ``eval/mask_AP_agnostic``,
    ``..._AP50_agnostic``, ``..._AP75_agnostic``, ``..._AR100_agnostic``."""
    one = [{**im, "objects": [{**o, "category_id": AGNOSTIC["id"]} for o in im["objects"]]} for im in images]
    res = [{**r, "category_id": AGNOSTIC["id"]} for r in results]
    m = coco_mask_ap(one, res, [AGNOSTIC])
    return {f"eval/{n}_agnostic": m[f"eval/{n}"] for n in ("mask_AP", "mask_AP50", "mask_AP75", "mask_AR100")}


def coco_results(images: list[dict], results: list[dict], categories: list[dict]) -> tuple[dict, list[dict]]:
    """COCO files of predictions: (the image list with categories, the results list of ``loadRes``), image ids
    1..N in ``images`` order, each image carrying its dataset key as ``file_name``."""
    ids = {im["key"]: i + 1 for i, im in enumerate(images)}
    doc = {"images": [{"id": ids[im["key"]], "file_name": im["key"], "height": im["height"], "width": im["width"]}
                      for im in images],
           "categories": [{"id": int(c["id"]), "name": c["name"]} for c in categories]}
    res = [{"image_id": ids[r["key"]], "category_id": int(r["category_id"]), "segmentation": r["segmentation"],
            "score": round(float(r["score"]), 6)} for r in results]
    return doc, res
