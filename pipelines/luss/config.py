"""The PASS/LUSS pipeline config: its typed section (the paper's symbols: K, tau) and the registered model names."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from contract.spec import StageSpec
from pipelines.config import PIPELINES, PipelineConfig, _Strict, stage_params

REPRESENTATION = "luss-representation"  # represent (sec. 4.2)
ATTENTION = "luss-pixel-attention"  # pixel-attention (sec. 4.3)
SEGMENTATION = "luss-segmentation"  # finetune-segmentation (sec. 4.4): promoted on val
BASELINES = "luss-baselines"  # the random initialisation and the semi-supervised model

Baseline = Literal["kmeans_random", "kmeans_pretrained"]
Protocol = Literal["distance_matching", "semi_supervised"]


class RepresentSection(_Strict):
    """Representation learning (sec. 4.2)."""

    params: dict[str, Any] = stage_params("represent", "Overrides of the represent trainer's params (steps, backbone, crops, ...).")


class AttentionSection(_Strict):
    """Pixel attention (sec. 4.3, eq. 6)."""

    params: dict[str, Any] = stage_params("pixel-attention", "Overrides of the pixel-attention trainer's params.")


class LabelSection(_Strict):
    """Label generation (sec. 4.3, eq. 7); also what the k-means baselines use (their method is pixel_kmeans)."""

    threshold: float | Literal["otsu"] = Field(default=0.41, description="tau: pixels with mean attention below it are 'other' "
                                                                         "(PASS ImageNet-S50: 0.41); otsu: Otsu's threshold.")
    params: dict[str, Any] = stage_params("generate-labels", "Further generate-labels params (niter, sample size, batch, ...).")


class FinetuneSection(_Strict):
    """Fine-tuning on the generated labels (sec. 4.4)."""

    params: dict[str, Any] = stage_params("finetune-segmentation", "Overrides of the finetune-segmentation trainer's params.")


class EvaluationSection(_Strict):
    """The LUSS metrics of every model; promotion on the val split only."""

    promotion_metric: str = Field(default="luss/miou", description="Metric (fully unsupervised, on the val split) the "
                                                                   "teacher/champion aliases of luss-segmentation move on.")
    params: dict[str, Any] = stage_params("evaluate-segmentation", "Further evaluate-segmentation params (boundary ratio, batch, ...).")


class LussSection(_Strict):
    """What PASS runs on and with which hyper-parameters (paper values by default)."""

    train: str = Field(default="luss-demo/unlabeled", description="Unlabeled training images (relative: to workspace.data); "
                                                                  "only images are read.")
    val: str = Field(default="partworld-demo/val", description="Selection split (ground truth from its objects): promotion "
                                                               "reads its metrics, never the reported split's.")
    eval: str = Field(default="partworld-demo/eval", description="The reported split (the LUSS table's test column).")
    labeled: str | None = Field(default="luss-demo-few/few", description="A few labeled images (objects): the distance-matching "
                                                                         "embeddings and the semi-supervised fine-tuning; none: those protocols are off.")
    k: int = Field(default=12, ge=1, description="K, generated categories (sec. 3.2: the dataset's number of categories).")
    k_sweep: list[int] = Field(default_factory=list, description="Further K for the mIoU-against-K plot (labels and k-means "
                                                                 "baselines at each, scored on the eval split).")
    represent: RepresentSection = Field(default_factory=RepresentSection, description="sec. 4.2.")
    pixel_attention: AttentionSection = Field(default_factory=AttentionSection, description="sec. 4.3, eq. 6.")
    generate_labels: LabelSection = Field(default_factory=LabelSection, description="sec. 4.3, eq. 7.")
    finetune: FinetuneSection = Field(default_factory=FinetuneSection, description="sec. 4.4.")
    evaluation: EvaluationSection = Field(default_factory=EvaluationSection, description="sec. 3.2 and promotion.")
    baselines: list[Baseline] = Field(default_factory=lambda: ["kmeans_random", "kmeans_pretrained"],
                                      description="k-means at the same K on the raw features of the same backbone: randomly "
                                                  "initialised (kmeans_random) and as represent trained it (kmeans_pretrained).")
    protocols: list[Protocol] = Field(default_factory=lambda: ["distance_matching", "semi_supervised"],
                                      description="Protocols beside the fully unsupervised one (need luss.labeled): "
                                                  "distance_matching of the representation (and of the random init), "
                                                  "semi_supervised fine-tuning on the labeled images.")

    @model_validator(mode="after")
    def _consistent(self) -> "LussSection":
        if self.protocols and not self.labeled:
            raise ValueError(f"protocols {self.protocols} need luss.labeled (a few labeled images)")
        for name, values in (("baselines", self.baselines), ("protocols", self.protocols), ("k_sweep", self.k_sweep)):
            if len(set(values)) != len(values):
                raise ValueError(f"{name} names a value twice: {values}")
        if self.k in self.k_sweep:
            raise ValueError(f"k_sweep repeats k={self.k} (the main K is always in the plot)")
        if any(v < 1 for v in self.k_sweep):
            raise ValueError(f"k_sweep values must be >= 1, got {self.k_sweep}")
        return self


class LussConfig(PipelineConfig):
    """Pipeline config with a ``luss`` section."""

    pipeline: str = Field(default="luss", description="Pipeline name: selects the typed section and the stage builder.")
    luss: LussSection = Field(default_factory=LussSection, description="The method's settings.")

    def reported_splits(self) -> list[str]:
        return [self.luss.eval]

    def stage_specs(self, run: str) -> list[StageSpec]:
        from pipelines.luss.graph import build_stages

        return build_stages(self, run)

    def report(self, result: Any, lineage: Any) -> str:
        """The LUSS table (printed, logged to the parent MLflow run), the mIoU-against-K plot and the label statistics."""
        from pipelines.luss.report import write_report

        return write_report(self, result, lineage)


PIPELINES["luss"] = LussConfig
