"""Never lose an output either: every file that existed before a command is byte-identical after it
(unless --overwrite, which moves it aside), no write goes through a link, one command never writes
two results to one name, an error in mid-training keeps the trained steps, branches never overwrite
newer checkpoints, resume announces every change, stored training state is validated, and the
smaller classes of odd places, odd flags and misleading messages.

Each class is tried with at least two instances through the command line (ddpm.main in this
process, or a subprocess where a real process is the point), checking the exit status, the one-line
message, that every file that existed before is byte-identical afterwards, and that nothing outside
the named folders changed.
"""
import errno
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch

import ddpm
from conftest import (QUIET, TINY_RUN as TRAIN, assert_kept, copy_run, dirs, disk_full_at, error_line, faces, one_line,
                      rows, tree)


def sample(ckpt, out: Path, *flags) -> int:
    return ddpm.main(["--loadckpt", str(ckpt), "--device", "cpu", "--seed", "1", "--steps", "4", "--save-dir", str(out),
                      *flags])


def outside(tmp_path: Path) -> Path:
    """A file outside every folder a command is given, that must never change."""
    f = tmp_path / "elsewhere" / "precious.txt"
    f.parent.mkdir(exist_ok=True)
    f.write_text("precious")
    return f


# ----------------------------------------------------------------------------------------------
# outputs are data too
# ----------------------------------------------------------------------------------------------

def test_a_second_command_writes_beside_the_first_never_over_it(tiny_run, tmp_path, capsys):
    out = tmp_path / "out"
    assert sample(tiny_run / "ckpt", out, "--num-samples", "4") == 0  # a first run: in place, as the original
    assert sorted(p.name for p in out.iterdir()) == ["ddpm-0.png", "ddpm-1.png", "ddpm-2.png", "ddpm-3.png",
                                                      "ddpm-all.png"]
    before = tree(out)
    capsys.readouterr()
    assert sample(tiny_run / "ckpt", out, "--num-samples", "2", "--seed", "9") == 0
    assert f"writing to {out / 'sample-2'} instead" in capsys.readouterr().out
    assert_kept(before, out)
    assert sorted(p.name for p in (out / "sample-2").iterdir()) == ["ddpm-0.png", "ddpm-1.png", "ddpm-all.png"]
    # training twice into one --save-dir: the second run's pictures beside the first's
    for k in (1, 2):
        assert ddpm.main([*TRAIN[:-len(QUIET)], "--device", "cpu", "--sample-every", "1", "--max-steps", "2", "--log-every", "1",
                          "--ckpt-save-dir", str(tmp_path / f"ckpt{k}"), "--save-dir", str(tmp_path / "pics"),
                          "--seed", str(k)]) == 0
        if k == 1:
            first = tree(tmp_path / "pics")
            assert {"run-before.png", "run-after.png", "final-grid.png", "loss.png",
                    "preview/step-0000001.png"} <= set(first)
    assert_kept(first, tmp_path / "pics")
    assert (tmp_path / "pics" / "train-2" / "final-grid.png").is_file()
    assert (tmp_path / "pics" / "train-2" / "preview" / "step-0000002.png").is_file()


def test_overwrite_moves_the_earlier_outputs_aside(tiny_run, tmp_path, capsys):
    out = tmp_path / "out"
    assert sample(tiny_run / "ckpt", out, "--num-samples", "3") == 0
    before = tree(out)
    capsys.readouterr()
    assert sample(tiny_run / "ckpt", out, "--num-samples", "2", "--seed", "9", "--overwrite") == 0
    assert "--overwrite: moved 4 earlier files" in capsys.readouterr().out
    aside = [p for p in out.iterdir() if p.name.startswith("old-")]
    assert len(aside) == 1 and tree(aside[0]) == before  # moved, byte for byte
    assert sorted(p.name for p in out.glob("ddpm-*.png")) == ["ddpm-0.png", "ddpm-1.png", "ddpm-all.png"]
    # the same for an edit's outputs
    f = faces(tmp_path / "faces")
    edit = ["--init-images", str(f / "face0.png"), "--strength", "0.5"]
    assert sample(tiny_run / "ckpt", tmp_path / "edits", *edit) == 0
    before = tree(tmp_path / "edits")
    assert sample(tiny_run / "ckpt", tmp_path / "edits", *edit, "--overwrite") == 0
    aside = [p for p in (tmp_path / "edits").iterdir() if p.name.startswith("old-")]
    assert len(aside) == 1 and tree(aside[0]) == before


def test_no_write_goes_through_a_link_planted_in_an_output_folder(tiny_run, tmp_path, capsys):
    precious = outside(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "ddpm-0.png").symlink_to(precious)       # where a picture goes
    (out / "preview").symlink_to(precious.parent)   # where the previews go
    assert sample(tiny_run / "ckpt", out, "--num-samples", "2") == 0
    assert (out / "sample-2" / "ddpm-0.png").is_file() and not (out / "sample-2" / "ddpm-0.png").is_symlink()
    ckpt = copy_run(tiny_run, tmp_path)
    pid = os.getpid()  # links planted under the temporary names the old code would have used
    for name in ("ckpt-1.pth", "ckpt-2.pth", "metrics.csv"):
        (ckpt / f".{name}.tmp-{pid}").symlink_to(precious)
    assert ddpm.main(["--train", "--resume", *dirs(tmp_path), "--epochs", "3", "--sample-every", "1"]) == 0
    assert precious.read_text() == "precious" and os.listdir(precious.parent) == ["precious.txt"]
    for name in ("ckpt-1.pth", "ckpt-2.pth", "metrics.csv"):
        assert (ckpt / name).is_file() and not (ckpt / name).is_symlink()
    assert (out / "train-2" / "preview").is_dir()


def test_one_command_never_writes_two_results_to_one_name(tiny_run, tmp_path, capsys):
    f = faces(tmp_path / "ed")
    (f / "sub").mkdir()
    shutil.copy(f / "face1.png", f / "sub" / "face0.png")
    from PIL import Image
    Image.open(f / "face2.png").save(f / "face0.jpg", quality=95)
    for inputs, names in (([f / "face0.png", f / "face0.jpg"], ["face0", "face0-2"]),
                          ([f / "face0.png", f / "sub" / "face0.png", f / "face0.jpg"], ["face0", "face0-2", "face0-3"])):
        out = tmp_path / f"out{len(inputs)}"
        capsys.readouterr()
        assert sample(tiny_run / "ckpt", out, "--invert", *map(str, inputs)) == 0
        logged = capsys.readouterr().out
        latents = [torch.load(out / f"edit-invert-{n}.pt", weights_only=True) for n in names]
        assert len({tuple(z.flatten().tolist()) for z in latents}) == len(inputs)  # every result kept
        for path, n in zip(inputs, names):
            assert f"{path}: x_T in {out / f'edit-invert-{n}.pt'}" in logged


def test_an_error_in_mid_training_saves_the_trained_steps_first(tmp_path, capsys, monkeypatch):
    # a preview that cannot be written, and a metrics row that cannot be appended: the disk is full at step 3
    for name, where in (("preview", "step-0000003"), ("log", "metrics.csv")):
        root = tmp_path / name
        disk_full_at(monkeypatch, where, step=3)
        capsys.readouterr()
        assert ddpm.main([*TRAIN, *dirs(root), "--epochs", "10", "--sample-every", "1"]) == 2
        err = capsys.readouterr()
        line = one_line(err.err)
        assert "could not write" in line and where in line and "No space left on device" in line, line
        assert "checkpoint saved" in err.out
        assert ddpm.checkpoint_meta(ddpm.newest_checkpoint(root / "ckpt"))[0] == 3  # not the epoch end before it
        monkeypatch.undo()
        assert ddpm.main(["--train", "--resume", *dirs(root), "--max-steps", "4"]) == 0
    # memory running out on the CPU at step 3: the same, as one line
    real_forward = ddpm.GaussianDiffusion.forward
    calls = []

    def forward(self, *a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: "
                               "you tried to allocate 137438953472 bytes. Error code 12 (Cannot allocate memory)")
        return real_forward(self, *a, **k)
    monkeypatch.setattr(ddpm.GaussianDiffusion, "forward", forward)
    root = tmp_path / "oom"
    capsys.readouterr()
    assert ddpm.main([*TRAIN, *dirs(root), "--epochs", "10"]) == 2
    line = one_line(capsys.readouterr().err)
    assert "out of memory on the cpu" in line and "--batch-size" in line
    assert ddpm.checkpoint_meta(ddpm.newest_checkpoint(root / "ckpt"))[0] == 2


# ----------------------------------------------------------------------------------------------
# runs and branches
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def long_run(tmp_path_factory) -> Path:
    """A tiny run of 3 epochs (steps 2, 4, 6 in ckpt-0, -1, -2) with a metrics row per step."""
    root = tmp_path_factory.mktemp("long_run")
    assert ddpm.main([*TRAIN, *dirs(root), "--epochs", "3"]) == 0
    return root


def test_a_branch_from_an_older_checkpoint_never_overwrites_newer_ones(long_run, tmp_path, capsys):
    ckpt = copy_run(long_run, tmp_path)
    before = tree(tmp_path)
    capsys.readouterr()
    for argv, step in (([*TRAIN, "--loadckpt", str(ckpt / "ckpt-0.pth"), "--lr", "1e-4"], 2),   # a staged fine-tune
                       (["--train", "--resume", "--loadckpt", str(ckpt / "ckpt-1.pth")], 4)):  # a resume of an old one
        assert ddpm.main([*argv, *dirs(tmp_path), "--epochs", "1"]) == 2
        line = error_line(capsys)
        assert f"is step {step} of the run in {ckpt}, which has reached step 6" in line
        assert f"--ckpt-save-dir {ckpt}-from-{step}" in line and f"--loadckpt {ckpt}" in line
    assert_kept(before, tmp_path)
    assert ddpm.newest_checkpoint(ckpt).name == "ckpt-2.pth"
    # the branch goes where the message says; the original post's staging (the newest) still continues in place
    branch = Path(f"{ckpt}-from-2")
    assert ddpm.main([*TRAIN, "--loadckpt", str(ckpt / "ckpt-0.pth"), "--lr", "1e-4", "--ckpt-save-dir", str(branch),
                      "--save-dir", str(tmp_path / "out"), "--epochs", "1"]) == 0
    assert ddpm.checkpoint_meta(ddpm.newest_checkpoint(branch))[0] == 4
    assert ddpm.main([*TRAIN, "--loadckpt", str(ckpt), "--lr", "1e-4", *dirs(tmp_path), "--epochs", "1"]) == 0
    assert ddpm.checkpoint_meta(ddpm.newest_checkpoint(ckpt))[0] == 8
    assert [int(r["step"]) for r in rows(ckpt / "metrics.csv")] == list(range(1, 9))


def test_a_folder_with_only_the_logs_of_a_dead_run_is_restartable(long_run, tmp_path, capsys):
    for k, logs in enumerate((["metrics.csv"], ["metrics.csv", "events.csv"])):
        root = tmp_path / str(k)
        (root / "ckpt").mkdir(parents=True)
        for name in logs:
            shutil.copy(long_run / "ckpt" / name, root / "ckpt" / name)
        before = tree(root / "ckpt")
        capsys.readouterr()
        assert ddpm.main([*TRAIN, *dirs(root), "--max-steps", "1"]) == 0
        assert "held only the logs of a run that never saved a checkpoint; moved them to" in capsys.readouterr().out
        aside = [p for p in (root / "ckpt").iterdir() if p.name.startswith("old-")]
        assert len(aside) == 1 and tree(aside[0]) == before
        assert [r["step"] for r in rows(root / "ckpt" / "metrics.csv")] == ["1"]


def test_resume_announces_every_change(long_run, tmp_path, capsys):
    # a typed --seed and --dropout: said, and the noise follows the new seed
    for extra, said in ((["--seed", "7"], "resume: --seed 7 (the run used 0)"),
                        (["--dropout", "0.2"], "resume: --dropout 0.2 (the run used 0.0)")):
        root = tmp_path / extra[0][2:]
        copy_run(long_run, root)
        capsys.readouterr()
        assert ddpm.main(["--train", "--resume", *dirs(root), *extra, "--epochs", "4"]) == 0
        assert said in capsys.readouterr().out
    same = tmp_path / "same"
    copy_run(long_run, same)
    assert ddpm.main(["--train", "--resume", *dirs(same), "--epochs", "4"]) == 0
    w = [ddpm.read_checkpoint(ddpm.newest_checkpoint(r / "ckpt"))["model"] for r in (same, tmp_path / "seed")]
    assert any(not torch.equal(w[0][k], w[1][k]) for k in w[0])


def test_resume_with_another_batch_size_or_data_goes_on_training(tmp_path, capsys):
    base = [*TRAIN, "--demo-images", "16", "--lr-schedule", "cosine", "--warmup-steps", "0"]
    # another batch size on a cosine schedule: the curve is counted in images, so it does not drop to 0
    root = tmp_path / "batch"
    assert ddpm.main([*base, *dirs(root), "--epochs", "4", "--max-steps", "5"]) == 0  # 4 steps per epoch
    capsys.readouterr()
    assert ddpm.main(["--train", "--resume", *dirs(root), "--batch-size", "2"]) == 0
    assert "resume: batch 2 (the run used 4); epoch 1 goes on at image 4 of its order" in capsys.readouterr().out
    lr = [(int(r["step"]), float(r["lr"])) for r in rows(root / "ckpt" / "metrics.csv")]
    assert lr[-1][0] == 5 + 6 + 2 * 8  # the other 12 images of epoch 1 in 6 steps, then epochs 2 and 3 of 8 steps
    assert all(v > 0 for _, v in lr) and lr[-1][1] < 0.01 * max(v for _, v in lr)  # never 0 before the end
    # a smaller folder with --resume-with-new-data: said, and it trains on
    folder = tmp_path / "data"
    faces(folder, n=8, seed=1)
    root = tmp_path / "data-run"
    assert ddpm.main([*base, "--data-folders", str(folder), *dirs(root), "--epochs", "3", "--max-steps", "3"]) == 0
    for p in sorted(folder.iterdir())[4:]:
        p.unlink()
    capsys.readouterr()
    assert ddpm.main(["--train", "--resume", *dirs(root), "--resume-with-new-data", "--epochs", "3"]) == 0
    out = capsys.readouterr().out
    assert "resume: the data changed (4 training images, the run had 8); epoch 1 ends here" in out
    assert ddpm.checkpoint_meta(ddpm.newest_checkpoint(root / "ckpt"))[0] == 4  # epoch 2: one step of 4 images
    capsys.readouterr()
    assert ddpm.main(["--train", "--resume", *dirs(root), "--resume-with-new-data", "--epochs", "3"]) == 0
    assert "nothing to do: the run is at step 4, epoch 3 of 3" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------
# the stored training state is validated like the model config
# ----------------------------------------------------------------------------------------------

def _edit(obj: dict, what: str) -> str:
    """Damage one field of a checkpoint dict; returns the field the error must name."""
    first = next(iter(obj["model"]))
    edits = {
        "ema_decay": lambda: (obj["train"].__setitem__("ema_decay", 5.0), "--ema-decay must be in [0, 1)"),
        "precision": lambda: (obj["train"].__setitem__("precision", "fp64"), "--precision must be one of"),
        "batch_size": lambda: (obj["train"].__setitem__("batch_size", 0), "--batch-size must be at least 1"),
        "lr": lambda: (obj["train"].__setitem__("lr", -1.0), "--lr must be a positive number up to 1"),
        "lr_type": lambda: (obj["train"].__setitem__("lr", "fast"), "--lr must be a number, got 'fast'"),
        "epoch": lambda: (obj.__setitem__("epoch", -1), "stored epoch must be an integer of 0 or more"),
        "step": lambda: (obj.__setitem__("step", 3.5), "stored step must be an integer"),
        "ema_nan": lambda: (obj["ema"][first].fill_(float("nan")), "NaN or infinite"),
        "ema_shape": lambda: (obj["ema"].__setitem__(first, torch.zeros(3)), "stored EMA does not fit"),
        "demo": lambda: (obj["data"].__setitem__("demo_images", 10 ** 9), "asks for 1000000000 demo images"),
        "optimizer": lambda: (obj["optimizer"]["state"][0].__setitem__("exp_avg", torch.zeros(2)), "optimizer state"),
        "optimizer_groups": lambda: (obj["optimizer"].__setitem__("param_groups", []), "optimizer state"),
        "rng": lambda: (obj["rng"]["torch"].__setitem__(0, torch.zeros(5, dtype=torch.uint8)), "RNG state"),
        "rng_type": lambda: (obj["rng"].__setitem__("torch", "seeded"), "RNG state"),
    }
    return edits[what]()[1]


@pytest.mark.parametrize("what", ["ema_decay", "precision", "batch_size", "lr", "lr_type", "epoch", "step", "ema_nan",
                                  "ema_shape", "demo", "optimizer", "optimizer_groups", "rng", "rng_type"])
def test_an_edited_training_state_is_one_line_naming_the_file_and_field(tiny_run, tmp_path, capsys, monkeypatch, what):
    obj = ddpm.read_checkpoint(tiny_run / "ckpt" / "ckpt-1.pth")
    message = _edit(obj, what)
    (tmp_path / "ckpt").mkdir()
    path = tmp_path / "ckpt" / "ckpt-1.pth"
    torch.save(obj, path)
    before = tree(tmp_path)
    monkeypatch.setattr(ddpm.Trainer, "__init__", lambda *a, **k: pytest.fail("training started"))
    capsys.readouterr()
    assert ddpm.main(["--train", "--resume", *dirs(tmp_path)]) == 2
    line = error_line(capsys)
    assert str(path) in line and message in line, line
    assert_kept(before, tmp_path)
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------
# smaller classes: odd places, odd flags, misleading messages
# ----------------------------------------------------------------------------------------------

def test_run_files_of_the_wrong_kind_are_one_line(tiny_run, tmp_path, capsys):
    for name in ("metrics.csv", "events.csv", "ckpt-3.pth"):
        root = tmp_path / name
        copy_run(tiny_run, root)
        (root / "ckpt" / name).unlink(missing_ok=True)
        (root / "ckpt" / name).mkdir()
        before = tree(root)
        capsys.readouterr()
        assert ddpm.main(["--train", "--resume", *dirs(root), "--epochs", "3"]) == 2
        line = error_line(capsys)
        assert f"{root / 'ckpt' / name} is not a regular file" in line, line
        assert_kept(before, root)


def test_picture_places_of_the_wrong_kind_leave_them_and_write_beside(tiny_run, tmp_path, capsys):
    out = tmp_path / "out"
    (out / "loss.png").mkdir(parents=True)
    (out / "denoise.gif").mkdir()
    assert ddpm.main([*TRAIN, *dirs(tmp_path), "--max-steps", "2"]) == 0
    assert (out / "train-2" / "loss.png").is_file() and (out / "loss.png").is_dir()
    assert sample(tiny_run / "ckpt", out, "--num-samples", "2", "--gif") == 0
    assert (out / "sample-2" / "denoise.gif").is_file() and (out / "denoise.gif").is_dir()


def test_a_metrics_row_that_is_not_a_number_is_kept_aside_not_fatal(tiny_run, tmp_path, capsys):
    for bad in ("abc", "1e5e5"):
        root = tmp_path / bad
        ckpt = copy_run(tiny_run, root)
        text = (ckpt / "metrics.csv").read_text().splitlines()
        cells = text[2].split(",")
        cells[3] = bad  # the loss of step 2
        (ckpt / "metrics.csv").write_text("\n".join(text[:2] + [",".join(cells)] + text[3:]) + "\n")
        damaged = (ckpt / "metrics.csv").read_bytes()
        capsys.readouterr()
        assert ddpm.main(["--train", "--resume", *dirs(root), "--epochs", "3"]) == 0
        out = capsys.readouterr().out
        assert "could not be read (row 3" in out and "a fresh log starts with its 2 good rows" in out
        kept = list(ckpt.glob("metrics.csv.corrupt-*"))
        assert len(kept) == 1 and kept[0].read_bytes() == damaged
        assert [r["step"] for r in rows(ckpt / "metrics.csv")] == ["1", "3", "4", "5", "6"]
        assert [r[0] for r in ddpm.read_metric_rows(ckpt / "metrics.csv", "loss")] == [1, 3, 4, 5, 6]  # loss.png's


def test_full_disks_and_memory_are_one_line_outside_training(tiny_run, tmp_path, capsys, monkeypatch):
    f = faces(tmp_path / "faces", n=2)
    disk_full_at(monkeypatch, "edit-invert-face1", step=0)
    capsys.readouterr()
    assert sample(tiny_run / "ckpt", tmp_path / "inv", "--invert", str(f / "face0.png"), str(f / "face1.png")) == 2
    line = error_line(capsys)
    assert "could not write" in line and "edit-invert-face1" in line and "No space left on device" in line
    monkeypatch.undo()
    # the lock's holder note cannot be written: the run goes on (the note is only for a refused run's message)
    disk_full_at(monkeypatch, ".lock.json", step=0)
    assert ddpm.main([*TRAIN, *dirs(tmp_path / "lock"), "--max-steps", "1"]) == 0
    monkeypatch.undo()
    # the CPU out of memory while sampling: the same line as the GPU's
    monkeypatch.setattr(ddpm.UNet, "forward", lambda *a, **k: (_ for _ in ()).throw(RuntimeError(
        "[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you tried to "
        "allocate 274877906944 bytes. Error code 12 (Cannot allocate memory)")))
    for flags in (["--num-samples", "2"], ["--init-images", str(f / "face0.png")]):
        assert sample(tiny_run / "ckpt", tmp_path / "oom", *flags) == 2
        assert "out of memory sampling batches" in error_line(capsys)
    assert not (tmp_path / "oom").exists() or not any((tmp_path / "oom").rglob("*.png"))


@pytest.mark.skipif(not hasattr(os, "mkfifo") or not hasattr(signal, "alarm"), reason="makes a FIFO")
def test_a_fifo_named_like_a_checkpoint_is_never_opened(tiny_run, tmp_path, capsys):
    root = tmp_path / "run"
    ckpt = copy_run(tiny_run, root)
    os.mkfifo(ckpt / "ckpt-3.pth")
    cases = [(["--loadckpt", str(ckpt), "--num-samples", "1", "--steps", "2", "--save-dir", str(tmp_path / "o")], 0, ""),
             (["--info", str(ckpt)], 0, ""),
             (["--train", "--resume", *dirs(root), "--epochs", "3"], 2, "ckpt-3.pth is not a regular file"),
             (["--loadckpt", str(ckpt / "ckpt-3.pth"), "--save-dir", str(tmp_path / "o2")], 2, "is not a regular file")]

    def blocked(signum, frame):
        raise AssertionError("opened the FIFO: blocked")
    old = signal.signal(signal.SIGALRM, blocked)
    try:
        for argv, code, message in cases:
            capsys.readouterr()
            signal.alarm(60)  # an open() of the FIFO would block here forever
            assert ddpm.main([*argv, "--device", "cpu"]) == code, argv
            signal.alarm(0)
            if message:
                assert message in error_line(capsys)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def test_flags_that_were_silently_ignored_or_odd_are_one_line(tiny_run, tmp_path, capsys):
    f = faces(tmp_path / "faces", n=2)
    ck = str(tiny_run / "ckpt")
    cases = [(["--loadckpt", ck, "--export", ""], "--export is empty"),
             (["--loadckpt", ck, "--export", "  "], "--export is empty"),
             (["--loadckpt", ck, "--init-images", str(f / "face0.png"), "--resample-jumps", "3"],
              "--resample-jumps redoes the steps of inpainting"),
             (["--loadckpt", ck, "--resample-jumps", "2"], "--resample-jumps goes with --init-images"),
             (["--loadckpt", ck, "--eval", "nll", "--nll-timesteps", "0"], "--nll-timesteps must be at least 2"),
             (["--loadckpt", ck, "--eval", "nll", "--nll-timesteps", "1"], "--nll-timesteps must be at least 2"),
             (["--loadckpt", ck, "--save-dir", ""], "--save-dir is empty"),
             (["--train", "--demo", "--ckpt-save-dir", ""], "--ckpt-save-dir is empty"),
             (["--train", "--demo", "--demo-images", str(10 ** 9)], "--demo-images must be from 1 to 1,000,000")]
    capsys.readouterr()
    for argv, message in cases:
        assert ddpm.main([*argv, "--device", "cpu"]) == 2, argv
        assert message in error_line(capsys), argv


def test_masks_that_do_not_fit_their_image_are_one_line(tiny_run, tmp_path, capsys):
    from PIL import Image

    f = faces(tmp_path / "faces", n=1)  # 8x8 images
    masks = {"size": Image.new("L", (16, 8), 255), "red": Image.new("RGB", (8, 8), (255, 0, 0)),
             "transparent": Image.new("LA", (8, 8), (255, 0)), "palette-alpha": Image.new("RGBA", (8, 8), (0, 0, 0, 10))}
    messages = {"size": "is 16x8 but its image", "red": "is in colour", "transparent": "has transparent pixels",
                "palette-alpha": "has transparent pixels"}
    before = tree(tmp_path)
    for name, img in masks.items():
        path = tmp_path / f"mask-{name}.png"
        img.save(path)
        capsys.readouterr()
        assert sample(tiny_run / "ckpt", tmp_path / "out", "--init-images", str(f / "face0.png"), "--mask", str(path)) == 2
        assert messages[name] in error_line(capsys), name
    assert_kept(before, tmp_path)
    assert not (tmp_path / "out").exists()


def test_interpolation_from_an_empty_or_broken_latent_is_one_line(tiny_run, tmp_path, capsys):
    good = tmp_path / "good.pt"
    torch.save(torch.randn(3, 8, 8), good)
    for name, z in (("zero", torch.zeros(3, 8, 8)), ("nan", torch.full((3, 8, 8), float("nan")))):
        torch.save(z, tmp_path / f"{name}.pt")
        capsys.readouterr()
        assert sample(tiny_run / "ckpt", tmp_path / "out", "--interpolate", str(good), str(tmp_path / f"{name}.pt")) == 2
        line = error_line(capsys)
        assert f"{name}.pt" in line and ("all zero" if name == "zero" else "not finite") in line
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.png"))


def test_data_folders_are_read_once_each_and_linked_sub_folders_are_followed(tmp_path, capsys):
    imgs = faces(tmp_path / "imgs", n=4)
    sub = faces(tmp_path / "more", n=2, seed=9)
    (imgs / "linked").symlink_to(sub, target_is_directory=True)
    (sub / "loop").symlink_to(imgs, target_is_directory=True)  # a link back up: not read twice
    capsys.readouterr()
    data = ddpm.load_images([imgs], 8)
    assert len(data) == 6  # 4 + the 2 of the linked folder
    for folders in ([imgs, imgs], [imgs, imgs / "linked"]):
        capsys.readouterr()
        assert len(ddpm.load_images(folders, 8)) == 6
        assert "files were found twice" in capsys.readouterr().out


def test_messages_name_the_right_flag_and_the_right_cause(tiny_run, tmp_path, capsys, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    for folder in (tmp_path / "missing", empty):
        capsys.readouterr()
        assert ddpm.main(["--loadckpt", str(tiny_run / "ckpt"), "--eval", "swd", "--eval-folders", str(folder),
                          "--num-samples", "2", "--device", "cpu"]) == 2
        line = error_line(capsys)
        assert "--eval-folders" in line and "--data-folders" not in line, line
    # two processes creating the same new folder: the one that comes second is not told it "cannot be created"
    real_mkdir = Path.mkdir

    def mkdir(self, *a, **k):
        if self.name == "race":
            real_mkdir(self, *a, **k)  # the other process got there first
            raise FileExistsError(errno.EEXIST, "File exists", str(self))
        return real_mkdir(self, *a, **k)
    monkeypatch.setattr(Path, "mkdir", mkdir)
    ddpm.check_writable(tmp_path / "race", "--ckpt-save-dir")
    ddpm.check_writable(tmp_path / "race" / "deeper", "--save-dir")


@pytest.mark.skipif(os.name != "posix", reason="sends SIGINT")
def test_two_ctrl_c_during_a_save_abort_with_130_not_a_full_disk(tmp_path, capsys, monkeypatch):
    real_save = torch.save
    sent = []

    def save(obj, f, *a, **k):
        class Writer:
            def write(self, b):
                if not sent:  # the two signals land while the checkpoint is being written
                    sent.append(1)
                    os.kill(os.getpid(), signal.SIGINT)
                    os.kill(os.getpid(), signal.SIGINT)
                return f.write(b)

            def flush(self):
                return f.flush()
        return real_save(obj, Writer(), *a, **k)
    monkeypatch.setattr(torch, "save", save)
    for k in range(2):
        sent.clear()
        root = tmp_path / str(k)
        assert ddpm.main([*TRAIN, *dirs(root), "--max-steps", "2" if k else "1"]) == 130
        err = capsys.readouterr().err
        assert "aborted" in err.splitlines()[-1] and "could not write" not in err
        assert not list((root / "ckpt").glob("ckpt-*.pth")) and not list((root / "ckpt").glob(".ckpt*"))
