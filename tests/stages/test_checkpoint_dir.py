"""Checkpoint folders: commit by the `latest` pointer, keep the newest, and tidy what a killed save or prune left."""

from __future__ import annotations

from pathlib import Path

from stages.training.checkpoints import latest_checkpoint_dir, prune_checkpoints, save_checkpoint_dir


def _write(folder: Path) -> None:
    (folder / "a.bin").write_bytes(b"a")
    (folder / "b.bin").write_bytes(b"b")


def test_save_keeps_the_newest_and_points_latest_at_the_last(tmp_path: Path) -> None:
    for step in (2, 4, 6):
        save_checkpoint_dir(tmp_path, step, _write, keep=2)
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_0000004", "step_0000006"]
    assert latest_checkpoint_dir(tmp_path) == (root / "latest", root / "step_0000006")


def test_prune_removes_a_half_dropped_checkpoint_and_stale_temporaries(tmp_path: Path) -> None:
    for step in (2, 4, 6):
        save_checkpoint_dir(tmp_path, step, _write, keep=3)
    root = tmp_path / "checkpoints"
    (root / "step_0000002" / "a.bin").unlink()  # a kill -9 in the middle of removing the oldest one
    (root / ".tmp-step_0000008").mkdir()  # and one in the middle of writing the next
    prune_checkpoints(tmp_path, keep=2)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_0000004", "step_0000006"]
    prune_checkpoints(tmp_path, keep=1)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_0000006"]
    prune_checkpoints(tmp_path / "nothing-here", keep=1)  # a run without checkpoints: nothing to do


def test_prune_never_drops_the_committed_checkpoint(tmp_path: Path) -> None:
    save_checkpoint_dir(tmp_path, 4, _write, keep=2)
    save_checkpoint_dir(tmp_path, 6, _write, keep=2)
    (tmp_path / "checkpoints" / "latest").write_text("step_0000004")  # a run rolled back by hand
    (tmp_path / "checkpoints" / "step_0000008").mkdir()
    prune_checkpoints(tmp_path, keep=1)
    assert (tmp_path / "checkpoints" / "step_0000004" / "a.bin").is_file()
