"""The CaSP stage graph (Qi et al. sec. 3, Fig. 2) and the baselines of Table 2 in the same run.

CaSP: early-pretrain (instance-teacher under alpha on the labeled split) -> pseudo-label (detect-pseudo-label,
score > delta, on the unlabeled split) -> late-pretrain (instance-teacher on the pseudo-labels alone) -> finetune
(instance-teacher from the late-pretrained weights, class-specific, on the labeled split). Every trained target model
is evaluated twice by evaluate-instances: on the val split (its promotion rule: the aliases move on a val metric) and
on the eval split (the reported figures, no promotion). Baselines: no pretraining; class-specific pseudo-labels
(Objects(P,S)); class-agnostic ground truth of the unlabeled split (Objects(G,A), an upper bound on the labels);
joint self-training on the labeled split joined with class-specific pseudo-labels (Table 6's self-training).
With ``casp.delta_sweep``, Table 7: one more pseudo-label -> late-pretrain chain per delta from the same labeling
detector, each scored on the eval split. With ``casp.entities`` (sec. 3.3) the class-agnostic chain (and the
ground-truth baseline) works on entities, things and stuff; finetuning and every evaluation stay on things.
"""
from __future__ import annotations

from contract.spec import StageSpec
from pipelines.casp.config import BASELINES, FINETUNED, LABELING, PRETRAINED, CaspConfig, delta_tag

# -- stage names: the graph and the report agree through these ---------------------------------
EARLY, PSEUDO, LATE, FINETUNE = "early-pretrain", "pseudo-label", "late-pretrain", "finetune"
NO_PRETRAINING = "no-pretraining"
SPECIFIC_PSEUDO, SPECIFIC_PRETRAIN, SPECIFIC_FINETUNE = "specific-pseudo-label", "specific-pretrain", "specific-finetune"
GT_PRETRAIN, GT_FINETUNE = "gt-pretrain", "gt-finetune"
JOINT_DATA, JOINT = "joint-data", "joint-self-training"


def val_stage(train: str) -> str:
    """The val-split evaluation of training stage ``train`` (carries the promotion rule)."""
    return f"{train}-val"


def eval_stage(train: str) -> str:
    """The eval-split (reported) evaluation of training stage ``train``."""
    return f"{train}-eval"


def sweep_stages(cfg: CaspConfig) -> list[tuple[float, str, str]]:
    """Table 7: (delta, pseudo-label stage, late-pretrain stage) per swept delta; the main chain's delta reuses it."""
    out = []
    for d in cfg.casp.delta_sweep:
        if delta_tag(d) == delta_tag(cfg.casp.delta):
            out.append((d, PSEUDO, LATE))
        else:
            out.append((d, f"{PSEUDO}-{delta_tag(d)}", f"{LATE}-{delta_tag(d)}"))
    return out


def table_rows(cfg: CaspConfig) -> list[tuple[str, str | None, str]]:
    """(Table 2 row, pretraining stage or None, finetuning stage), in the paper's order."""
    b = cfg.casp.baselines
    rows: list[tuple[str, str | None, str]] = []
    if "no_pretraining" in b:
        rows.append(("none (random init)", None, NO_PRETRAINING))
    kind = "Entities" if cfg.casp.entities else "Objects"
    if "class_agnostic_gt" in b:
        rows.append((f"{kind}(G,A)", GT_PRETRAIN, GT_FINETUNE))
    if "class_specific_pseudo_labels" in b:
        rows.append(("Objects(P,S)", SPECIFIC_PRETRAIN, SPECIFIC_FINETUNE))
    if "joint_self_training" in b:
        rows.append(("self-training: D^t + (P,S)", None, JOINT))
    rows.append((f"{kind}(P,A) = CaSP" if cfg.casp.alpha == "object" else "Objects(P,S) via alpha=identity", LATE, FINETUNE))
    return rows


def _out(cfg: CaspConfig, run: str, name: str) -> str:
    """Datasets a run writes live in the run folder (absolute, so new_stage_spec keeps it)."""
    return str(cfg.run_dir(run) / "datasets" / name)


def build_stages(cfg: CaspConfig, run: str) -> list[StageSpec]:
    """CaSP's three stages with their evaluations, then the baselines, in an order every input exists."""
    c = cfg.casp
    agnostic = c.alpha == "object"
    entity = {"entities": True} if c.entities else {}  # sec. 3.3: the class-agnostic chain on things and stuff
    evaluation = dict(c.evaluation.params)

    def train(name: str, section_params: dict, datasets: dict, output_model: str, models: dict | None = None, **params) -> StageSpec:
        return cfg.new_stage_spec(run, "instance-teacher", name, params={**params, **section_params}, datasets=datasets,
                                  models=models or {}, output_model=output_model)

    def evaluate(name: str, promote: bool) -> list[StageSpec]:
        """The val (with ``promote``: the promotion rule) and eval evaluations of training stage ``name``."""
        model = {"candidate": f"stage:{name}"}
        specs = []
        if promote:
            specs.append(cfg.new_stage_spec(run, "evaluate-instances", val_stage(name), params=evaluation,
                                            datasets={"eval": c.val}, models=model,
                                            output_dataset=_out(cfg, run, f"predictions-{val_stage(name)}"),
                                            promotion=cfg.promotion_rule(c.evaluation.promotion_metric)))
        specs.append(cfg.new_stage_spec(run, "evaluate-instances", eval_stage(name), params=evaluation,
                                        datasets={"eval": c.eval}, models=model,
                                        output_dataset=_out(cfg, run, f"predictions-{eval_stage(name)}")))
        return specs

    def label(name: str, detector: str, out: str, class_agnostic: bool, delta: float | None = None) -> StageSpec:
        return cfg.new_stage_spec(run, "detect-pseudo-label", name,
                                  params={"delta": c.delta if delta is None else delta, "class_agnostic": class_agnostic, "augment": c.pseudo_label.augment,
                                          **(entity if class_agnostic else {}), **c.pseudo_label.params},
                                  datasets={"images": c.unlabeled}, models={"detector": f"stage:{detector}"},
                                  output_dataset=_out(cfg, run, out))

    specs = [
        # eq. 1: h_L on alpha(D^t); its class-agnostic AP on val is logged (Table 5's labeling-detector quality)
        train(EARLY, c.early_pretrain.params, {"train": c.labeled, "eval": c.val}, LABELING, class_agnostic=agnostic, **entity),
        label(PSEUDO, EARLY, "pseudo-labels", agnostic),  # eq. 2-3
        # eq. 4: h_T on D^p alone; targets pseudo_labels refuses any record with ground truth
        train(LATE, c.late_pretrain.params, {"train": _out(cfg, run, "pseudo-labels")}, PRETRAINED,
              class_agnostic=agnostic, targets="pseudo_labels", **entity),
        *evaluate(LATE, promote=True),
        # eq. 5: h_F from h_T on D^t with classes
        train(FINETUNE, c.finetune.params, {"train": c.labeled}, FINETUNED, models={"init": f"stage:{LATE}"},
              head_init=c.finetune.head_init),
        *evaluate(FINETUNE, promote=True),
    ]
    for delta, pseudo, late in sweep_stages(cfg):  # Table 7: late-pretraining AP^e against delta
        if pseudo == PSEUDO:
            continue
        specs += [
            label(pseudo, EARLY, f"pseudo-labels-{delta_tag(delta)}", agnostic, delta=delta),
            train(late, c.late_pretrain.params, {"train": _out(cfg, run, f"pseudo-labels-{delta_tag(delta)}")}, BASELINES,
                  class_agnostic=agnostic, targets="pseudo_labels", **entity),
            *evaluate(late, promote=False),
        ]
    b = c.baselines
    specific = "class_specific_pseudo_labels" in b or "joint_self_training" in b
    if "no_pretraining" in b or specific:
        # no pretraining: the finetuning recipe from random init; also the class-specific labeling detector of (P,S)
        specs += [train(NO_PRETRAINING, c.finetune.params, {"train": c.labeled}, BASELINES), *evaluate(NO_PRETRAINING, False)]
    if specific:
        specs.append(label(SPECIFIC_PSEUDO, NO_PRETRAINING, "pseudo-labels-specific", False))
    if "joint_self_training" in b:  # Table 6's self-training: D^t and the class-specific D^p in one training
        specs += [
            cfg.new_stage_spec(run, "join-datasets", JOINT_DATA, datasets={"images": c.labeled,
                                                                           "extra": _out(cfg, run, "pseudo-labels-specific")},
                               output_dataset=_out(cfg, run, "joint-data")),
            train(JOINT, c.finetune.params, {"train": _out(cfg, run, "joint-data")}, BASELINES, targets="joint"),
            *evaluate(JOINT, False),
        ]
    if "class_specific_pseudo_labels" in b:
        specs += [
            train(SPECIFIC_PRETRAIN, c.late_pretrain.params, {"train": _out(cfg, run, "pseudo-labels-specific")}, BASELINES,
                  targets="pseudo_labels"),
            *evaluate(SPECIFIC_PRETRAIN, False),
            train(SPECIFIC_FINETUNE, c.finetune.params, {"train": c.labeled}, BASELINES, models={"init": f"stage:{SPECIFIC_PRETRAIN}"}),
            *evaluate(SPECIFIC_FINETUNE, False),
        ]
    if "class_agnostic_gt" in b:
        specs += [
            train(GT_PRETRAIN, c.late_pretrain.params, {"train": c.unlabeled_gt}, BASELINES, class_agnostic=True, **entity),
            *evaluate(GT_PRETRAIN, False),
            train(GT_FINETUNE, c.finetune.params, {"train": c.labeled}, BASELINES, models={"init": f"stage:{GT_PRETRAIN}"},
                  head_init=c.finetune.head_init),
            *evaluate(GT_FINETUNE, False),
        ]
    return specs
