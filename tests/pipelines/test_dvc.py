"""DVC versioning: real dvc + git in a temporary repository with a local directory remote."""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest

from pipelines import dvc


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def _write_dataset(d: Path, seed: int) -> None:
    d.mkdir(parents=True, exist_ok=True)
    rnd = os.urandom if seed < 0 else (lambda n: hashlib.sha256(str(seed).encode()).digest() * (n // 32 + 1))
    (d / "shard-000000.tar").write_bytes(rnd(4096)[:4096])
    (d / "sub").mkdir(exist_ok=True)
    (d / "sub" / "index.json").write_text(f'{{"seed": {seed}}}')


@pytest.fixture()
def repo(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    dvc.ensure_repo(root, remote=str(tmp_path / "remote"))
    return root


def test_add_push_delete_pull_gives_identical_hashes(repo: Path) -> None:
    ds = repo / "data"
    _write_dataset(ds, seed=1)
    before = _tree_digest(ds)
    v = dvc.add(ds, repo)
    assert v.md5.endswith(".dir") and v.nfiles == 2
    assert dvc.dataset_hash(ds) == v.md5
    dvc.push([ds], repo)
    shutil.rmtree(ds)
    shutil.rmtree(repo / ".dvc" / "cache")  # force the pull to come from the remote
    dvc.pull([ds], repo)
    assert _tree_digest(ds) == before
    assert dvc.dataset_hash(ds) == v.md5


def test_checkout_older_version_by_hash_is_byte_identical(repo: Path) -> None:
    ds = repo / "data"
    _write_dataset(ds, seed=1)
    old_digest = _tree_digest(ds)
    v1 = dvc.add(ds, repo)
    dvc.push([ds], repo)
    _write_dataset(ds, seed=2)  # a new version replaces the old in the work tree
    v2 = dvc.add(ds, repo)
    assert v2.md5 != v1.md5
    shutil.rmtree(repo / ".dvc" / "cache")
    got = dvc.checkout_version(v1.md5, repo / "restore" / "v1", repo)
    assert _tree_digest(Path(got.path)) == old_digest
    assert dvc.dataset_hash(got.path) == v1.md5
    assert not (repo / "restore" / "v1.dvc").exists()  # the throw-away .dvc file is gone


def test_checkout_unknown_hash_fails_clearly_and_leaves_nothing(repo: Path) -> None:
    with pytest.raises(dvc.DvcError, match="pull"):
        dvc.checkout_version("0" * 32 + ".dir", repo / "nope", repo)
    assert not (repo / "nope").exists()


def test_version_of_untracked_directory_names_the_path(repo: Path) -> None:
    (repo / "plain").mkdir()
    with pytest.raises(dvc.DvcError, match="plain: not DVC-tracked"):
        dvc.version_of(repo / "plain")


def test_find_root_outside_a_repo_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(dvc.DvcError, match="not inside a DVC repository"):
        dvc.find_root(tmp_path)


def test_ensure_repo_again_leaves_the_config_alone_and_a_changed_remote_is_applied(repo: Path, tmp_path: Path) -> None:
    """Every pipeline run calls ensure_repo: unchanged, .dvc/config is not rewritten (no dvc ran); a new remote is."""
    config = repo / ".dvc" / "config"
    before = (config.read_bytes(), config.stat().st_mtime_ns)
    dvc.ensure_repo(repo, remote=str(tmp_path / "remote"))
    assert (config.read_bytes(), config.stat().st_mtime_ns) == before
    dvc.ensure_repo(repo, remote=str(tmp_path / "other"))
    text = config.read_text()
    assert str(tmp_path / "other") in text and "autostage = true" in text and "remote = local" in text
    assert dvc.dvc(repo, "remote", "default").strip() == "local"  # dvc itself reads what was written


def test_a_fresh_repo_gets_its_remote_as_default_with_autostage(tmp_path: Path) -> None:
    root = dvc.ensure_repo(tmp_path / "fresh")  # the default remote: .selftrain/dvc-remote, relative
    config = (root / ".dvc" / "config").read_text()
    assert "remote = local" in config and "autostage = true" in config and "../.selftrain/dvc-remote" in config
    assert dvc._configured(root, ".selftrain/dvc-remote", "local")
