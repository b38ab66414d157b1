"""``instance-teacher``: the object instance segmentation model E + D^o (PartDistillation sec. 4.1)."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from contract.stages import StageDefinition
from contract.stages.input_size import InputSizeParams
from contract.stages.training import TrainParams, merged_over

# Sized for 2 shared CPU cores: on the demo PartWorld (112 px, 12 classes, 1500 images) 400 steps of 2 ranks x 4
# images take ~5 minutes plus ~10 s of evaluation and reach mask AP ~0.22 (AP50 ~0.46).
MODEL = {
    "encoder": {"backbone": "convnext_atto", "pixel_dim": 64, "mask_dim": 64, "norm_groups": 8},
    "decoder": {"num_queries": 16, "hidden_dim": 64, "num_heads": 4, "dim_feedforward": 256, "num_layers": 3},
    # Mask2Former's weights (class 2, mask BCE 5, dice 5): the class term learns far faster than with 1/20/1
    "loss": {"num_points": 1024, "class_weight": 2.0, "mask_weight": 5.0, "dice_weight": 5.0},
    "top_k": 20,
}


class InstanceTeacherParams(TrainParams, InputSizeParams):
    """The engine's params (teacher defaults) plus the architecture, augmentation and import."""

    steps: int = Field(default=400, ge=1, description="Optimizer steps to train in total.")
    warmup_steps: int = Field(default=20, ge=0, description="Linear warm-up steps before the cosine decay.")
    model: dict[str, Any] = Field(
        default_factory=lambda: merged_over(MODEL)({}),
        description="The teacher's SegmenterConfig (trainers.models.config); a given dict is deep-merged over this default, "
                    "and decoder.num_classes is always the train index's number of categories. encoder.pretrained "
                    "('timm', a URL or a file) initialises the backbone (the paper imports a Detic-trained Mask2Former, sec. 4.1).")
    flip_prob: float = Field(default=0.5, ge=0, le=1, description="Horizontal flip probability (augmentation).")
    eval_batch_size: int = Field(default=16, ge=1, description="Images per inference batch of the mask-AP evaluation.")
    encoder: str | None = Field(
        default=None,
        description="Pretrained encoder backbone (issue 14: the pipelines start from a learned representation): "
                    "models:/<name>@<alias> or models:/<name>/<version> (e.g. models:/dense-slotcon@champion), a local file "
                    "or http(s) URL (a representation file, whose timm_name becomes model.encoder.backbone, or a timm-format "
                    "state_dict), 'timm' (timm's hub weights of model.encoder.backbone) or 'timm:<name>' (the hub weights of "
                    "<name>, which becomes the backbone). A stage:<name> reference goes in the model input encoder.")
    import_from: str | None = Field(
        default=None,
        description="A segmenter file to use instead of training: local path, models:/<name>@<alias> or http(s) URL "
                    "(also accepted as the model input import_from).")

    class_agnostic: bool = Field(
        default=False,
        description="alpha(.) of CaSP eq. 1: every object class maps to one class-free 'object' (decoder.num_classes 1).")
    targets: Literal["objects", "pseudo_labels", "joint"] = Field(
        default="objects",
        description="objects: the records' ground truth; pseudo_labels: the records' proposals of a detect-pseudo-label "
                    "dataset, and a record with ground-truth objects is an error (CaSP late pretraining, eq. 4); joint: "
                    "each record's ground truth when it has any, else its pseudo-labels (a join-datasets output: joint "
                    "self-training, CaSP Table 6).")
    entities: bool = Field(
        default=False,
        description="CaSP sec. 3.3 (entities): with class_agnostic, every thing (objects) and every stuff region (the "
                    "records' stuff, categories isthing 0) is one class-free entity; targets objects needs a train set "
                    "with stuff categories, targets pseudo_labels reads entity pseudo-labels. The model file is marked "
                    "an entity detector (detect-pseudo-label checks it).")
    head_init: Literal["random", "agnostic"] = Field(
        default="random",
        description="With model input init whose class count differs: the class head keeps its random init, or every "
                    "class channel starts from the init model's class-agnostic channel (CaSP sec. 3.2).")
    init_parts: list[Literal["backbone", "neck", "head"]] = Field(
        default=["backbone", "neck", "head"], min_length=1,
        description="With model input init: the parts whose weights come from it (CaSP Table 10): backbone, neck (the "
                    "pixel decoder), head (the transformer decoder, queries and mask embedding); a part left out keeps "
                    "its random init. The classifier follows head_init.")

    _merge_model = field_validator("model", mode="before")(lambda cls, v: merged_over(MODEL)(v))

    @model_validator(mode="after")
    def _entities_are_class_free(self) -> "InstanceTeacherParams":
        if self.entities and not self.class_agnostic:
            raise ValueError("entities: true needs class_agnostic: true (an entity has no class, CaSP sec. 3.3)")
        if self.entities and self.targets == "joint":
            raise ValueError("entities: true trains on targets objects or pseudo_labels, not joint")
        return self


DEFINITION = StageDefinition(
    name="instance-teacher",
    summary="Object instance segmentation teacher E + D^o, trained or imported, evaluated by COCO mask AP (PartDistillation sec. 4.1).",
    kind="train",
    params=InstanceTeacherParams,
    entry="trainers.stages.instance_teacher:run",
    datasets={"train": "Shards with object labels to train on (not read when the teacher is imported).",
              "eval": "Shards whose objects the teacher is evaluated on (COCOeval segm)."},
    models={"import_from": "A segmenter file to import instead of training (as params.import_from).",
            "init": "A segmenter whose weights the training starts from (same architecture; the class head: head_init).",
            "encoder": "A representation model (e.g. stage:slotcon, models:/dense-leopart@champion) whose backbone "
                       "initialises the encoder (as params.encoder)."},
    optional=frozenset({"train", "eval", "import_from", "init", "encoder"}),
    output_model=True,
)
