"""The plane boundary at run time and in the import graph.

`pipelines` (control plane) and `contract` never load torch or the other training libraries, not even
through `trainers.data` or a third-party package; `selftrain data ...` runs without them. The static
check is `lint-imports` (contracts in pyproject.toml, run by `make lint`); the last test shows that it
fails on a violation.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
FORBIDDEN = ("torch", "deepspeed", "timm", "webdataset", "torchvision")
SMALL = {"image_size": 48, "num_classes": 3, "num_part_types": 6, "train_images": 6, "eval_images": 4}


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "PYTEST_ADDOPTS"}


def test_importing_every_pipelines_and_contract_module_loads_no_torch():
    code = textwrap.dedent(f"""
        import importlib, json, pkgutil, sys
        import contract, pipelines
        names = []
        for pkg in (pipelines, contract):
            names.append(pkg.__name__)
            names += [m.name for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + ".")]
        for name in names:
            importlib.import_module(name)
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in {FORBIDDEN!r})
        print(json.dumps({{"modules": names, "forbidden": loaded}}))
    """)
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert {"pipelines.cli", "pipelines.data", "pipelines.runner", "contract.spec"} <= set(out["modules"])
    assert out["forbidden"] == []


def _imported_modules(stderr: str) -> set[str]:
    """Module names from `python -X importtime` output."""
    return {line.rsplit("|", 1)[1].strip() for line in stderr.splitlines() if line.startswith("import time:") and "|" in line}


def _selftrain(cwd: Path, *args: str) -> set[str]:
    """Run the real `selftrain` CLI under -X importtime; return every module it imported."""
    p = subprocess.run([sys.executable, "-X", "importtime", "-m", "pipelines.cli", *args], cwd=cwd, env=_env(),
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, f"selftrain {' '.join(args)}:\n{p.stdout}\n{p.stderr[-3000:]}"
    modules = _imported_modules(p.stderr)
    assert "pipelines" in modules  # -m pipelines.cli: the package is imported, the CLI module runs as __main__
    return modules


def test_selftrain_data_commands_never_import_torch(tmp_path):
    (tmp_path / "small.yaml").write_text(yaml.safe_dump(SMALL))
    images = tmp_path / "imgs"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(images / f"im{i}.png")

    runs = {
        "generate": _selftrain(tmp_path, "data", "generate", "-c", "small.yaml", "--no-version", "-o", "ds"),
        "verify": _selftrain(tmp_path, "data", "verify", "ds/eval"),
        "show": _selftrain(tmp_path, "data", "show", "ds/eval", "-o", "sheet.png", "-n", "2"),
        "export": _selftrain(tmp_path, "data", "export", "ds/eval", "-o", "parts.json", "--kind", "parts"),
        "import folder": _selftrain(tmp_path, "data", "import", "folder", "imgs", "-o", "unlabelled"),
    }
    assert (tmp_path / "ds" / "eval" / "index.json").exists() and (tmp_path / "unlabelled" / "index.json").exists()
    assert "trainers.data.shards" in runs["generate"]  # the data plane's shard writer did run in-process
    leaked = {cmd: sorted({m.split(".")[0] for m in mods} & set(FORBIDDEN)) for cmd, mods in runs.items()}
    assert leaked == {cmd: [] for cmd in runs}


def _lint_imports(root: Path) -> subprocess.CompletedProcess:
    exe = shutil.which("lint-imports", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    assert exe, "lint-imports missing (the dev extra installs import-linter)"
    env = {**_env(), "PYTHONPATH": str(root)}
    return subprocess.run([exe, "--no-logo", "--no-cache"], cwd=root, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture
def tree_copy(tmp_path) -> Path:
    """The three packages and pyproject.toml (the contracts), copied so that they can be broken on purpose."""
    root = tmp_path / "tree"
    for pkg in ("contract", "pipelines", "trainers"):
        shutil.copytree(REPO / pkg, root / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", root / "pyproject.toml")
    return root


def test_lint_imports_fails_naming_the_contract_when_trainers_imports_pipelines(tree_copy):
    ok = _lint_imports(tree_copy)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    with open(tree_copy / "trainers" / "checkpoint.py", "a") as f:
        f.write("\nimport pipelines.cli  # deliberate violation\n")
    p = _lint_imports(tree_copy)
    out = p.stdout + p.stderr
    assert p.returncode != 0, out
    assert "trainers (data plane) never imports pipelines (control plane) BROKEN" in out
    assert "trainers.checkpoint -> pipelines.cli" in out


def test_lint_imports_fails_when_pipelines_reaches_torch_through_a_chain(tree_copy):
    with open(tree_copy / "trainers" / "data" / "shards.py", "a") as f:
        f.write("\n\ndef _violation():\n    import torch  # deliberate violation\n    return torch\n")
    p = _lint_imports(tree_copy)
    out = p.stdout + p.stderr
    assert p.returncode != 0, out
    assert "directly or through a chain BROKEN" in out and "trainers.data.shards -> torch" in out


def test_lint_imports_fails_when_a_stage_imports_another_stage(tree_copy):
    with open(tree_copy / "trainers" / "stages" / "train_ranker.py", "a") as f:
        f.write("\nimport trainers.stages.mine_parts  # deliberate violation\n")
    p = _lint_imports(tree_copy)
    out = p.stdout + p.stderr
    assert p.returncode != 0, out
    assert "no stage module imports another stage module BROKEN" in out
    assert "trainers.stages.train_ranker -> trainers.stages.mine_parts" in out
