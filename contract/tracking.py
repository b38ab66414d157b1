"""Tracking settings both planes read (torch-free): how long an MLflow outage may last (docs/faults.md)."""
from __future__ import annotations

import os

OUTAGE_ENV = "SELFTRAIN_MLFLOW_OUTAGE_SECONDS"
DEFAULT_OUTAGE_SECONDS = 600.0


def outage_limit() -> float:
    """Seconds an MLflow outage may last before a stage or the driver gives up (``SELFTRAIN_MLFLOW_OUTAGE_SECONDS``,
    default 600); ValueError naming the variable for a value that is not a positive number."""
    raw = os.environ.get(OUTAGE_ENV, "")
    try:
        value = float(raw) if raw else DEFAULT_OUTAGE_SECONDS
    except ValueError:
        raise ValueError(f"{OUTAGE_ENV}={raw!r}: expected a number of seconds") from None
    if not value > 0:
        raise ValueError(f"{OUTAGE_ENV}={raw!r}: expected a positive number of seconds")
    return value
