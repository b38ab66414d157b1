"""Suite-wide: the CI gate on skipped and deselected tests.

Tests marked ``gpu`` are the only ones CI may leave out. Every other test that is skipped (by a
marker, ``pytest.skip`` in the test or a fixture, ``importorskip``, a module-level skip) or xfailed,
and every test deselected (``-k``, ``-m``, ``--deselect``), is listed at the end of the run with
the reason; with ``CI`` set (``.ci/run`` sets ``CI=true``) the run then fails. ``.ci/run`` checks
the JUnit XML independently as a second line of defence.
"""
from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

# pytest (prepend import mode) puts this folder on sys.path, where tests/pipelines and tests/trainers would
# shadow the real packages as namespace packages whenever the repository root is not on sys.path too (the
# `pytest` script, run from anywhere). Import the real packages first; sys.modules keeps them.
_HERE = Path(__file__).resolve().parent
_saved_path = sys.path[:]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
try:
    for _name in ("contract", "pipelines", "trainers"):
        if _name in sys.modules and getattr(sys.modules[_name], "__file__", None) is None:
            del sys.modules[_name]  # a namespace package picked up from this folder
        importlib.import_module(_name)
finally:
    sys.path[:] = _saved_path

ALLOWED_MARKER = "gpu"
DESELECTED_SHOWN_OUTSIDE_CI = 10


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


@dataclass(frozen=True)
class LeftOut:
    nodeid: str
    what: str  # skipped | xfailed | xpassed | deselected | skipped at collection
    reason: str
    allowed: bool


class CIGate:
    """Records what did not run; lists it at the end; in CI, fails the session for anything not marked gpu."""

    def __init__(self) -> None:
        self.left_out: list[LeftOut] = []
        self.gpu_nodeids: set[str] = set()

    @property
    def forbidden(self) -> list[LeftOut]:
        return [x for x in self.left_out if not x.allowed]

    def pytest_itemcollected(self, item) -> None:
        if item.get_closest_marker(ALLOWED_MARKER):
            self.gpu_nodeids.add(item.nodeid)

    def pytest_deselected(self, items) -> None:
        for item in items:
            gpu = item.get_closest_marker(ALLOWED_MARKER) is not None
            self.left_out.append(LeftOut(item.nodeid, "deselected", "deselected (-k/-m/--deselect)", gpu))

    def pytest_collectreport(self, report) -> None:
        if report.skipped:  # a module or class skipped while being collected: its tests never ran
            self.left_out.append(LeftOut(report.nodeid or ".", "skipped at collection", _reason(report), False))

    def pytest_runtest_logreport(self, report) -> None:
        xfail = hasattr(report, "wasxfail")
        if report.skipped:
            what = "xfailed" if xfail else "skipped"
        elif xfail and report.when == "call":
            what = "xpassed"
        else:
            return
        reason = report.wasxfail if xfail else _reason(report)
        self.left_out.append(LeftOut(report.nodeid, what, reason or "(no reason given)", report.nodeid in self.gpu_nodeids))

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session) -> None:
        if in_ci() and self.forbidden and session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter) -> None:
        if not self.left_out:
            return
        tr = terminalreporter
        tr.section("tests not run (only tests marked gpu may be left out in CI)")
        deselected = [x for x in self.left_out if x.what == "deselected"]
        shown = self.left_out
        if not in_ci() and len(deselected) > DESELECTED_SHOWN_OUTSIDE_CI:  # a local `-k` run: keep the listing short
            shown = [x for x in self.left_out if x.what != "deselected"] + deselected[:DESELECTED_SHOWN_OUTSIDE_CI]
        for x in shown:
            tag = f"allowed: {ALLOWED_MARKER}" if x.allowed else "NOT ALLOWED"
            tr.line(f"{x.what.upper()} [{tag}] {x.nodeid}: {x.reason}")
        if len(shown) < len(self.left_out):
            tr.line(f"... and {len(self.left_out) - len(shown)} more deselected (all are listed when CI is set)")
        bad = self.forbidden
        if bad and in_ci():
            tr.line(f"CI gate: FAILED -- {len(bad)} test(s) not marked gpu were skipped, xfailed or deselected", red=True)
        elif bad:
            tr.line(f"CI gate: {len(bad)} test(s) not marked gpu did not run; with CI=true this run would fail", yellow=True)
        else:
            tr.line("CI gate: only gpu tests were left out", green=True)


def _reason(report) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:  # (path, lineno, "Skipped: reason")
        path, lineno, msg = longrepr
        try:
            path = Path(path).resolve().relative_to(Path.cwd())
        except ValueError:
            pass
        return f"{msg.removeprefix('Skipped: ')} ({path}:{lineno})"
    return str(longrepr) if longrepr else ""


def pytest_configure(config) -> None:
    if not config.pluginmanager.has_plugin("selftrain-ci-gate"):
        config.pluginmanager.register(CIGate(), "selftrain-ci-gate")
