"""Issue 16 item 7: every ``selftrain data`` command takes absolute and relative paths, inside or outside the project.

Tried as a new user would: a project made by ``selftrain data generate``, then datasets written to, read from and
checked out into a scratch directory beside it (``../scratch``, and the same by absolute path). A checkout reproduces
the version byte for byte wherever it lands; a path DVC cannot use is an error (exit 2, no traceback) that says
what to do, and nothing is left behind in the project's git index or work tree.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "pipelines"))
from test_cli_data import SMALL, digest, selftrain  # noqa: E402


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A fresh project: git + DVC with a local remote, the small PartWorld versioned as data.dvc and pushed."""
    root = tmp_path_factory.mktemp("paths") / "project"
    root.mkdir()
    (root / "small.yaml").write_text(yaml.safe_dump(SMALL))
    selftrain(root, "data", "generate", "-c", "small.yaml", "--shard-size", "10")
    return root


def md5_of(project: Path) -> str:
    return yaml.safe_load((project / "data.dvc").read_text())["outs"][0]["md5"]


def git_state(project: Path) -> str:
    return subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=project,
                          capture_output=True, text=True, check=True).stdout


def fails_saying(proc: subprocess.CompletedProcess, *words: str) -> str:
    msg = " ".join(proc.stderr.split())
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    for w in words:
        assert w in msg, f"{w!r} not in: {msg}"
    return msg


def test_checkout_anywhere_reproduces_the_version_byte_for_byte(project: Path) -> None:
    want, before = digest(project / "data"), git_state(project)
    scratch = project.parent / "scratch"
    (project / "sub").mkdir()
    shutil.rmtree(project / ".dvc" / "cache")  # the first checkout comes from the remote
    cases = {
        scratch / "abs": (project, str(scratch / "abs")),  # outside the project, absolute
        scratch / "rel": (project, "../scratch/rel"),  # outside, relative
        scratch / "from-sub": (project / "sub", "../../scratch/from-sub"),  # from a subdirectory of the project
        project / "data" / "again": (project, "data/again"),  # inside a directory DVC tracks as a whole
    }
    for out, (cwd, arg) in cases.items():
        proc = selftrain(cwd, "data", "checkout", md5_of(project), "-o", arg)
        assert f"-> {arg} (" in " ".join(proc.stdout.split())
        assert digest(out) == want, out
    shutil.rmtree(project / "data" / "again")
    (project / "sub").rmdir()
    assert git_state(project) == before  # nothing staged, nothing left (the temporary pull folder is gone)
    assert not list(project.glob(".selftrain-checkout-*"))


def test_every_data_command_takes_relative_and_absolute_paths_outside_the_project(project: Path) -> None:
    scratch = project.parent / "elsewhere"
    imgs = scratch / "imgs"
    imgs.mkdir(parents=True)
    for i in range(3):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(imgs / f"{i}.png")
    selftrain(project, "data", "generate", "-c", "small.yaml", "--no-version", "--shard-size", "10", "-o", "../elsewhere/pw")
    ev = str(scratch / "pw" / "eval")
    assert "ok:" in selftrain(project, "data", "verify", ev).stdout
    assert selftrain(project, "data", "hash", "../elsewhere/pw/eval").stdout.strip().endswith(".dir")
    selftrain(project, "data", "show", "../elsewhere/pw/eval", "-o", str(scratch / "sheet.png"), "-n", "2")
    selftrain(project, "data", "export", ev, "-o", "../elsewhere/parts.json", "--kind", "parts")
    selftrain(project, "data", "split", "../elsewhere/pw/train", "-f", "a=0.5,b=0.5", "-o", str(scratch / "sp"))
    selftrain(project, "data", "import", "folder", "../elsewhere/imgs", "-o", str(scratch / "imported"))
    assert (scratch / "sheet.png").stat().st_size > 0 and (scratch / "parts.json").stat().st_size > 0
    assert (scratch / "sp" / "b" / "index.json").exists() and (scratch / "imported" / "index.json").exists()

    # a second project beside the first: version, push, pull its dataset by path from the first project's cwd
    other = project.parent / "other"
    shutil.copytree(scratch / "pw", other / "data" / "pw")
    selftrain(other, "data", "version", "data/pw")  # makes `other` a git + DVC repository with a local remote
    v = yaml.safe_load((other / "data" / "pw.dvc").read_text())["outs"][0]["md5"]
    selftrain(project, "data", "push", "../other/data/pw")
    want = digest(other / "data" / "pw")
    shutil.rmtree(other / "data" / "pw")
    shutil.rmtree(other / ".dvc" / "cache")
    selftrain(project, "data", "pull", str(other / "data" / "pw"))
    assert digest(other / "data" / "pw") == want
    selftrain(other, "data", "checkout", v, "-o", str(scratch / "pw-again"))
    assert digest(scratch / "pw-again") == want


def test_a_path_dvc_cannot_use_is_an_error_that_says_what_to_do(project: Path) -> None:
    outside = project.parent / "scratch-bad"
    outside.mkdir()
    before = git_state(project)
    fails_saying(selftrain(project, "data", "generate", "-c", "small.yaml", "-o", str(outside / "gen"), ok=False),
                 str(outside / "gen"), "outside the DVC repository", "move or copy it under", "git init && dvc init")
    assert not (outside / "gen").exists()  # refused before anything was generated
    shutil.copytree(project / "data" / "partworld-demo" / "eval", outside / "ds")
    fails_saying(selftrain(project, "data", "version", "../scratch-bad/ds", ok=False),
                 str(outside / "ds"), "outside the DVC repository", f"e.g. {project / 'data' / 'ds'}")
    fails_saying(selftrain(project, "data", "version", "data/partworld-demo/train", ok=False),
                 "which data.dvc tracks as a whole", f"version {project / 'data'} instead")
    fails_saying(selftrain(project, "data", "push", "../scratch-bad/ds", ok=False),
                 "not inside a DVC repository", "cd <project>")
    fails_saying(selftrain(project, "data", "checkout", md5_of(project), "-o", ".dvc/co", ok=False),
                 "the repository's own metadata")
    fails_saying(selftrain(outside, "data", "checkout", md5_of(project), "-o", "co", ok=False),
                 "not inside a DVC repository", "run the checkout inside the project")
    fails_saying(selftrain(project, "data", "checkout", md5_of(project), "-o", "../scratch-bad/ds", ok=False),
                 "already exists")
    assert git_state(project) == before and not (outside / "co").exists() and not (project / ".dvc" / "co").exists()
