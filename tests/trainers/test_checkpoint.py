"""Checkpoints are published atomically: a half-written one is never picked up on restart."""
from __future__ import annotations

import errno
from pathlib import Path

import pytest

from contract.io import write_atomic
from trainers.checkpoint import COMPLETE, CheckpointError, Checkpointer


def _complete(root, tag):
    (root / tag).mkdir(parents=True)
    (root / tag / COMPLETE).write_text("{}")


def test_latest_names_the_last_published_checkpoint(tmp_path):
    _complete(tmp_path, "step00000004")
    write_atomic(tmp_path / "latest", "step00000004")
    assert Checkpointer(tmp_path).latest_tag() == "step00000004"


def test_half_written_checkpoint_is_ignored(tmp_path):
    _complete(tmp_path, "step00000004")
    write_atomic(tmp_path / "latest", "step00000004")
    (tmp_path / "step00000008").mkdir()  # shards of a save that died before it was published
    assert Checkpointer(tmp_path).latest_tag() == "step00000004"


def test_latest_without_complete_marker_is_not_loaded(tmp_path):
    (tmp_path / "step00000008").mkdir()
    (tmp_path / "latest").write_text("step00000008")  # e.g. DeepSpeed's own non-atomic latest
    assert Checkpointer(tmp_path).latest_tag() is None


def test_fresh_directory_has_no_checkpoint(tmp_path):
    assert Checkpointer(tmp_path / "none").latest_tag() is None


# -- fallback to an older checkpoint, failed saves (issue 16 item 5) ------------------------------------
class FakeEngine:
    """Loads a tag unless its ``state.pt`` is missing or not the bytes ``good``; saves ``state.pt`` (or fails)."""

    def __init__(self, fail_save: Exception | None = None):
        self.loaded, self.fail_save = [], fail_save

    def load_checkpoint(self, directory, tag):
        data = (Path(directory) / tag / "state.pt").read_bytes()  # FileNotFoundError when deleted
        if data != b"good":
            raise RuntimeError("PytorchStreamReader failed reading zip archive: failed finding central directory")
        self.loaded.append(tag)
        return str(Path(directory) / tag), {"step": int(tag[4:])}

    def save_checkpoint(self, directory, tag, client_state, save_latest):
        (Path(directory) / tag).mkdir(parents=True, exist_ok=True)
        (Path(directory) / tag / "state.pt").write_bytes(b"go")  # half written when the disk fills
        if self.fail_save is not None:
            raise self.fail_save
        (Path(directory) / tag / "state.pt").write_bytes(b"good")


def _saved(root, *steps):
    ckpt = Checkpointer(root, keep=3)
    for s in steps:
        ckpt.save(FakeEngine(), s, {"step": s})
    return ckpt


def test_an_unloadable_latest_checkpoint_falls_back_to_the_previous_one_and_says_so(tmp_path, caplog):
    ckpt = _saved(tmp_path, 2, 4, 6)
    (tmp_path / "step00000006" / "state.pt").write_bytes(b"go")  # truncated
    engine = FakeEngine()
    with caplog.at_level("WARNING", logger="trainers.checkpoint"):
        state = ckpt.load(engine)
    assert state == {"step": 4} and ckpt.loaded_tag == "step00000004" and engine.loaded == ["step00000004"]
    assert "step00000006 could not be loaded" in caplog.text and "falling back" in caplog.text


def test_latest_naming_a_missing_tag_falls_back_to_the_newest_complete_one(tmp_path, caplog):
    ckpt = _saved(tmp_path, 2, 4)
    write_atomic(tmp_path / "latest", "step00000009")
    with caplog.at_level("WARNING", logger="trainers.checkpoint"):
        assert ckpt.load(FakeEngine()) == {"step": 4}
    assert "falling back to step00000004" in caplog.text


def test_no_loadable_checkpoint_is_an_error_naming_them_all(tmp_path):
    ckpt = _saved(tmp_path, 2, 4)
    for tag in ("step00000002", "step00000004"):
        (tmp_path / tag / "state.pt").unlink()
    with pytest.raises(CheckpointError, match="step00000002.*could not be loaded") as e:
        ckpt.load(FakeEngine())
    assert "step00000004" in str(e.value)


def test_a_save_that_fills_the_disk_names_the_path_and_publishes_nothing(tmp_path):
    ckpt = _saved(tmp_path, 2)
    full = OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(CheckpointError, match=r"step00000004: writing the checkpoint failed: RuntimeError"):
        ckpt.save(FakeEngine(fail_save=RuntimeError("[enforce fail at inline_container.cc] . PytorchStreamWriter "
                                                    "failed writing file data/0: file write failed")), 4, {})
    with pytest.raises(CheckpointError, match=r"step00000004: writing the checkpoint failed: disk full"):
        ckpt.save(FakeEngine(fail_save=full), 4, {})
    assert not (tmp_path / "step00000004").exists()  # the unpublished tag is removed, freeing its space
    assert ckpt.latest_tag() == "step00000002" and ckpt.load(FakeEngine()) == {"step": 2}
