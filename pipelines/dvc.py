"""Dataset versions with DVC: every dataset a stage reads or writes is a DVC-tracked directory.

Thin wrappers over the real ``dvc`` command (run as ``python -m dvc`` from this interpreter) so a
failure shows DVC's own message. A version is the DVC md5 of the directory (``<md5>.dir``); any
version can be checked out again by that hash alone, from the cache or the remote.
"""
from __future__ import annotations

import errno
import fcntl
import os
import shutil
import subprocess
import sys
import tempfile
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import yaml

DEFAULT_REMOTE = "local"


class DvcError(RuntimeError):
    """A DVC or git command failed; the message carries the command and its output."""


@dataclass(frozen=True)
class DataVersion:
    """A DVC-tracked directory and its version hash."""

    path: str
    md5: str  # "<md5>.dir"
    dvc_file: str
    nfiles: int
    size: int


def _run(args: list[str], cwd: Path, what: str) -> str:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "GIT_TERMINAL_PROMPT": "0"}
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        out = (proc.stderr.strip() or proc.stdout.strip())[-2000:]
        raise DvcError(f"{what} failed in {cwd} (exit {proc.returncode}): {' '.join(args[2:] if args[:2] == [sys.executable, '-m'] else args)}\n{out}")
    return proc.stdout


def dvc(root: str | Path, *args: str) -> str:
    """Run ``dvc <args>`` in ``root``."""
    return _run([sys.executable, "-m", "dvc", *args], Path(root), f"dvc {args[0] if args else ''}")


def git(root: str | Path, *args: str) -> str:
    return _run(["git", *args], Path(root), f"git {args[0] if args else ''}")


def find_root(path: str | Path) -> Path:
    """The DVC repository (a directory holding ``.dvc/``) containing ``path`` (absolute or relative to the cwd)."""
    p = Path(path).resolve()
    for d in [p, *p.parents]:
        if (d / ".dvc").is_dir():
            return d
    raise DvcError(f"{path}: not inside a DVC repository; run the command inside the project that tracks it "
                   f"(cd <project>), or make one here with `git init && dvc init`")


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def check_trackable(path: str | Path, root: str | Path) -> Path:
    """``path`` resolved, or a :class:`DvcError` saying what to do when DVC cannot track it in repository ``root``.

    DVC tracks only directories strictly inside its repository, outside its own and git's metadata, and not
    inside a directory it already tracks as a whole (``data/`` by ``data.dvc``).
    """
    path, root = Path(path).resolve(), Path(root).resolve()
    if path == root:
        raise DvcError(f"{path}: is the DVC repository itself; version a dataset directory inside it "
                       f"(e.g. {root / 'data' / '<name>'})")
    if not _inside(path, root):
        raise DvcError(f"{path}: outside the DVC repository {root} (DVC tracks only directories inside its "
                       f"repository): move or copy it under {root} (e.g. {root / 'data' / path.name}) and version "
                       f"that, or run the command in a project around it (`git init && dvc init` in {path.parent})")
    rel = path.relative_to(root)
    if rel.parts[0] in (".dvc", ".git"):
        raise DvcError(f"{path}: inside {root / rel.parts[0]}, the repository's own metadata; put datasets "
                       f"elsewhere in {root} (e.g. {root / 'data' / path.name})")
    for d in path.parents:
        if d == root:
            break
        if d.with_name(d.name + ".dvc").is_file():
            raise DvcError(f"{path}: inside {d}, which {d.name}.dvc tracks as a whole; version {d} instead "
                           f"(`selftrain data version {d}`), or move {path.name} out of it")
    return path


def _targets_by_root(targets: list[str | Path], root: str | Path | None) -> dict[Path, list[str]]:
    """Targets (absolute or relative to the cwd) grouped by their DVC repository, as paths relative to it.

    ``root`` given: every target must lie in it; otherwise each target's own repository is used.
    """
    groups: dict[Path, list[str]] = {}
    for t in targets:
        path = Path(t).resolve()
        r = Path(root).resolve() if root else find_root(path)
        if not _inside(path, r) or path == r:
            check_trackable(path, r)  # raises, saying what to do
        groups.setdefault(r, []).append(str(path.relative_to(r)))
    return groups


@contextmanager
def repo_lock(root: str | Path) -> Iterator[None]:
    """Exclusive lock of one repository's DVC and git state (``<root>/.git/selftrain.lock``, flock).

    Stage jobs running side by side version their datasets in the same workspace repository; DVC's
    own lock makes a second ``dvc add`` fail at once and git's index lock does the same, so every
    writing DVC command of this module waits here for its turn instead. (A repository without git
    keeps the lock in ``.dvc/tmp``; a folder that is no repository yet gets the ``.git`` folder
    that ``git init`` then fills.)
    """
    root = Path(root)
    if (root / ".dvc").is_dir() and not (root / ".git").is_dir():
        lock = root / ".dvc" / "tmp" / "selftrain.lock"
    else:
        lock = root / ".git" / "selftrain.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def ensure_repo(root: str | Path, remote: str | None = None, remote_name: str = DEFAULT_REMOTE) -> Path:
    """Make ``root`` a git + DVC repository with a default remote (a local directory unless a URL is given).

    ``remote`` may be a directory path (the default local remote is ``<root>/.selftrain/dvc-remote``)
    or any URL DVC understands, e.g. ``s3://bucket/prefix`` (S3-compatible; set ``endpointurl`` with
    ``dvc remote modify``).
    """
    root = Path(root).resolve()
    with repo_lock(root):
        return _ensure_repo(root, remote, remote_name)


def _ensure_repo(root: Path, remote: str | None, remote_name: str) -> Path:
    if not (root / ".git" / "HEAD").exists():
        git(root, "init", "-q")
    fresh = not (root / ".dvc").is_dir()
    if fresh:
        dvc(root, "init", "-q")
    remote = remote or ".selftrain/dvc-remote"  # relative: DVC stores it relative to .dvc/, so clones agree
    if "://" not in remote:
        (root / remote).mkdir(parents=True, exist_ok=True)
    if not fresh and _configured(root, remote, remote_name):
        return root  # every pipeline run starts here: no dvc process (about 1.5 s each) when nothing changes
    existing = "" if fresh else dvc(root, "remote", "list")
    if any(line.split()[:1] == [remote_name] for line in existing.splitlines()):
        dvc(root, "remote", "modify", remote_name, "url", remote)
        dvc(root, "remote", "default", remote_name)
    else:
        dvc(root, "remote", "add", "--default", remote_name, remote)
    dvc(root, "config", "core.autostage", "true")
    return root


def _configured(root: Path, remote: str, remote_name: str) -> bool:
    """``.dvc/config`` already names ``remote`` as the default remote ``remote_name``, with autostage on."""
    from configobj import ConfigObj, ConfigObjError  # DVC's own config reader

    try:
        conf = ConfigObj(str(root / ".dvc" / "config"), interpolation=False)
    except (OSError, ConfigObjError):
        return False  # dvc itself then says what is wrong
    core, url = conf.get("core", {}), conf.get(f'remote "{remote_name}"', {}).get("url")
    if core.get("remote") != remote_name or str(core.get("autostage", "")).lower() != "true" or not url:
        return False
    if "://" in remote or "://" in url:
        return url == remote
    return (root / ".dvc" / url).resolve() == (root / remote).resolve()


def _read_dvc_file(dvc_file: Path) -> DataVersion:
    try:
        meta = yaml.safe_load(dvc_file.read_text())
        out = meta["outs"][0]
        return DataVersion(
            path=str(dvc_file.parent / out["path"]), md5=out["md5"], dvc_file=str(dvc_file),
            nfiles=int(out.get("nfiles", 0)), size=int(out.get("size", 0)),
        )
    except (OSError, KeyError, IndexError, TypeError, yaml.YAMLError) as e:
        raise DvcError(f"{dvc_file}: not a readable .dvc file ({e})") from e


def add(path: str | Path, root: str | Path | None = None) -> DataVersion:
    """``dvc add`` a dataset directory; returns its version. The .dvc file lands beside it."""
    path = Path(path).resolve()
    if not path.is_dir():
        raise DvcError(f"{path}: no such dataset directory")
    root = Path(root).resolve() if root else find_root(path)
    check_trackable(path, root)
    with repo_lock(root):
        dvc(root, "add", "-q", str(path.relative_to(root)))
        return _read_dvc_file(path.with_name(path.name + ".dvc"))


def version_of(path: str | Path) -> DataVersion:
    """The version recorded in the ``.dvc`` file beside a tracked directory."""
    path = Path(path)
    dvc_file = path.with_name(path.name + ".dvc")
    if not dvc_file.exists():
        raise DvcError(f"{path}: not DVC-tracked (no {dvc_file.name}); run `selftrain data version {path}`")
    return _read_dvc_file(dvc_file)


def dataset_hash(path: str | Path) -> str:
    """DVC md5 (``<md5>.dir``) of a directory's current content, tracked or not (nothing is written)."""
    from dvc_data.hashfile.build import build
    from dvc_data.hashfile.db import HashFileDB
    from dvc_objects.fs.local import LocalFileSystem

    path = Path(path).resolve()
    if not path.is_dir():
        raise DvcError(f"{path}: no such dataset directory")
    fs = LocalFileSystem()
    with tempfile.TemporaryDirectory() as tmp:
        _, _, obj = build(HashFileDB(fs, tmp), str(path), fs, "md5", dry_run=True)
    return obj.hash_info.value


def push(targets: list[str | Path], root: str | Path | None = None, remote: str | None = None) -> None:
    """Upload tracked datasets to the remote (default remote unless named); without ``root``, each target's repository's."""
    for r, rel in _targets_by_root(targets, root).items():
        with repo_lock(r):
            dvc(r, "push", "-q", *(["-r", remote] if remote else []), *rel)


def version_output(path: str | Path, default_root: str | Path | None = None, remote: str | None = None) -> DataVersion:
    """Version a dataset a stage wrote and push it: ``dvc add`` in the DVC repository holding it, then ``dvc push``.

    Without a repository around ``path``, one is made at ``default_root`` (git + DVC, default remote
    ``remote``) first; without ``default_root`` that is an error.
    """
    try:
        root = find_root(path)
    except DvcError:
        if default_root is None:
            raise
        root = ensure_repo(default_root, remote=remote)
        if Path(default_root).resolve() not in Path(path).resolve().parents:
            raise DvcError(f"{path}: not inside the DVC repository {default_root}") from None
    version = add(path, root)
    push([path], root)  # every dataset version also lives on the remote
    return version


def pull(targets: list[str | Path], root: str | Path | None = None, remote: str | None = None) -> None:
    """Download tracked datasets (by their .dvc files) from the remote and check them out; without ``root``, each
    target from its own repository."""
    for r, rel in _targets_by_root(targets, root).items():
        dvc(r, "pull", "-q", "--force", *(["-r", remote] if remote else []), *rel)


def checkout_version(md5: str, out: str | Path, root: str | Path | None = None, remote: str | None = None) -> DataVersion:
    """Materialise dataset version ``md5`` (``<hash>.dir``) at ``out`` (byte-identical to when it was added).

    ``out`` may be anywhere, absolute or relative to the cwd: inside the project, inside a directory DVC tracks, or
    outside the repository (a scratch disk). Works from the hash alone: a throw-away .dvc file naming the hash is
    pulled (local cache first, then the remote) into a temporary directory inside the repository ``root`` (default:
    the one holding the cwd, else the one holding ``out``), then moved to ``out`` in one rename (copied beside it
    first when ``out`` is on another file system), so ``out`` is a plain, untracked directory or absent.
    """
    out = Path(out).resolve()
    root = Path(root).resolve() if root else _checkout_root(out)
    if not md5.endswith(".dir"):
        md5 = md5 + ".dir"
    if out.exists():
        raise DvcError(f"{out}: already exists; choose an empty path to check version {md5} out into")
    if _inside(out, root) and out.relative_to(root).parts[:1] in ((".dvc",), (".git",)):
        check_trackable(out, root)  # raises: not inside the repository's metadata
    stage = Path(tempfile.mkdtemp(prefix=".selftrain-checkout-", dir=root))
    pulled = stage / "version"
    try:
        (stage / "version.dvc").write_text(yaml.safe_dump({"outs": [{"md5": md5, "hash": "md5", "path": "version"}]}))
        with repo_lock(root):
            dvc(root, "pull", "-q", *(["-r", remote] if remote else []), str((stage / "version.dvc").relative_to(root)))
        # DVC may link from its cache; make files plain and writable copies so edits cannot corrupt the cache.
        for p in pulled.rglob("*"):
            if p.is_file() and (p.is_symlink() or not os.access(p, os.W_OK)):
                data = p.read_bytes()
                p.unlink()
                p.write_bytes(data)
        _publish_dir(pulled, out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        _unstage(root, stage)
    files = [p for p in out.rglob("*") if p.is_file()]
    return DataVersion(path=str(out), md5=md5, dvc_file="", nfiles=len(files), size=sum(p.stat().st_size for p in files))


def _checkout_root(out: Path) -> Path:
    """The repository whose cache and remote a checkout reads: the cwd's, else the one around ``out``."""
    for where in (Path.cwd(), out):
        try:
            return find_root(where)
        except DvcError:
            continue
    raise DvcError(f"{Path.cwd()}: not inside a DVC repository, nor is {out}; run the checkout inside the project "
                   f"whose DVC cache or remote holds the version (cd <project>; -o may point anywhere)")


def _publish_dir(src: Path, out: Path) -> None:
    """Move directory ``src`` to ``out`` in one rename; across file systems, copy beside ``out`` first, then rename."""
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(src, out)
        return
    except OSError as e:
        if e.errno != errno.EXDEV:
            raise DvcError(f"{out}: could not move the checked-out version there ({e})") from e
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        shutil.copytree(src, tmp)
        os.rename(tmp, out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DvcError(f"{out}: could not copy the checked-out version there ({e})") from e


def _unstage(root: Path, stage: Path) -> None:
    """Drop anything DVC's autostage put in git's index from the throw-away checkout folder (its .gitignore)."""
    if (root / ".git").is_dir():
        with suppress(DvcError):
            git(root, "rm", "-r", "-q", "--cached", "--ignore-unmatch", "--", str(stage.relative_to(root)))
