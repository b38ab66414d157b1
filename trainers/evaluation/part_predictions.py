"""Part predictions for the part evaluation (PartDistillation sec. 5.1, Tables 2-3), per image:
(cluster-id map, object-class map, class-agnostic AR proposals), from a ranker model or a labels dataset."""
from __future__ import annotations

import numpy as np
import torch

from trainers.evaluation.clustering import NONE, paint_label_map
from trainers.parts.ranking import class_conditioned_parts, predict_part_labels
from trainers.structures import decode_mask, encode_masks


def object_class_map(masks: np.ndarray, classes: list[int], height: int, width: int) -> np.ndarray:
    """HxW object class of each pixel from object masks [J, H, W] (later objects paint over earlier ones, as
    ``predict_part_labels`` does); -1 on no object."""
    out = np.full((height, width), NONE, dtype=np.int64)
    for m, c in zip(masks, classes):
        out[m] = int(c)
    return out


def gt_object_union(record: dict) -> np.ndarray:
    h, w = int(record["height"]), int(record["width"])
    out = np.zeros((h, w), dtype=bool)
    for o in record.get("objects", []):
        out |= decode_mask(o["segmentation"])
    return out


def labels_predictions(record: dict, proposals: list[dict], setting: str) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """(cluster map, object class map, AR proposals) of one eval image from a labels dataset's proposals."""
    h, w = int(record["height"]), int(record["width"])
    usable = [p for p in proposals if p.get("label") is not None and int(p["label"]) >= 0
              and p.get("category_id") is not None]
    segs = [p["segmentation"] for p in usable]
    scores = [float(p.get("score", 1.0)) for p in usable]
    clusters = paint_label_map(segs, [int(p["label"]) for p in usable], h, w, scores)
    classes = paint_label_map(segs, [int(p["category_id"]) for p in usable], h, w, scores)
    if setting == "gt":
        classes = np.where(gt_object_union(record), classes, NONE)
    return clusters, classes, [{"segmentation": p["segmentation"], "score": float(p.get("score", 1.0))}
                               for p in proposals]


@torch.no_grad()
def model_predictions(model, label_map, x: torch.Tensor, objects: list[tuple[torch.Tensor, list[int]]],
                      top_k: int, soft: bool = False) -> list[tuple[np.ndarray, np.ndarray, list[dict]]]:
    """Per image of a same-size batch ``x``: (cluster map, object class map, AR proposals) of the ranker conditioned
    on ``objects[b] = (masks [J, H, W] bool, category ids)``; ``soft``: pixels owned by mask probability
    (``predict_part_labels``)."""
    h, w = x.shape[-2:]
    maps = predict_part_labels(model, x, [m for m, _ in objects], [c for _, c in objects], label_map, soft=soft)
    outputs = model(x.to(next(model.parameters()).device))
    out = []
    for b, (masks, classes) in enumerate(objects):
        om = masks.to(outputs["pred_masks"].device).bool()
        part_masks, scores, _ = class_conditioned_parts(outputs["pred_logits"][b], outputs["pred_masks"][b], om,
                                                        list(classes), label_map)
        order = scores.argsort(descending=True, stable=True)[:top_k]
        rles = encode_masks(part_masks[order].cpu().numpy())
        props = [{"segmentation": r, "score": float(s)} for r, s in zip(rles, scores[order].tolist())]
        out.append((maps[b], object_class_map(om.cpu().numpy(), list(classes), h, w), props))
    return out


def jsonable(v: dict) -> dict:
    return {k: ({str(pk): float(pv) for pk, pv in x.items()} if isinstance(x, dict) else float(x)) for k, x in v.items()}


# -- predictions as files (COCO results), and scoring them -----------------------------------------------------------
# One image's part prediction, as evaluate-parts scores it and writes it: ``segments`` (disjoint: one per (object,
# object class, cluster) present in the cluster-id map, so the two maps the evaluator reads are painted back exactly)
# and ``proposals`` (the scored, overlapping part masks of AR@k). The files (``write_part_results``):
#   images.json            {"images": [{"id", "file_name": dataset key, "height", "width"}], "categories": the (object
#                          class, cluster) labels, "object_categories", "settings", "max_dets"}
#   results-<setting>.json COCO results of the segments: {"image_id", "category_id" (one per (class, cluster)),
#                          "object_class", "cluster", "object" (index into the image's objects: the record's objects
#                          (gt) or the detections of objects-pred.json; -1 unknown), "segmentation" (RLE), "score"}
#   proposals-<setting>.json  COCO results of the AR proposals: {"image_id", "category_id": 1, "segmentation", "score"}
# ``score_part_results`` re-scores those files against a dataset with the same evaluators.

def encode_segments(clusters: np.ndarray, classes: np.ndarray, objects: np.ndarray | None = None) -> list[dict]:
    """Disjoint RLE segments, one per (object, object class, cluster) present where class or cluster is set."""
    objects = np.full(clusters.shape, NONE, dtype=np.int64) if objects is None else np.asarray(objects, dtype=np.int64)
    keep = (classes != NONE) | (clusters != NONE)
    if not keep.any():
        return []
    triples = np.stack([objects[keep], classes[keep], clusters[keep]], axis=1)
    out = []
    for j, c, k in np.unique(triples, axis=0).tolist():
        m = keep & (objects == j) & (classes == c) & (clusters == k)
        out.append({"object": int(j), "object_class": int(c), "cluster": int(k), "segmentation": encode_masks(m[None])[0]})
    return out


def decode_segments(segments: list[dict], height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """(cluster map, object class map) painted back from ``encode_segments``' segments."""
    clusters = np.full((height, width), NONE, dtype=np.int64)
    classes = np.full((height, width), NONE, dtype=np.int64)
    for s in segments:
        m = decode_mask(s["segmentation"])
        clusters[m], classes[m] = int(s["cluster"]), int(s["object_class"])
    return clusters, classes


@torch.no_grad()
def ranker_file_predictions(model, label_map, x: torch.Tensor, objects: list[tuple[torch.Tensor, list[int]]], top_k: int,
                            with_objects: bool, soft: bool = False) -> list[dict]:
    """Per image of a same-size batch: the ranker's prediction in file form (``segments``, ``proposals`` and, with
    ``with_objects``, the conditioning ``objects`` as ``{"category_id", "segmentation"}``)."""
    out = []
    for (masks, cats), (clusters, classes, props) in zip(objects, model_predictions(model, label_map, x, objects, top_k, soft)):
        m = masks.cpu().numpy().astype(bool)
        pred = {"segments": encode_segments(clusters, classes, object_index_map(m, *clusters.shape)), "proposals": props}
        if with_objects:
            pred["objects"] = [{"category_id": int(c), "segmentation": rle} for c, rle in zip(cats, encode_masks(m) if len(m) else [])]
        out.append(pred)
    return out


def object_index_map(masks: np.ndarray, height: int, width: int) -> np.ndarray:
    """HxW index of the object owning each pixel (later objects paint over earlier ones, as the class map); -1 none."""
    out = np.full((height, width), NONE, dtype=np.int64)
    for j, m in enumerate(masks):
        out[np.asarray(m, dtype=bool)] = j
    return out


def write_part_results(out_dir, images: list[dict], predictions: dict[str, list[dict]], object_categories: list[dict],
                       max_dets, gt_class_map: list[str]) -> dict[str, str]:
    """Write the COCO files of ``predictions[setting]`` (per image, in ``images`` order: ``{"segments", "proposals",
    "objects"?}``) into ``out_dir``; returns file name -> path. Image ids are 1..N in ``images`` order.
    ``gt_class_map``: the settings whose predictions are scored with the ground truth's object class map (a model
    conditioned on the GT objects)."""
    from pathlib import Path

    from contract.io import write_json

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pairs = sorted({(s["object_class"], s["cluster"]) for preds in predictions.values() for p in preds
                    for s in p["segments"]})
    cat_of = {pair: i + 1 for i, pair in enumerate(pairs)}
    names = {int(c["id"]): c["name"] for c in object_categories}
    doc = {"images": [{"id": i + 1, "file_name": im["key"], "height": int(im["height"]), "width": int(im["width"])}
                      for i, im in enumerate(images)],
           "categories": [{"id": cat_of[(c, k)], "object_class": c, "cluster": k,
                           "name": f"{names.get(c, c)}/{'unassigned' if k == NONE else f'cluster {k}'}"} for c, k in pairs],
           "object_categories": [{"id": int(c["id"]), "name": c["name"]} for c in object_categories],
           "settings": sorted(predictions), "max_dets": list(max_dets), "gt_class_map": sorted(gt_class_map)}
    files = {"images.json": write_json(out / "images.json", doc, indent=None)}
    for setting, preds in predictions.items():
        if len(preds) != len(images):
            raise ValueError(f"setting {setting}: {len(preds)} predictions for {len(images)} images")
        seg, props, objs = [], [], []
        for i, p in enumerate(preds):
            seg += [{"image_id": i + 1, "category_id": cat_of[(s["object_class"], s["cluster"])], **s, "score": 1.0}
                    for s in p["segments"]]
            props += [{"image_id": i + 1, "category_id": 1, "segmentation": q["segmentation"],
                       "score": float(q.get("score", 1.0))} for q in p["proposals"]]
            objs += [{"image_id": i + 1, **o} for o in p.get("objects") or []]
        files[f"results-{setting}.json"] = write_json(out / f"results-{setting}.json", seg, indent=None)
        files[f"proposals-{setting}.json"] = write_json(out / f"proposals-{setting}.json", props, indent=None)
        if objs:
            files[f"objects-{setting}.json"] = write_json(out / f"objects-{setting}.json", objs, indent=None)
    return {k: str(v) for k, v in files.items()}


def read_part_results(out_dir) -> tuple[dict, dict[str, list[dict]]]:
    """(images.json, setting -> per image in images.json order ``{"segments", "proposals"}``) of a results folder;
    ValueError naming the file and entry for an image id the index does not list."""
    import json
    from pathlib import Path

    out = Path(out_dir)
    doc = json.loads((out / "images.json").read_text())
    index = {im["id"]: i for i, im in enumerate(doc["images"])}
    preds: dict[str, list[dict]] = {}
    for setting in doc["settings"]:
        per = [{"segments": [], "proposals": []} for _ in doc["images"]]
        for what, name in (("segments", f"results-{setting}.json"), ("proposals", f"proposals-{setting}.json")):
            for n, r in enumerate(json.loads((out / name).read_text())):
                if r.get("image_id") not in index:
                    raise ValueError(f"{out / name}: entry {n} has image_id {r.get('image_id')!r}, not in images.json")
                per[index[r["image_id"]]][what].append(r)
        preds[setting] = per
    return doc, preds


def score_part_results(dataset: str, out_dir, reference: str = "parts") -> dict[str, float]:
    """The part metrics of a results folder against ``dataset`` (matched by key): what evaluate-parts reports
    (``eval/<setting>/...`` clustering and AR@k), from the files alone."""
    from trainers.data import shards
    from trainers.evaluation import PartClusteringEvaluator, PartProposalRecall
    from trainers.evaluation.proposals import metric_key, reference_record

    doc, preds = read_part_results(out_dir)
    by_key = {im["file_name"]: i for i, im in enumerate(doc["images"])}
    clustering = {s: PartClusteringEvaluator() for s in preds}
    recall = {s: PartProposalRecall(max_dets=doc["max_dets"], clip_to_objects=(s == "gt")) for s in preds}
    seen = 0
    for key, _, record in shards.iter_samples(dataset, decode=False, allow_parts=True):
        if key not in by_key:
            continue
        seen += 1
        record = reference_record(record, reference)
        for s in preds:
            p = preds[s][by_key[key]]
            score_part_prediction(clustering[s], recall[s], record, p, gt_objects=s in doc["gt_class_map"])
    if seen != len(by_key):
        raise ValueError(f"{out_dir}: {len(by_key) - seen} of its images are not in {dataset}")
    metrics = {}
    for s in preds:
        metrics.update({f"eval/{s}/{k}": v for k, v in clustering[s].evaluate().items()})
        metrics.update({metric_key(k).replace("eval/", f"eval/{s}/", 1): v for k, v in recall[s].evaluate().items()})
    return metrics


def score_part_prediction(clustering, recall, record: dict, prediction: dict, gt_objects: bool) -> None:
    """Feed one image's prediction (segments + proposals) to the evaluators; ``gt_objects``: the class map is the
    ground truth's (a model conditioned on the GT objects)."""
    h, w = int(record["height"]), int(record["width"])
    clusters, classes = decode_segments(prediction["segments"], h, w)
    clustering.process(record, clusters, None if gt_objects else classes)
    recall.process(record, prediction["proposals"])


# -- predictions of a registered model on any dataset (selftrain predict) --------------------------------------------
@torch.no_grad()
def predict_to_files(model_path, dataset: str, out_dir, instance_teacher=None, batch_size: int = 8, top_k: int | None = None,
                     object_score_threshold: float = 0.5, max_detections: int = 20, min_size: int | None = None,
                     max_size: int | None = None, pixel_assignment: str = "soft") -> dict[str, str]:
    """A model file's predictions on ``dataset`` as the COCO files its evaluating stage writes, by the file's kind:

    - a part ranker (``train-ranker``): ``write_part_results`` layout, setting ``gt`` (conditioned on the dataset's
      objects) and, given ``instance_teacher``, ``pred`` (its detections with score > ``object_score_threshold``);
    - a class-agnostic part model (``train-proposals``): ``images.json`` + ``proposals.json`` (its top_k masks);
    - an instance model: ``images.json`` + ``results.json`` (COCO instance results), as evaluate-instances.
    ``min_size`` / ``max_size``: the input size the models see (``trainers.data.batches.InputSize``; the masks come
    back at the dataset's resolution). ``pixel_assignment``: a ranker's cluster map, as evaluate-parts' param of that
    name (soft or mask). Returns file name -> path."""
    from pathlib import Path

    from contract.io import write_json
    from trainers.data import shards
    from trainers.data.batches import AtInputSize, InputSize, category_labels, images_to_tensor, iter_batches
    from trainers.evaluation.instances import coco_results
    from trainers.evaluation.proposals import write_proposal_results
    from trainers.models.io import load_ranker, load_segmenter, read_segmenter_file
    from trainers.parts.objects import image_objects

    blob = read_segmenter_file(model_path)
    kind = "ranker" if "label_map" in blob else ("proposals" if blob.get("stage") == "train-proposals" else "objects")
    categories = shards.DatasetIndex.load(dataset).categories
    labels = {i: c for c, i in category_labels(dataset).items()}
    teacher = load_segmenter(instance_teacher) if instance_teacher else None
    model, lmap = load_ranker(model_path) if kind == "ranker" else (load_segmenter(model_path), None)
    size = InputSize(min_size, max_size)
    if size:
        model, teacher = AtInputSize(model, size), teacher and AtInputSize(teacher, size)
    k = top_k or int(blob["config"].get("top_k") or blob["config"]["decoder"]["num_queries"])
    settings = ["gt"] + (["pred"] if teacher is not None else [])
    images, preds, results = [], {s: [] for s in settings}, []
    for keys, imgs, records in iter_batches(dataset, batch_size, allow_parts=True):
        by_size: dict[tuple[int, int], list[int]] = {}
        for i, image in enumerate(imgs):  # one forward per image size, never padded
            by_size.setdefault(image.shape[:2], []).append(i)
        for idx in by_size.values():
            x = images_to_tensor([imgs[i] for i in idx])
            recs = [records[i] for i in idx]
            images += [{"key": keys[i], "height": int(records[i]["height"]), "width": int(records[i]["width"])} for i in idx]
            if kind == "ranker":
                for s in settings:
                    dets = teacher.predict(x, top_k=max_detections) if s == "pred" else [None] * len(idx)
                    objs = [image_objects(r, d, object_score_threshold, categories, x.device) for r, d in zip(recs, dets)]
                    preds[s] += ranker_file_predictions(model, lmap, x, [(m, c) for m, _, c in objs], k, with_objects=s == "pred",
                                                      soft=pixel_assignment == "soft")
                continue
            for i, p in zip(idx, model.predict(x, top_k=k)):
                rles, scores = encode_masks(p.masks.cpu().numpy()), p.scores.tolist()
                if kind == "proposals":
                    preds["gt"].append({"proposals": [{"segmentation": r, "score": float(v)} for r, v in zip(rles, scores)]})
                else:
                    results += [{"key": keys[i], "category_id": labels.get(int(c), -1), "segmentation": r, "score": float(v)}
                                for r, v, c in zip(rles, scores, p.labels.tolist())]
    out = Path(out_dir)
    if kind == "ranker":
        return write_part_results(out, images, preds, categories, [1, 10, k], gt_class_map=["gt"])
    if kind == "proposals":
        return write_proposal_results(out, images, [p["proposals"] for p in preds["gt"]], [1, 10, k], False, "parts")
    doc, res = coco_results([{**im, "objects": []} for im in images], results, categories)
    out.mkdir(parents=True, exist_ok=True)
    return {"images.json": str(write_json(out / "images.json", doc, indent=None)),
            "results.json": str(write_json(out / "results.json", res, indent=None))}


def main(argv: list[str] | None = None) -> None:
    """``python -m trainers.evaluation.part_predictions MODEL DATASET -o DIR [--instance-teacher FILE]`` (model files;
    ``selftrain predict`` resolves registered models first)."""
    import argparse
    import json

    ap = argparse.ArgumentParser(description=predict_to_files.__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("dataset")
    ap.add_argument("-o", "--out", required=True)
    ap.add_argument("--instance-teacher", default=None)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=None)
    ap.add_argument("--min-size", type=int, default=None, help="Shortest edge the models see (default: as stored).")
    ap.add_argument("--max-size", type=int, default=None, help="Longest edge the models see at most.")
    ap.add_argument("--pixel-assignment", choices=("soft", "mask"), default="soft",
                    help="A part ranker's cluster map, as evaluate-parts' pixel_assignment param.")
    a = ap.parse_args(argv)
    files = predict_to_files(a.model, a.dataset, a.out, a.instance_teacher, a.batch_size, a.top_k,
                             min_size=a.min_size, max_size=a.max_size, pixel_assignment=a.pixel_assignment)
    print(json.dumps(files))


if __name__ == "__main__":
    main()
