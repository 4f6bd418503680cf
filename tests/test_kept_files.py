"""The files a run keeps outside the rotation, best.pth and guide.pth: one is only ever replaced by a file
made the same way (best.pth: measured on the same held-out images with the same --eval-samples and
seed; guide.pth: this run's snapshot at its due step); otherwise the old one is moved into a dated
folder, byte-identical, with one line. The run's --eval-folders are part of what --resume keeps.
Kept files get the checks and the temporary-file cleanup of checkpoints. All through the command line.
"""
import os
from pathlib import Path

import pytest

import ddpm
from conftest import MODEL, QUIET, dirs, error_line, faces, tree


assert QUIET[-2:] == ["--eval-every", "0"]
PROBED = QUIET[:-2]  # these runs measure their quality


def train(root: Path, *flags) -> int:
    """A tiny run (batch 4: 2 steps an epoch) with the flags, or its continuation."""
    return ddpm.main(["--train", *MODEL, "--batch-size", "4", "--seed", "0", *PROBED, *dirs(root), *flags])


def moved_aside(ckpt: Path, name: str) -> list:
    """The copies of `name` moved into the run folder's old-* folders."""
    return sorted(ckpt.glob(f"old-*/{name}"))


def test_guide_is_never_replaced_by_another_steps_snapshot(tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    assert train(tmp_path, "--demo", "--demo-images", "8", "--eval-every", "0", "--epochs", "2",
                 "--guide-snapshot", "0.5") == 0
    assert ddpm.checkpoint_meta(ckpt / "guide.pth")[0] == 2  # half of 4 planned steps
    first = (ckpt / "guide.pth").read_bytes()
    capsys.readouterr()
    # more epochs: the snapshot is now due at step 4 of 8, where the run stands: taken at once, the old one aside
    assert train(tmp_path, "--resume", "--epochs", "4") == 0
    out = capsys.readouterr().out
    assert "guide.pth: the earlier one (step 2) is not this run's snapshot (step 4); moved to" in out
    assert ddpm.checkpoint_meta(ckpt / "guide.pth")[0] == 4
    assert [p.read_bytes() for p in moved_aside(ckpt, "guide.pth")] == [first]
    # another fraction, due later: said at the start; a time budget ends the run first: said at the end
    capsys.readouterr()
    assert train(tmp_path, "--resume", "--epochs", "6", "--guide-snapshot", "0.9", "--time-budget", "0.001") == 0
    out = capsys.readouterr().out
    assert "guide: " + str(ckpt / "guide.pth") + " is the snapshot of step 4; this run's (0.9 of its planned steps) " \
           "is due at step 11" in out
    assert "guide: not saved yet; the snapshot (0.9 of the run) is due at step 11: continue with --resume" in out
    assert ddpm.checkpoint_meta(ckpt / "guide.pth")[0] == 4 and len(moved_aside(ckpt, "guide.pth")) == 1


@pytest.fixture(scope="module")
def eval_run(tmp_path_factory) -> Path:
    """A run that measures 2 samples against --eval-folders e1 (6 faces) every step, 2 steps so far."""
    root = tmp_path_factory.mktemp("eval_run")
    faces(root / "data", 8, seed=1), faces(root / "e1", 6, seed=2), faces(root / "e2", 4, seed=3)
    assert train(root, "--data-folders", str(root / "data"), "--eval-every", "1", "--eval-samples", "2",
                 "--eval-folders", str(root / "e1"), "--max-steps", "2") == 0
    return root


def copy(run: Path, root: Path) -> Path:
    """A copy of the run's folder at root/ckpt (its image folders stay where the run recorded them)."""
    import shutil

    shutil.copytree(run / "ckpt", root / "ckpt")
    return root / "ckpt"


def test_resume_measures_on_the_runs_eval_folders_and_keeps_its_best(eval_run, tmp_path, capsys):
    ckpt = copy(eval_run, tmp_path)
    best = ddpm.read_checkpoint(ckpt / "best.pth")["quality"]
    capsys.readouterr()
    assert train(tmp_path, "--resume", "--max-steps", "4") == 0
    out = capsys.readouterr().out
    assert f"resume: --eval-every measures on the run's --eval-folders {eval_run / 'e1'}" in out
    q = ddpm.read_checkpoint(ckpt / "ckpt-1.pth")["quality"]
    assert q["key"] == best["key"] and q["floor"] == best["floor"]  # the same images, the same measure
    assert q["best_swd"] <= best["best_swd"] and not moved_aside(ckpt, "best.pth")


@pytest.mark.parametrize("change", [["--eval-folders", "e2"], ["--eval-samples", "3"], ["--seed", "4"]])
def test_a_best_measured_otherwise_is_moved_aside_not_replaced(eval_run, tmp_path, capsys, change):
    ckpt = copy(eval_run, tmp_path)
    if change[0] == "--eval-folders":
        change = [change[0], str(eval_run / change[1])]
    old = (ckpt / "best.pth").read_bytes()
    old_swd = ddpm.read_checkpoint(ckpt / "best.pth")["quality"]["best_swd"]
    capsys.readouterr()
    assert train(tmp_path, "--resume", "--max-steps", "3", *change) == 0
    out = capsys.readouterr().out
    assert f"eval: the run's best (SWD {old_swd:.2f} at step 1) was measured with 2 samples against --eval-folders" in out
    assert "moved to" in out and "a new best starts" in out
    assert [p.read_bytes() for p in moved_aside(ckpt, "best.pth")] == [old]
    new = ddpm.read_checkpoint(ckpt / "best.pth")
    assert new["step"] == 3 and new["quality"]["best_step"] == 3  # the first measurement of the new kind


def test_kept_files_get_the_checks_and_cleanup_of_checkpoints(eval_run, tmp_path, capsys):
    ckpt = copy(eval_run, tmp_path)
    (ckpt / "best.pth").unlink()
    (ckpt / "best.pth").mkdir()
    before = tree(tmp_path)
    assert train(tmp_path, "--resume", "--max-steps", "3") == 2
    assert f"{ckpt / 'best.pth'} is not a regular file" in error_line(capsys)
    assert tree(tmp_path) == before and not (tmp_path / "out").exists()
    (ckpt / "best.pth").rmdir()
    dead = ckpt / ".best.pth.tmp-99999999-abc123"    # a save killed midway, by a process long gone
    live = ckpt / f".guide.pth.tmp-{os.getpid()}-abc"  # one being written now
    other = ckpt / ".notes.tmp-99999999-abc"          # not a file of the run
    for f in (dead, live, other):
        f.write_bytes(b"partial")
    assert train(tmp_path, "--resume", "--max-steps", "3") == 0
    assert not dead.exists() and live.exists() and other.exists()


def test_the_held_out_images_must_be_held_out(eval_run, tmp_path, capsys):
    ckpt = copy(eval_run, tmp_path)
    before = tree(tmp_path)
    for folders in (["data"], ["e1", "data"]):  # the training folder itself, or one that shares its images
        assert train(tmp_path, "--resume", "--max-steps", "3", "--eval-folders",
                     *[str(eval_run / f) for f in folders]) == 2
        assert "shares 8 of its" in error_line(capsys)
    assert tree(tmp_path) == before and not (tmp_path / "out").exists() and ckpt.is_dir()
