"""Checkpoints are published atomically: a half-written one is never picked up on restart."""
from __future__ import annotations

from contract.io import write_atomic
from trainers.checkpoint import COMPLETE, Checkpointer


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
