"""The image's dependency set resolves with pip's resolver for the image's Python and platform (the
review found the old faiss GPU pin ResolutionImpossible against constraints.txt); and the check can fail:
a deliberately conflicting pin, and the old pin, are both rejected."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "image"))
from resolve import REPO, constraint, dockerfile_arg, image_target, requirements, resolve  # noqa: E402

pytestmark = pytest.mark.slow
CONSTRAINTS = REPO / "constraints.txt"


def test_the_image_dependency_set_resolves_for_the_image_python_and_platform(tmp_path):
    python, glibc = image_target()
    faiss = dockerfile_arg("FAISS")
    proc, report = resolve(requirements(faiss), CONSTRAINTS, python, glibc, tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    got = {i["metadata"]["name"].lower(): i["metadata"]["version"] for i in report["install"]}
    name, version = faiss.split("==")
    assert got[name] == version and "faiss-cpu" not in got
    for pinned in ("torch", "nvidia-cuda-runtime", "nvidia-cublas", "nvidia-nvjitlink", "nvidia-nccl-cu13", "numpy"):
        assert f"{pinned}=={got[pinned]}".lower() == constraint(pinned, CONSTRAINTS).lower(), pinned
    for info in report["install"]:  # every wheel fits the image: CPython <= target, glibc <= target
        url = info["download_info"]["url"]
        assert "cp312" not in url and "cp313" not in url, url


def test_a_deliberately_conflicting_pin_fails_to_resolve(tmp_path):
    python, glibc = image_target()
    bad = tmp_path / "constraints.txt"
    # faiss-gpu-cuvs needs nvidia-cuda-runtime>=13.2; pin an older one
    bad.write_text(CONSTRAINTS.read_text().replace(constraint("nvidia-cuda-runtime", CONSTRAINTS), "nvidia-cuda-runtime==13.0.48"))
    proc, report = resolve(requirements(dockerfile_arg("FAISS")), bad, python, glibc, tmp_path)
    assert proc.returncode != 0 and report is None
    assert "ResolutionImpossible" in proc.stderr and "conflicting dependencies" in proc.stderr, proc.stderr[-3000:]


def test_the_old_faiss_pin_is_rejected_as_the_review_found(tmp_path):
    """faiss-gpu-cu13-cuvs 1.15.0 pins cuda-toolkit 13.0.0 (constraints: 13.2.2) and needs CPython 3.12, glibc 2.39."""
    proc, _ = resolve(requirements("faiss-gpu-cu13-cuvs==1.15.0"), CONSTRAINTS, "3.12", "2.39", tmp_path)
    assert proc.returncode != 0 and "ResolutionImpossible" in proc.stderr, proc.stderr[-3000:]
    proc, _ = resolve(requirements("faiss-gpu-cu13-cuvs==1.15.0"), CONSTRAINTS, *image_target(), tmp_path)
    assert proc.returncode != 0
