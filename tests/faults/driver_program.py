"""The pipeline driver of the driver-kill trials: ``selftrain run`` itself, with the stand-in stages registered.

Run as ``python driver_program.py run <config> --run <name>``; the environment names the stand-in trainer
(``SELFTRAIN_TRAINER_COMMAND``: tests/pipelines/rank_program.py with ``WRITE_RESULT=1``), which every stage job the
real local executor starts inherits, so the real runner, stage jobs, MLflow and DVC do everything but train.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "pipelines"))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import stand_in_stages  # noqa: E402

from pipelines.cli import app  # noqa: E402

stand_in_stages.register()
app(sys.argv[1:], prog_name="selftrain")
