"""The image's Python dependency set, resolved by pip for the image's Python and platform (not this machine's).

The set is what the Dockerfile's dependency layer installs: pyproject's [project] dependencies with
faiss-cpu swapped for ARG FAISS, under ``-c constraints.txt``. The target Python and glibc come from the
Dockerfile's ``resolve-python=X resolve-glibc=Y`` comment. Two pins have no wheel on the index (deepspeed,
antlr4-python3-runtime: sdists), so they are built here once (``pip wheel --no-deps``, cached) and offered
with --find-links; everything else must be a wheel for the target platform (--only-binary=:all:).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
CACHE = Path(os.environ.get("SELFTRAIN_CACHE", Path.home() / ".cache" / "selftrain"))
SDIST_ONLY = ("deepspeed", "antlr4-python3-runtime")


def dockerfile_arg(name: str, dockerfile: Path = REPO / "Dockerfile") -> str:
    m = re.search(rf"^ARG {name}=(\S+)$", dockerfile.read_text(), re.M)
    assert m, f"no ARG {name}= in {dockerfile}"
    return m.group(1)


def image_target(dockerfile: Path = REPO / "Dockerfile") -> tuple[str, str]:
    m = re.search(r"resolve-python=(\d+\.\d+) resolve-glibc=(\d+\.\d+)", dockerfile.read_text())
    assert m, "the Dockerfile names no resolve-python=X resolve-glibc=Y"
    return m.group(1), m.group(2)


def requirements(faiss: str) -> list[str]:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    return [d for d in deps if re.split(r"[<>=!~; \[]", d)[0] != "faiss-cpu"] + [faiss]


def constraint(name: str, constraints: Path) -> str:
    return next(line.strip() for line in constraints.read_text().splitlines() if line.lower().startswith(f"{name}=="))


def sdist_wheels(constraints: Path) -> Path:
    out = CACHE / "resolve-wheels"
    out.mkdir(parents=True, exist_ok=True)
    for name in SDIST_ONLY:
        pin = constraint(name, constraints)
        stem = pin.replace("-", "_").replace("==", "-")
        if not list(out.glob(f"{stem}-*.whl")):
            subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), pin],
                           check=True, capture_output=True, text=True, timeout=900)
    return out


def platforms(glibc: str) -> list[str]:
    major, minor = map(int, glibc.split("."))
    tags = [f"manylinux_{major}_{m}_x86_64" for m in range(17, minor + 1)]
    return ["manylinux2014_x86_64", *tags]


def resolve(reqs: list[str], constraints: Path, python: str, glibc: str, workdir: Path) -> tuple[subprocess.CompletedProcess, dict | None]:
    """pip install --dry-run of ``reqs`` for (python, glibc, x86_64); the completed process and pip's report."""
    req = workdir / "requirements.txt"
    req.write_text("\n".join(reqs) + "\n")
    report = workdir / "report.json"
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
           "--target", str(workdir / "target"), "--python-version", python, "--implementation", "cp",
           "--only-binary=:all:", "--find-links", str(sdist_wheels(constraints)),
           "--cache-dir", str(CACHE / "pip"), "--report", str(report), "-c", str(constraints), "-r", str(req)]
    for p in platforms(glibc):
        cmd += ["--platform", p]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    return proc, (json.loads(report.read_text()) if proc.returncode == 0 and report.is_file() else None)
