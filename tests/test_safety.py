"""Never lose a run: one run per checkpoint folder, the folder lock, exact resume of every setting,
divergence, and one-line errors (exit 2) for bad flags, unwritable places and damaged files.

Each class of failure is tried with at least two instances through the command line (ddpm.main in
this process, or a subprocess where a real process is the point), checking the exit status, the
one-line message, and that every file that existed before is byte-identical afterwards.
"""
import _csv
import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import ddpm
from conftest import (DDPM, MODEL, QUIET as BASE, SUBPROCESS_ENV, TINY_RUN as TRAIN, assert_kept, dirs, error_line,
                      nan_losses, one_line, tree)


def run(root: Path, *extra) -> int:
    return ddpm.main([*TRAIN, *dirs(root), *extra])


def run_ids(folder: Path) -> set:
    return {ddpm.checkpoint_meta(p)[1] for p in folder.glob("ckpt-*.pth")}


@pytest.fixture
def done(tiny_run):
    """The session's tiny run: ckpt-0.pth (step 2), ckpt-1.pth (step 3), metrics.csv, events.csv."""
    return tiny_run


# ----------------------------------------------------------------------------------------------
# one run per checkpoint folder
# ----------------------------------------------------------------------------------------------

def test_a_second_run_into_a_used_folder_is_refused_before_any_work(done, tmp_path, capsys, monkeypatch):
    shutil.copytree(done / "ckpt", tmp_path / "ckpt")
    before = tree(tmp_path)
    monkeypatch.setattr(ddpm, "build_diffusion", lambda cfg: pytest.fail("a model was built"))
    capsys.readouterr()
    for argv in ([*TRAIN, *dirs(tmp_path)],                                        # a fresh run
                 [*TRAIN, *dirs(tmp_path), "--seed", "7", "--lr", "5e-3"]):        # other settings, same folder
        assert ddpm.main(argv) == 2
        line = error_line(capsys)
        assert "of another run" in line and "--resume" in line and "--ckpt-save-dir" in line and "--overwrite" in line
    assert_kept(before, tmp_path)
    assert not (tmp_path / "out").exists()


def test_a_fine_tune_of_another_run_into_a_used_folder_is_refused(done, tmp_path, capsys):
    other = tmp_path / "other"
    assert run(other, "--epochs", "1", "--seed", "3") == 0
    shutil.copytree(done / "ckpt", tmp_path / "ckpt")
    before = tree(tmp_path)
    capsys.readouterr()
    for ck in (other / "ckpt", other / "ckpt" / "ckpt-0.pth"):
        assert run(tmp_path, "--loadckpt", str(ck)) == 2
        assert "of another run" in error_line(capsys)
    assert_kept(before, tmp_path)


def test_overwrite_moves_the_old_run_aside_and_the_new_run_stands_alone(done, tmp_path, capsys):
    shutil.copytree(done / "ckpt", tmp_path / "ckpt")
    old = tree(tmp_path / "ckpt")
    old_ids = run_ids(tmp_path / "ckpt")
    assert run(tmp_path, "--overwrite", "--epochs", "1", "--seed", "5") == 0
    aside = [p for p in (tmp_path / "ckpt").iterdir() if p.is_dir() and p.name.startswith("old-")]
    assert len(aside) == 1 and tree(aside[0]) == old  # moved, byte for byte, nothing deleted
    new_ids = run_ids(tmp_path / "ckpt")
    assert len(new_ids) == 1 and new_ids.isdisjoint(old_ids)
    assert "moved 4 files of the previous run" in capsys.readouterr().out
    obj = ddpm.read_checkpoint(ddpm.newest_checkpoint(tmp_path / "ckpt"))
    assert obj["run_id"] in new_ids and obj["seed"] == 5


def test_staged_training_continues_the_same_run_in_the_same_folder(done, tmp_path):
    shutil.copytree(done / "ckpt", tmp_path / "ckpt")
    first = ddpm.read_checkpoint(ddpm.newest_checkpoint(tmp_path / "ckpt"))
    # the original post's second stage: the newest checkpoint of ckpt/, a lower rate, more epochs
    assert run(tmp_path, "--loadckpt", str(tmp_path / "ckpt"), "--lr", "1e-4", "--epochs", "1") == 0
    obj = ddpm.read_checkpoint(ddpm.newest_checkpoint(tmp_path / "ckpt"))
    assert obj["run_id"] == first["run_id"] and obj["step"] == first["step"] + 2
    assert run_ids(tmp_path / "ckpt") == {first["run_id"]}
    steps = [int(r.split(",")[0]) for r in (tmp_path / "ckpt" / "metrics.csv").read_text().splitlines()[1:]]
    assert steps == list(range(1, obj["step"] + 1))  # the first stage's rows kept, the second's appended


def test_newest_checkpoint_and_resume_never_mix_runs(done, tmp_path, capsys):
    folder = tmp_path / "ckpt"
    other = tmp_path / "other"
    assert run(other, "--epochs", "3", "--seed", "9") == 0  # a longer run: higher steps
    folder.mkdir()
    shutil.copy(other / "ckpt" / "ckpt-2.pth", folder / "ckpt-2.pth")  # step 6, of the other run
    time.sleep(0.05)
    for name in ("ckpt-0.pth", "ckpt-1.pth"):  # steps 2 and 3 of this run, copied in later (newer files)
        shutil.copy(done / "ckpt" / name, folder / name)
    mine = ddpm.read_checkpoint(done / "ckpt" / "ckpt-1.pth")["run_id"]
    pick = ddpm.newest_checkpoint(folder)
    assert pick.name == "ckpt-1.pth" and ddpm.checkpoint_meta(pick) == (3, mine)
    assert "holds checkpoints of 2 runs" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# --export
# ----------------------------------------------------------------------------------------------

def test_export_never_overwrites_its_source_or_another_file_unasked(done, tmp_path, capsys):
    shutil.copytree(done / "ckpt", tmp_path / "ckpt")
    src = tmp_path / "ckpt" / "ckpt-1.pth"
    existing = tmp_path / "model.safetensors"
    existing.write_bytes(b"someone's file")
    before = tree(tmp_path)
    capsys.readouterr()
    cases = [([src], "is the checkpoint being exported"),
             ([src, "--overwrite"], "is the checkpoint being exported"),
             ([existing], "exists; name another file, or add --overwrite"),
             ([tmp_path / "ckpt"], "is a folder"),
             ([Path("/proc/ddpm-test/model.safetensors")], "cannot be created")]
    for target, message in cases:
        assert ddpm.main(["--loadckpt", str(src), "--export", *map(str, target)]) == 2
        assert message in error_line(capsys)
    assert_kept(before, tmp_path)
    assert ddpm.main(["--loadckpt", str(src), "--export", str(existing), "--overwrite"]) == 0
    assert ddpm.read_checkpoint(existing)["step"] == 3


# ----------------------------------------------------------------------------------------------
# the folder lock
# ----------------------------------------------------------------------------------------------

def wait_for(path: Path, proc: subprocess.Popen, limit: float = 120) -> None:
    deadline = time.time() + limit
    while not path.exists():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.1)


@pytest.mark.skipif(os.name != "posix", reason="stops the first trainer with SIGTERM")
def test_two_trainers_on_one_folder_one_runs_the_other_exits_2_at_once(tmp_path):
    argv = [sys.executable, DDPM, *TRAIN, *dirs(tmp_path), "--epochs", "100000"]
    first = subprocess.Popen(argv, env=SUBPROCESS_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(tmp_path / "ckpt" / "ckpt-0.pth", first)  # training for real, holding the lock
        holder = json.loads((tmp_path / "ckpt" / ".lock.json").read_text())
        assert holder["pid"] == first.pid and holder["host"] == socket.gethostname()
        t0 = time.time()
        second = subprocess.run(argv, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2
        line = one_line(second.stderr)
        assert "is in use by another training run" in line and f"process {first.pid}" in line
        assert time.time() - t0 < 30  # at once: no data loaded, no model built
    finally:
        first.send_signal(signal.SIGTERM)
        out, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    assert len(run_ids(tmp_path / "ckpt")) == 1
    steps = [int(r.split(",")[0]) for r in (tmp_path / "ckpt" / "metrics.csv").read_text().splitlines()[1:]]
    assert steps == sorted(set(steps))  # one writer: no interleaved rows
    assert not (tmp_path / "ckpt" / ".lock.json").exists()
    assert ddpm.main(["--train", "--resume", *dirs(tmp_path), "--max-steps", "1"]) == 0  # free again at once


@pytest.mark.skipif(os.name != "posix", reason="kills the first trainer with SIGKILL")
def test_the_lock_of_a_killed_trainer_is_free_at_once_and_odd_lock_places_are_one_line(tmp_path, capsys):
    argv = [sys.executable, DDPM, *TRAIN, *dirs(tmp_path), "--epochs", "100000"]
    first = subprocess.Popen(argv, env=SUBPROCESS_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(tmp_path / "ckpt" / "ckpt-0.pth", first)
    finally:
        first.kill()
        first.communicate(timeout=60)
    assert (tmp_path / "ckpt" / ".lock").exists() and (tmp_path / "ckpt" / ".lock.json").exists()  # left behind
    capsys.readouterr()
    step = ddpm.checkpoint_meta(ddpm.newest_checkpoint(tmp_path / "ckpt"))[0]
    assert ddpm.main(["--train", "--resume", *dirs(tmp_path), "--max-steps", str(step + 1)]) == 0
    assert "in use" not in capsys.readouterr().err  # the system released the lock with the process
    # a folder or a link where the lock file goes: one line each, nothing changed
    for name, make in (("dir", lambda p: p.mkdir()), ("link", lambda p: p.symlink_to(tmp_path / "elsewhere"))):
        root = tmp_path / name
        (root / "ckpt").mkdir(parents=True)
        make(root / "ckpt" / ".lock")
        before = tree(root)
        assert run(root) == 2
        assert "is not a lock file" in error_line(capsys)
        assert_kept(before, root)
        assert not (tmp_path / "elsewhere").exists()


def _contend(folder: str, barrier, held, results) -> None:
    """One of several processes that try to lock `folder` at the same moment."""
    lock = ddpm.FolderLock(Path(folder))
    barrier.wait()
    try:
        lock.acquire()
        won = True
    except ddpm.DDPMError:
        won = False
    results.put(won)
    held.wait()  # every process has tried before any lets go
    lock.release()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="forks the contenders")
def test_three_processes_racing_for_a_folder_never_share_it(tmp_path):
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    for trial in range(40):
        folder = tmp_path / f"ckpt-{trial}"
        if trial % 2:  # half the trials start from what a killed trainer (or an older version) left
            folder.mkdir()
            (folder / ".lock").write_text(json.dumps({"pid": 999999, "host": socket.gethostname()}))
            (folder / ".lock.json").write_text(json.dumps({"pid": 999999, "host": socket.gethostname(),
                                                           "started": "then"}))
        barrier, held, results = ctx.Barrier(3), ctx.Barrier(3), ctx.Queue()
        procs = [ctx.Process(target=_contend, args=(str(folder), barrier, held, results)) for _ in range(3)]
        for p in procs:
            p.start()
        won = [results.get(timeout=60) for _ in procs]
        for p in procs:
            p.join(timeout=60)
        assert sum(won) == 1, (trial, won)
        assert all(p.exitcode == 0 for p in procs)


# ----------------------------------------------------------------------------------------------
# resume: every setting, and the data
# ----------------------------------------------------------------------------------------------

SETTINGS = ["--batch-size", "8", "--lr", "5e-3", "--lr-schedule", "cosine", "--warmup-steps", "3",
            "--ema-decay", "0.99", "--grad-accum", "2", "--epochs", "3"]


def test_resume_with_the_readme_command_restores_every_setting_bit_for_bit(tmp_path, capsys):
    base = ["--train", "--demo", "--demo-images", "16", *MODEL, "--seed", "1", *BASE]
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert ddpm.main([*base, *SETTINGS, *dirs(straight)]) == 0
    assert ddpm.main([*base, *SETTINGS, *dirs(stopped), "--max-steps", "3"]) == 0  # interrupted mid-epoch
    capsys.readouterr()
    # the README's command: no settings, no data flags
    assert ddpm.main(["--train", "--resume", *dirs(stopped)]) == 0
    assert "resume: --" not in capsys.readouterr().out  # nothing typed, nothing changed
    a = ddpm.read_checkpoint(ddpm.newest_checkpoint(straight / "ckpt"))
    b = ddpm.read_checkpoint(ddpm.newest_checkpoint(stopped / "ckpt"))
    assert a["step"] == b["step"] == 6
    for part in ("model", "ema"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    assert b["train"]["batch_size"] == 8 and b["train"]["lr"] == 5e-3 and b["train"]["ema_decay"] == 0.99


def test_resume_says_each_typed_change_and_refuses_other_data(tmp_path, capsys, done):
    shutil.copytree(done / "ckpt", tmp_path / "ckpt")
    before = tree(tmp_path)
    capsys.readouterr()
    # other data: another folder, or another number of demo faces, refused before any work
    faces = tmp_path / "faces"
    faces.mkdir()
    for i in range(8):
        ddpm.save_png(ddpm.demo_faces(1, 8, seed=i)[0], faces / f"{i}.png")
    before = tree(tmp_path)
    for extra, message in ((["--data-folders", str(faces)], "the run trained on 8 built-in demo faces"),
                           (["--demo", "--demo-images", "12"], "the run trained on 8 built-in demo faces")):
        assert ddpm.main(["--train", "--resume", *dirs(tmp_path), *extra]) == 2
        line = error_line(capsys)
        assert message in line and "--resume-with-new-data" in line
    assert_kept(before, tmp_path)
    # typed settings win, each said in one line
    assert ddpm.main(["--train", "--resume", *dirs(tmp_path), "--lr", "3e-4", "--ema-decay", "0.5", "--epochs", "3",
                      "--no-run-pictures"]) == 0
    out = capsys.readouterr().out
    # (the --demo preset's rate and decay, which the run used)
    assert "resume: --lr 0.0003 (the run used 0.001)" in out and "resume: --ema-decay 0.5 (the run used 0.9995)" in out
    obj = ddpm.read_checkpoint(ddpm.newest_checkpoint(tmp_path / "ckpt"))
    assert obj["train"]["lr"] == 3e-4 and obj["step"] == 6
    # --resume-with-new-data lets it go on, on the new images
    assert ddpm.main(["--train", "--resume", *dirs(tmp_path), "--data-folders", str(faces), "--resume-with-new-data",
                      "--epochs", "4"]) == 0
    obj = ddpm.read_checkpoint(ddpm.newest_checkpoint(tmp_path / "ckpt"))
    assert obj["data"]["resolved"] == [str(faces.resolve())] and obj["step"] == 8


# ----------------------------------------------------------------------------------------------
# divergence
# ----------------------------------------------------------------------------------------------

def test_skipped_steps_are_logged_as_skipped_and_the_run_stops(tmp_path, monkeypatch, capsys):
    nan_losses(monkeypatch, lambda k: k in (3, 6, 7, 8, 9))  # 3: one skip; 6..9: four in a row
    assert run(tmp_path, "--epochs", "10", "--max-nonfinite", "4") == 1
    err = capsys.readouterr().err
    assert "4 non-finite losses or gradients in a row at step 9" in one_line(err)
    rows = (tmp_path / "ckpt" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    table = {int(r.split(",")[0]): dict(zip(header, r.split(","))) for r in rows[1:]}
    assert table[3]["loss"] == "" and table[3]["skipped"] == "1"  # skipped, not 0
    assert table[2]["loss"] != "" and float(table[2]["loss"]) > 0 and table[2]["skipped"] == "0"
    # the last checkpoint (the end of epoch 3, step 8: steps 6-8 skipped, weights those of step 5) is kept
    good = ddpm.read_checkpoint(ddpm.newest_checkpoint(tmp_path / "ckpt"))
    assert good["step"] == 8 and all(torch.isfinite(v).all() for v in good["model"].values())


def test_weights_that_overflow_stop_the_run_and_are_never_saved(tmp_path, monkeypatch, capsys):
    real = ddpm.Trainer._update

    def update(self):
        real(self)
        if self.pos.step == 3:
            with torch.no_grad():
                next(self.model.parameters()).fill_(1e30)  # finite, but the norm overflows
    monkeypatch.setattr(ddpm.Trainer, "_update", update)
    assert run(tmp_path, "--epochs", "5") == 1
    assert "the weights stopped being finite at step 3" in one_line(capsys.readouterr().err)
    objs = [ddpm.read_checkpoint(p) for p in (tmp_path / "ckpt").glob("ckpt-*.pth")]
    assert [o["step"] for o in objs] == [2]


def test_sampling_refuses_non_finite_weights(done, tmp_path, capsys):
    capsys.readouterr()
    for part, value in (("ema", float("nan")), ("model", float("inf"))):
        obj = ddpm.read_checkpoint(done / "ckpt" / "ckpt-1.pth")
        next(iter(obj[part].values())).view(-1)[0] = value
        path = tmp_path / f"bad-{part}.pth"
        torch.save(obj, path)
        argv = ["--loadckpt", str(path), "--device", "cpu", "--save-dir", str(tmp_path / "out"), "--num-samples", "1"]
        assert ddpm.main(argv + (["--no-ema"] if part == "model" else [])) == 2
        line = error_line(capsys)
        assert "NaN or infinite" in line and "diverged" in line and str(path) in line
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------
# unwritable places, a full disk
# ----------------------------------------------------------------------------------------------

def test_unwritable_output_places_fail_before_any_work(done, tmp_path, capsys, monkeypatch):
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    monkeypatch.setattr(ddpm, "build_diffusion", lambda cfg: pytest.fail("a model was built"))
    capsys.readouterr()
    ck = str(done / "ckpt" / "ckpt-1.pth")
    cases = [(["--train", "--demo", "--ckpt-save-dir", str(a_file)], "--ckpt-save-dir", "is a file"),
             (["--train", "--demo", "--ckpt-save-dir", "/proc/ddpm-test"], "--ckpt-save-dir", "cannot be created"),
             (["--train", "--demo", "--save-dir", "/dev/null"], "--save-dir", "is a file"),
             (["--loadckpt", ck, "--save-dir", str(a_file)], "--save-dir", "is a file"),
             (["--loadckpt", ck, "--save-dir", "/proc/self/ddpm"], "--save-dir", "cannot be created")]
    if os.geteuid() != 0:  # root writes into read-only folders
        ro = tmp_path / "read-only"
        ro.mkdir(mode=0o555)
        cases.append((["--loadckpt", ck, "--save-dir", str(ro)], "--save-dir", "not writable"))
    for argv, flag, message in cases:
        assert ddpm.main([*argv, "--device", "cpu"]) == 2, argv
        line = error_line(capsys)
        assert flag in line and message in line, line
    assert a_file.read_text() == "not a folder"


@pytest.mark.parametrize("failure", [RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0"),
                                     OSError(errno.ENOSPC, "No space left on device")])
def test_a_full_disk_during_a_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch, capsys, failure):
    assert run(tmp_path, "--epochs", "1") == 0
    before = tree(tmp_path / "ckpt")
    real_save = torch.save

    def full(obj, f, *a, **k):
        f.write(b"partial")
        raise failure
    monkeypatch.setattr(torch, "save", full)
    capsys.readouterr()
    assert run(tmp_path, "--resume", "--epochs", "2") == 2
    line = error_line(capsys)
    assert "could not write" in line and "ckpt-1.pth" in line and "are kept" in line and "--resume" in line
    monkeypatch.setattr(torch, "save", real_save)
    logs = {k: before.pop(k) for k in ("metrics.csv", "events.csv")}
    assert_kept(before, tmp_path / "ckpt")  # the checkpoints, byte for byte
    for name, data in logs.items():  # the logs went on, after their old rows
        assert (tmp_path / "ckpt" / name).read_bytes().startswith(data)
    assert not list((tmp_path / "ckpt").glob(".*tmp*")) and not (tmp_path / "ckpt" / "ckpt-1.pth").exists()


# ----------------------------------------------------------------------------------------------
# flags
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("flags, message", [
    (["--lr", "0"], "--lr must be a positive number up to 1"), (["--lr", "nan"], "--lr must be"),
    (["--lr", "inf"], "--lr must be"), (["--lr=-1e-4"], "--lr must be"),
    (["--warmup-steps", "-5"], "--warmup-steps must be 0 or more"),
    (["--eta", "1.5"], "--eta must be in [0, 1]"), (["--eta", "nan"], "--eta must be in [0, 1]"),
    (["--max-steps", "0"], "--max-steps must be at least 1 (leave it out for no limit), got 0"),
    (["--time-budget", "0"], "--time-budget must be longer than 0"),
    (["--time-budget", "0s"], "--time-budget must be longer than 0"),
    (["--device", "gpu"], "--device must be cpu, cuda, cuda:N or mps, got 'gpu'"),
    (["--device", "cuda:7"], "--device cuda was asked for but CUDA is not available"),
    (["--device", "mps"], "--device mps was asked for but no Apple GPU is available"),
    (["--max-nonfinite", "0"], "--max-nonfinite must be at least 1"),
])
def test_bad_flags_are_one_line_errors(tmp_path, capsys, flags, message):
    if flags[:2] == ["--device", "cuda:7"] and torch.cuda.is_available():
        pytest.skip("a CUDA machine")
    assert ddpm.main([*TRAIN, *dirs(tmp_path), *flags]) == 2
    assert message in error_line(capsys)
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "out").exists()


def test_a_sampling_batch_that_cannot_fit_gets_an_estimate(done, tmp_path, capsys):
    ck = str(done / "ckpt" / "ckpt-1.pth")
    capsys.readouterr()
    for extra, message in ((["--batch-size", "1000000"], "--batch-size 1000000 at 8x8 needs about"),
                           (["--batch-size", "2000000", "--num-samples", "5000000"], "GiB to sample, more than the"),
                           (["--batch-size", "64", "--num-samples", "900000000000"], "GiB of memory for the images")):
        assert ddpm.main(["--loadckpt", ck, "--device", "cpu", "--save-dir", str(tmp_path / "out"), *extra]) == 2
        assert message in error_line(capsys)
    # a legacy file at a huge --img-size: the model flags make the model, the estimate still comes first
    legacy = tmp_path / "legacy.pth"
    torch.save({k: v for k, v in ddpm.read_checkpoint(ck)["model"].items()}, legacy)
    assert ddpm.main(["--loadckpt", str(legacy), *MODEL[2:], "--time-cond", "scale-shift", "--img-size", "4096", "--device", "cpu",
                      "--batch-size", "64", "--save-dir", str(tmp_path / "out")]) == 2
    assert "at 4096x4096 needs about" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------
# damaged or edited checkpoints and logs
# ----------------------------------------------------------------------------------------------

def _edited(done, tmp_path, name, edit):
    obj = ddpm.read_checkpoint(done / "ckpt" / "ckpt-1.pth")
    edit(obj)
    path = tmp_path / name
    torch.save(obj, path)
    return path


def test_edited_checkpoint_contents_are_one_line_errors(done, tmp_path, capsys):
    def drop_model(o): o.pop("model")
    def config_list(o): o["config"] = [1, 2, 3]
    def config_string(o): o["config"]["img_size"] = "eight"
    def config_invalid(o): o["config"]["img_size"] = 7
    def config_shapes(o): o["config"]["num_channels"] = 64
    def model_not_tensors(o): o["model"] = {"eps_model.x": "text"}
    cases = [(drop_model, "not a ddpm.py checkpoint"), (config_list, "stored model config is invalid"),
             (config_string, "--img-size must be an integer"), (config_invalid, "--img-size 7 cannot be halved"),
             (config_shapes, "the stored config does not match the weights"),
             (model_not_tensors, "weights are not a dict of tensors")]
    capsys.readouterr()
    for edit, message in cases:
        path = _edited(done, tmp_path, edit.__name__ + ".pth", edit)
        before = path.read_bytes()
        for argv in (["--loadckpt", str(path), "--device", "cpu", "--save-dir", str(tmp_path / "out")],
                     ["--info", str(path)]):
            assert ddpm.main(argv) == 2, (edit.__name__, argv)
            line = error_line(capsys)
            assert message in line and str(path) in line, line
        assert path.read_bytes() == before
    assert not (tmp_path / "out").exists()


def test_damaged_safetensors_metadata_is_a_one_line_error(done, tmp_path, capsys):
    pytest.importorskip("safetensors")
    from safetensors.torch import load_file, save_file

    good = tmp_path / "good.safetensors"
    assert ddpm.main(["--loadckpt", str(done / "ckpt"), "--export", str(good)]) == 0
    weights = load_file(str(good))
    capsys.readouterr()
    for meta, message in (({"format": "ddpm.py", "version": "3", "config": "{not json"}, "metadata is damaged"),
                          ({"format": "ddpm.py", "version": "three", "config": "{}"}, "metadata is damaged"),
                          ({"format": "ddpm.py", "version": "99", "config": "{}"}, "written by a newer ddpm.py")):
        bad = tmp_path / "bad.safetensors"
        save_file(weights, str(bad), metadata=meta)
        assert ddpm.main(["--loadckpt", str(bad), "--device", "cpu", "--save-dir", str(tmp_path / "out")]) == 2
        assert message in error_line(capsys)


@pytest.mark.parametrize("log_name", ["metrics.csv", "events.csv"])
def test_a_damaged_log_is_kept_aside_and_a_fresh_one_started(done, tmp_path, capsys, log_name):
    shutil.copytree(done / "ckpt", tmp_path / "ckpt")
    for garbage in (b"\xff\xfe\x00binary\x00garbage", b"no,header,here\n1,2,3\n"):
        bad = tmp_path / "ckpt" / log_name
        bad.write_bytes(garbage)
        capsys.readouterr()
        assert run(tmp_path, "--resume", "--epochs", "3" if garbage.startswith(b"\xff") else "4") == 0
        out = capsys.readouterr().out
        assert f"note: {bad} could not be read" in out and "a fresh log starts" in out
        kept = [p for p in (tmp_path / "ckpt").glob(f"{log_name}.corrupt-*") if p.read_bytes() == garbage]
        assert len(kept) == 1
        assert bad.read_text().splitlines()[0].startswith("step,")
        kept[0].rename(kept[0].with_name(kept[0].name + "-seen"))  # the next instance gets its own name


# ----------------------------------------------------------------------------------------------
# messages that must not mislead
# ----------------------------------------------------------------------------------------------

def test_a_file_that_is_not_a_checkpoint_is_named_as_such(tmp_path, capsys):
    png = tmp_path / "face.pth"
    ddpm.save_png(ddpm.demo_faces(1, 8)[0], tmp_path / "face.png")
    shutil.copy(tmp_path / "face.png", png)
    text = tmp_path / "notes.pth"
    text.write_text("training notes, not weights\n")
    capsys.readouterr()
    for path, kind in ((png, "a PNG image"), (text, "text")):
        assert ddpm.main(["--loadckpt", str(path), "--device", "cpu", "--save-dir", str(tmp_path / "out")]) == 2
        line = error_line(capsys)
        assert f"not a PyTorch checkpoint (the file starts like {kind})" in line and "code" not in line


def test_unreadable_images_are_counted_as_permission_not_corrupt(tmp_path, capsys, monkeypatch):
    from PIL import Image

    folder = tmp_path / "faces"
    folder.mkdir()
    for i in range(4):
        ddpm.save_png(ddpm.demo_faces(1, 8, seed=i)[0], folder / f"{i}.png")
    real_open = Image.open
    locked = {str(folder / "1.png"), str(folder / "3.png")}

    def guarded(fp, *a, **k):
        if str(fp) in locked:
            raise PermissionError(errno.EACCES, "Permission denied", str(fp))
        return real_open(fp, *a, **k)
    monkeypatch.setattr(Image, "open", guarded)
    data = ddpm.load_images([folder], 8)
    assert len(data) == 2
    out = capsys.readouterr().out
    assert "skipped 2 (2 unreadable (permission))" in out and "corrupt" not in out


def test_forward_steps_without_data_fails_before_sampling(done, tmp_path, capsys, monkeypatch):
    pytest.importorskip("safetensors")
    export = tmp_path / "model.safetensors"  # weights and config, no record of the data
    assert ddpm.main(["--loadckpt", str(done / "ckpt"), "--export", str(export)]) == 0
    legacy = tmp_path / "legacy.pth"
    torch.save(ddpm.read_checkpoint(done / "ckpt" / "ckpt-1.pth")["model"], legacy)
    monkeypatch.setattr(ddpm, "generate", lambda *a, **k: pytest.fail("sampled before the data check"))
    capsys.readouterr()
    for path, flags in ((export, []), (legacy, MODEL[2:] + ["--img-size", "8", "--time-cond", "scale-shift"])):
        assert ddpm.main(["--loadckpt", str(path), *flags, "--forward-steps", "--device", "cpu",
                          "--save-dir", str(tmp_path / "out")]) == 2
        assert "does not record its training data" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_ctrl_c_while_starting_exits_130_with_one_line(tmp_path, capsys, monkeypatch):
    # during data loading, in this process
    for where in ("load_images", "demo_faces"):
        monkeypatch.setattr(ddpm, where, lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    for argv in ([*TRAIN, *dirs(tmp_path)], ["--train", "--data-folders", str(tmp_path / "data"), *MODEL, *BASE,
                                             *dirs(tmp_path)]):
        if "--data-folders" in argv:
            ddpm.save_png(torch.zeros(3, 8, 8, dtype=torch.uint8), tmp_path / "data" / "x.png")
        assert ddpm.main(argv) == 130
        assert "aborted" in one_line(capsys.readouterr().err)
    assert not (tmp_path / "ckpt").exists()


def _when_loaded(p: subprocess.Popen, library: str, timeout: float = 60.0) -> bool:
    """Wait until process p has mapped a file whose name contains `library` (Linux: /proc/PID/maps);
    False where that cannot be seen (no /proc) or p ended first."""
    deadline = time.time() + timeout
    while time.time() < deadline and p.poll() is None:
        try:
            if library in Path(f"/proc/{p.pid}/maps").read_text():
                return True
        except OSError:
            return False
        time.sleep(0.002)
    return False


# the phases of starting, each from the moment a library it loads is mapped: our imports (csv's extension,
# imported right after the handler), torch's C extension, numpy inside torch, torch's own modules after it
STARTING = {"our imports": (Path(getattr(_csv, "__file__", "") or "-").name, 0.0),
            "torch's C extension": (Path(torch._C.__file__).name, 0.0),
            "numpy inside torch": ("_multiarray_umath", 0.0), "torch's own modules": ("_multiarray_umath", 0.3)}


@pytest.mark.skipif(os.name != "posix", reason="sends SIGINT")
@pytest.mark.parametrize("phase", list(STARTING))
def test_ctrl_c_while_torch_loads_exits_130_with_one_line(tmp_path, phase):
    # not by a fixed delay: a loaded machine can still be compiling the script then, before any of it runs
    p = subprocess.Popen([sys.executable, DDPM, *TRAIN, *dirs(tmp_path)], env=SUBPROCESS_ENV,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    library, after = STARTING[phase]
    if not _when_loaded(p, library):
        time.sleep(1.0)  # no /proc to watch (or csv built in): by then the imports are under way
    time.sleep(after)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    assert "aborted" in one_line(err) and "Traceback" not in err
    assert not (tmp_path / "ckpt").exists()


@pytest.mark.skipif(sys.platform != "linux", reason="file names that are not UTF-8 exist on Linux")
def test_paths_that_are_not_utf8_are_printed_and_nothing_is_lost(tmp_path):
    root = os.fsencode(str(tmp_path))
    faces = os.path.join(root, b"faces-\xff")
    out = os.path.join(root, b"out-\xfe")
    os.mkdir(faces)
    for i in range(8):
        ddpm.save_png(ddpm.demo_faces(1, 8, seed=i)[0], Path(os.fsdecode(os.path.join(faces, b"%d.png" % i))))
    env = dict(SUBPROCESS_ENV, PYTHONIOENCODING="utf-8")  # strict: a surrogate would raise UnicodeEncodeError
    argv = [sys.executable.encode(), DDPM.encode(), b"--train", b"--data-folders", faces, *[a.encode() for a in MODEL],
            b"--batch-size", b"4", b"--epochs", b"1", b"--device", b"cpu", b"--ckpt-save-dir",
            os.path.join(root, b"ckpt"), b"--save-dir", out, b"--sample-every", b"0"]
    p = subprocess.run(argv, env=env, capture_output=True, timeout=300)
    assert p.returncode == 0, p.stderr.decode(errors="replace")
    assert b"faces-\\udcff" in p.stdout  # printed, escaped
    assert os.path.exists(os.path.join(out, b"final-grid.png"))
    assert (tmp_path / "ckpt" / "ckpt-0.pth").exists()


def test_demo_with_data_folders_trains_on_the_folders(tmp_path, capsys):
    faces = tmp_path / "faces"
    faces.mkdir()
    for i in range(8):
        ddpm.save_png(ddpm.demo_faces(1, 8, seed=100 + i)[0], faces / f"{i}.png")
    assert ddpm.main(["--train", "--demo", "--data-folders", str(faces), *MODEL, "--batch-size", "4", "--epochs", "1",
                      *BASE, *dirs(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"--demo's CPU preset applies to your folders ({faces})" in out
    assert f"data: 8 images from {faces}" in out and "built-in demo faces (" not in out
    obj = ddpm.read_checkpoint(ddpm.newest_checkpoint(tmp_path / "ckpt"))
    assert obj["data"]["folders"] == [str(faces)] and obj["train"]["lr"] == 1e-3  # the preset's rate
