"""The dense-representation pipeline: SlotCon and Leopart (and any registered representation, e.g. PASS's) trained on
the same images and compared on one evaluation, each against its backbone at random initialisation. Choices:
docs/dense.md.
"""
from pipelines.dense.config import LEOPART_MODEL, SLOTCON_MODEL, DenseConfig  # noqa: F401  (registers the pipeline)
