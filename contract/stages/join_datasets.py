"""``join-datasets``: two datasets of the same categories as one (CaSP's joint self-training baseline: D^t + D^p)."""
from __future__ import annotations

from pydantic import Field

from contract.stages import Params, StageDefinition


class JoinDatasetsParams(Params):
    """Every sample of ``images`` and of ``extra``, records unchanged; keys must not repeat."""

    shard_size: int = Field(default=1000, ge=1, description="Samples per output shard.")
    batch_size: int = Field(default=64, ge=1, description="Samples read per batch (copying only; no model runs).")


DEFINITION = StageDefinition(
    name="join-datasets",
    summary="The samples of two datasets with the same categories as one dataset, records unchanged (the labeled split "
            "plus a pseudo-label set for joint self-training, CaSP Table 6).",
    kind="label",
    params=JoinDatasetsParams,
    entry="trainers.stages.join_datasets:run",
    datasets={"images": "The first dataset (e.g. the labeled split, ground-truth objects).",
              "extra": "The second dataset (e.g. a detect-pseudo-label output); its categories must equal the first's."},
    output_dataset=True,
)
