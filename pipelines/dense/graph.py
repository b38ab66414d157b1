"""The dense pipeline's stage graph: per method, train -> evaluate on val (promotion) and on eval (the table), plus
the method's backbone at random init on eval; every further representation on eval. One evaluation for all rows."""
from __future__ import annotations

from contract import stages as registry
from contract.spec import StageSpec
from pipelines.dense.config import LEOPART_MODEL, SLOTCON_MODEL, DenseConfig

MODELS = {"slotcon": SLOTCON_MODEL, "leopart": LEOPART_MODEL}
LABELS = {"slotcon": "SlotCon", "leopart": "Leopart"}


def val_stage(name: str) -> str:
    return f"{name}-val"


def eval_stage(name: str) -> str:
    return f"{name}-eval"


def random_stage(method: str) -> str:
    return f"{method}-random-init"


def rows(cfg: DenseConfig) -> list[tuple[str, str, str | None]]:
    """(table row, its eval-split stage, the eval stage of the random-init row it is compared with), in table order."""
    d = cfg.dense
    out: list[tuple[str, str, str | None]] = []
    for m in d.methods:
        base = eval_stage(random_stage(m)) if d.random_init else None
        if base:
            out.append((f"{LABELS[m]} backbone, random init", base, None))
        out.append((LABELS[m], eval_stage(m), base))
    out += [(label, eval_stage(label), None) for label in d.representations]
    return out


def build_stages(cfg: DenseConfig, run: str) -> list[StageSpec]:
    d = cfg.dense
    shared = dict(d.evaluation.params)
    reported = {"eval": d.eval, **({"probe": d.probe} if d.probe else {})}

    def evaluate(name: str, datasets: dict, params: dict, models: dict | None = None, promote: bool = False) -> StageSpec:
        return cfg.new_stage_spec(run, "evaluate-representation", name, params=params, datasets=datasets, models=models or {},
                                  promotion=cfg.promotion_rule(d.evaluation.promotion_metric) if promote else None)

    specs: list[StageSpec] = []
    for m in d.methods:
        section = getattr(d, m)
        params = {**shared, **section.evaluation}
        specs.append(cfg.new_stage_spec(run, m, m, params=dict(section.params), datasets={"train": d.train},
                                        output_model=MODELS[m], resources=dict(section.resources)))
        model = {"candidate": f"stage:{m}"}
        specs.append(evaluate(val_stage(m), {"eval": d.val}, {**params, "concepts_top_k": 0}, model, promote=True))
        specs.append(evaluate(eval_stage(m), reported, params, model))
        if d.random_init:
            trained = registry.get(m).parse(section.params, source=f"dense.{m}.params")
            baseline = {**params, "backbone": trained.backbone, "output_stride": trained.output_stride,
                        "weights": trained.weights, "seed": trained.seed, "concepts_top_k": 0}
            specs.append(evaluate(eval_stage(random_stage(m)), reported, baseline))
    for label, uri in d.representations.items():
        specs.append(evaluate(eval_stage(label), reported, shared, {"candidate": uri}))
    return specs
