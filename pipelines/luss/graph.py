"""The PASS stage graph (LUSS sec. 4, Fig. 7) with its baselines, protocols and the sweep of K in the same run.

PASS: represent -> pixel-attention -> labels-k<K> (generate-labels) -> finetune (finetune-segmentation). Scored by
evaluate-segmentation on the val split (``-val``; the fine-tuned model's carries the promotion rule) and the eval split
(``-eval``, the report): the fine-tuned model, and the generated labels themselves (their rule applied with the
pixel-attention model: "before fine-tuning"). Baselines at the same K: k-means with K+1 clusters over the raw pixel
features of the same backbone, randomly initialised (``random-init``: represent with 0 steps) and as represent trained
it. Protocols: distance matching of both representations, semi-supervised fine-tuning on the labeled images. The sweep
adds, per K', the labels rule and the k-means baselines scored on the eval split (the mIoU-against-K plot).
"""
from __future__ import annotations

from contract.spec import StageSpec
from pipelines.luss.config import ATTENTION, BASELINES, REPRESENTATION, SEGMENTATION, LussConfig

# -- stage names: the graph and the report agree through these ---------------------------------
REPRESENT, RANDOM_INIT, ATTENTION_STAGE, FINETUNE = "represent", "random-init", "pixel-attention", "finetune"
SEMI = "semi-supervised"
ROW_SOURCES = {"kmeans_random": RANDOM_INIT, "kmeans_pretrained": REPRESENT}


def labels_stage(k: int) -> str:
    """The generate-labels stage of PASS's rule at K = ``k``."""
    return f"labels-k{k}"


def kmeans_stage(baseline: str, k: int) -> str:
    """The generate-labels stage of a k-means baseline (kmeans_random / kmeans_pretrained) at K = ``k``."""
    return f"{baseline.replace('_', '-')}-k{k}"


def val_stage(stage: str) -> str:
    return f"{stage}-val"


def eval_stage(stage: str) -> str:
    return f"{stage}-eval"


def dm_stage(source: str) -> str:
    """The distance-matching evaluation (eval split) of representation ``source`` (a represent stage)."""
    return f"dm-{source}"


def _out(cfg: LussConfig, run: str, name: str) -> str:
    """Datasets a run writes live in the run folder (absolute, so new_stage_spec keeps it)."""
    return str(cfg.run_dir(run) / "datasets" / name)


def build_stages(cfg: LussConfig, run: str) -> list[StageSpec]:
    """Every stage of one run, in an order in which every input exists."""
    c = cfg.luss
    ev = dict(c.evaluation.params)
    needs_random = "kmeans_random" in c.baselines or "distance_matching" in c.protocols

    def evaluate(name: str, split: str, candidate: str, *, labels: str | None = None, promote: bool = False,
                 protocol: str = "fully_unsupervised") -> StageSpec:
        datasets = {"eval": c.val if split == "val" else c.eval}
        if labels is not None:
            datasets["labels"] = _out(cfg, run, labels)
        if protocol == "distance_matching":
            datasets["labeled"] = c.labeled
        stage = val_stage(name) if split == "val" else eval_stage(name)
        return cfg.new_stage_spec(run, "evaluate-segmentation", stage, params={**ev, "protocol": protocol},
                                  datasets=datasets, models={"candidate": f"stage:{candidate}"},
                                  output_dataset=_out(cfg, run, f"predictions-{stage}"),
                                  promotion=cfg.promotion_rule(c.evaluation.promotion_metric) if promote else None)

    def generate(name: str, method: str, model: str, k: int, write_labels: bool) -> StageSpec:
        params = {**c.generate_labels.params, "method": method, "k": k, "write_labels": write_labels}
        if method == "pixel_attention":
            params["threshold"] = c.generate_labels.threshold
        return cfg.new_stage_spec(run, "generate-labels", name, params=params, datasets={"images": c.train},
                                  models={"model": f"stage:{model}"}, output_dataset=_out(cfg, run, name))

    specs = [
        cfg.new_stage_spec(run, "represent", REPRESENT, params=dict(c.represent.params), datasets={"train": c.train},
                           output_model=REPRESENTATION),
    ]
    if needs_random:  # the same architecture, never trained: represent's seeded initialisation
        specs.append(cfg.new_stage_spec(run, "represent", RANDOM_INIT, params={**c.represent.params, "steps": 0},
                                        output_model=BASELINES))
    main = labels_stage(c.k)
    specs += [
        cfg.new_stage_spec(run, "pixel-attention", ATTENTION_STAGE, params=dict(c.pixel_attention.params),
                           datasets={"train": c.train}, models={"representation": f"stage:{REPRESENT}"}, output_model=ATTENTION),
        generate(main, "pixel_attention", ATTENTION_STAGE, c.k, write_labels=True),
        cfg.new_stage_spec(run, "finetune-segmentation", FINETUNE, params={**c.finetune.params, "targets": "generated"},
                           datasets={"train": _out(cfg, run, main)}, models={"representation": f"stage:{REPRESENT}"},
                           output_model=SEGMENTATION),
        evaluate(FINETUNE, "val", FINETUNE, promote=True),
        evaluate(FINETUNE, "eval", FINETUNE),
        evaluate(main, "val", ATTENTION_STAGE, labels=main),
        evaluate(main, "eval", ATTENTION_STAGE, labels=main),
    ]
    for baseline in c.baselines:  # k-means at the same K on the raw features
        name, source = kmeans_stage(baseline, c.k), ROW_SOURCES[baseline]
        specs += [generate(name, "pixel_kmeans", source, c.k, write_labels=False),
                  evaluate(name, "val", source, labels=name), evaluate(name, "eval", source, labels=name)]
    for k in c.k_sweep:  # the mIoU-against-K plot: the rule and the baselines at every K, eval split
        specs += [generate(labels_stage(k), "pixel_attention", ATTENTION_STAGE, k, write_labels=False),
                  evaluate(labels_stage(k), "eval", ATTENTION_STAGE, labels=labels_stage(k))]
        for baseline in c.baselines:
            name, source = kmeans_stage(baseline, k), ROW_SOURCES[baseline]
            specs += [generate(name, "pixel_kmeans", source, k, write_labels=False), evaluate(name, "eval", source, labels=name)]
    if "distance_matching" in c.protocols:
        for source in (REPRESENT, RANDOM_INIT):
            specs.append(evaluate(dm_stage(source), "eval", source, protocol="distance_matching"))
    if "semi_supervised" in c.protocols:
        specs += [cfg.new_stage_spec(run, "finetune-segmentation", SEMI, params={**c.finetune.params, "targets": "ground_truth"},
                                     datasets={"train": c.labeled}, models={"representation": f"stage:{REPRESENT}"},
                                     output_model=BASELINES),
                  evaluate(SEMI, "eval", SEMI, protocol="semi_supervised")]
    return specs
