"""The CI gate (tests/conftest.py): with CI set, a skipped, xfailed or deselected test not marked gpu fails the run.

Each case runs pytest in a subprocess on a throwaway test folder that uses this suite's conftest.py.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

CONFTEST = Path(__file__).resolve().parent / "conftest.py"

INI = """\
[pytest]
addopts = -ra --strict-markers -p no:cacheprovider
markers =
    gpu: needs a CUDA device
"""

MIXED = '''\
import pytest


def test_runs():
    pass


def test_skips_in_the_test():
    pytest.skip("no frobnicator here")


@pytest.mark.skipif(True, reason="skipped by a marker")
def test_skipif_marker():
    pass


@pytest.fixture
def frobnicator():
    pytest.skip("fixture could not start the frobnicator")


def test_skips_in_a_fixture(frobnicator):
    pass


@pytest.mark.xfail(reason="known bug 123")
def test_expected_failure():
    assert False


@pytest.mark.gpu
def test_on_gpu():
    pytest.skip("needs a CUDA device")
'''

ONLY_GPU = '''\
import pytest


def test_runs():
    pass


@pytest.mark.gpu
@pytest.mark.skipif(True, reason="needs a CUDA device")
def test_on_gpu():
    pass
'''


def run_pytest(tmp_path: Path, files: dict[str, str], *args: str, ci: bool = True) -> subprocess.CompletedProcess:
    root = tmp_path / "suite"
    root.mkdir(parents=True)
    shutil.copy(CONFTEST, root / "conftest.py")
    (root / "pytest.ini").write_text(INI)
    for name, text in files.items():
        (root / name).write_text(textwrap.dedent(text))
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "PYTEST_ADDOPTS")}  # the outer run's --junitxml stays ours
    if ci:
        env["CI"] = "true"
    return subprocess.run([sys.executable, "-m", "pytest", *args], cwd=root, env=env, capture_output=True, text=True,
                          timeout=300)


def test_in_ci_any_skip_not_marked_gpu_fails_the_run_and_is_listed_with_its_reason(tmp_path):
    p = run_pytest(tmp_path, {"test_mixed.py": MIXED})
    out = p.stdout + p.stderr
    assert p.returncode == pytest.ExitCode.TESTS_FAILED, out
    assert "tests not run (only tests marked gpu may be left out in CI)" in out
    for line in ("SKIPPED [NOT ALLOWED] test_mixed.py::test_skips_in_the_test: no frobnicator here",
                 "SKIPPED [NOT ALLOWED] test_mixed.py::test_skipif_marker: skipped by a marker",
                 "SKIPPED [NOT ALLOWED] test_mixed.py::test_skips_in_a_fixture: fixture could not start the frobnicator",
                 "XFAILED [NOT ALLOWED] test_mixed.py::test_expected_failure: known bug 123",
                 "SKIPPED [allowed: gpu] test_mixed.py::test_on_gpu: needs a CUDA device",
                 "CI gate: FAILED -- 4 test(s) not marked gpu were skipped, xfailed or deselected"):
        assert line in out, out
    assert "test_runs" not in out.split("tests not run")[1]


def test_in_ci_a_skipped_gpu_test_is_allowed(tmp_path):
    p = run_pytest(tmp_path, {"test_gpu.py": ONLY_GPU})
    out = p.stdout + p.stderr
    assert p.returncode == 0, out
    assert "SKIPPED [allowed: gpu] test_gpu.py::test_on_gpu: needs a CUDA device" in out
    assert "CI gate: only gpu tests were left out" in out


def test_in_ci_deselecting_gpu_tests_is_allowed_but_deselecting_others_fails(tmp_path):
    p = run_pytest(tmp_path, {"test_gpu.py": ONLY_GPU}, "-m", "not gpu")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "DESELECTED [allowed: gpu] test_gpu.py::test_on_gpu" in p.stdout

    p = run_pytest(tmp_path / "k", {"test_gpu.py": ONLY_GPU}, "-k", "on_gpu")
    out = p.stdout + p.stderr
    assert p.returncode == pytest.ExitCode.TESTS_FAILED, out
    assert "DESELECTED [NOT ALLOWED] test_gpu.py::test_runs" in out


def test_in_ci_a_module_skipped_at_collection_fails(tmp_path):
    p = run_pytest(tmp_path, {"test_ok.py": "def test_runs():\n    pass\n",
                              "test_missing.py": "import pytest\n\npytest.importorskip('no_such_module_xyz')\n\n\n"
                                                 "def test_never():\n    pass\n"})
    out = p.stdout + p.stderr
    assert p.returncode == pytest.ExitCode.TESTS_FAILED, out
    assert "SKIPPED AT COLLECTION [NOT ALLOWED] test_missing.py: could not import 'no_such_module_xyz'" in out


def test_outside_ci_skips_are_listed_but_do_not_fail(tmp_path):
    p = run_pytest(tmp_path, {"test_mixed.py": MIXED}, ci=False)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out
    assert "CI gate: 4 test(s) not marked gpu did not run; with CI=true this run would fail" in out


def test_a_real_failure_keeps_its_exit_code(tmp_path):
    p = run_pytest(tmp_path, {"test_fail.py": "import pytest\n\n\ndef test_fails():\n    assert False\n\n\n"
                                              "def test_skips():\n    pytest.skip('x')\n"})
    assert p.returncode == pytest.ExitCode.TESTS_FAILED, p.stdout + p.stderr
