"""Every message tells the truth: no traceback reaches the user, no result says one thing and did
another, and what is safe but surprising is said in one line. Each class through the command line
(ddpm.main in this process; subprocesses where two real processes are the point), checking the
exit status, the one line, and that what existed before is unchanged.
"""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ddpm
from conftest import (DDPM, MODEL, QUIET, SUBPROCESS_ENV, TINY_RUN, copy_run, dirs, disk_full_at, error_line, faces,
                      nan_losses, one_line, pixels, tree)


def sample(ckpt, out: Path, *flags) -> int:
    return ddpm.main(["--loadckpt", str(ckpt), "--device", "cpu", "--seed", "1", "--steps", "4", "--save-dir", str(out),
                      *flags])


def edited(ckpt: Path, path: Path, **changes) -> Path:
    """A copy of a checkpoint with some of its fields (or, as config=dict(...), its config's) changed."""
    obj = ddpm.read_checkpoint(ckpt)
    if "config" in changes:
        changes["config"] = {**obj["config"], **changes["config"]}
    torch.save({**obj, **changes}, path)
    return path


# ----------------------------------------------------------------------------------------------
# no traceback
# ----------------------------------------------------------------------------------------------

def test_a_full_disk_when_a_resumed_run_opens_its_logs_is_one_line(tiny_run, tmp_path, capsys, monkeypatch):
    copy_run(tiny_run, tmp_path)
    before = tree(tmp_path)
    disk_full_at(monkeypatch, "metrics.csv", step=0)
    assert ddpm.main([*TINY_RUN, *dirs(tmp_path), "--resume", "--max-steps", "4"]) == 2
    line = error_line(capsys)
    assert "could not write the run's logs in" in line and "No space left" in line and "free some disk space" in line
    assert tree(tmp_path) == before


@pytest.mark.parametrize("flags, message", [
    (["--lr", "1e300"], "--lr must be a positive number up to 1, got 1e+300"),
    (["--objective", "edm", "--edm-p-mean", "1e9"], "--edm-p-mean must be in [-10, 10]"),
    (["--edm-p-std", "1e300"], "--edm-p-std must be in (0, 10]"),
    (["--min-snr-gamma", "inf"], "--min-snr-gamma must be a positive number up to 1e6"),
    (["--timesteps", "1000000000"], "--timesteps must be from 2 to 100,000"),
])
def test_values_far_out_of_range_are_one_line(tmp_path, capsys, flags, message):
    assert ddpm.main([*TINY_RUN, *dirs(tmp_path), *flags]) == 2
    assert message in error_line(capsys)
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "out").exists()


def test_stored_fields_out_of_range_or_of_the_wrong_kind_are_one_line(tiny_run, tmp_path, capsys):
    ck = tiny_run / "ckpt" / "ckpt-1.pth"
    for changes, message in (({"config": {"timesteps": 10 ** 9}}, "--timesteps must be from 2 to 100,000"),
                             ({"config": {"channel_multiples": "12"}}, "channel_multiples must be a list of integers"),
                             ({"config": {"has_attn": "ft"}}, "has_attn must be a list of true/false")):
        bad = edited(ck, tmp_path / "bad.pth", **changes)
        for argv in (["--info", str(bad)], ["--loadckpt", str(bad), "--device", "cpu", "--save-dir", str(tmp_path / "o")]):
            assert ddpm.main(argv) == 2
            line = error_line(capsys)
            assert line.startswith(f"ddpm.py: error: {bad}: the stored model config is invalid") and message in line
    assert not (tmp_path / "o").exists()
    # --info shows a last loss that is not a number for what it is, and --resume refuses it
    bad = edited(ck, tmp_path / "loss.pth", last_loss="abc")
    assert ddpm.main(["--info", str(bad)]) == 0
    assert "last loss: 'abc' (not a number: the file was edited or is damaged)" in capsys.readouterr().out
    assert ddpm.main([*TINY_RUN, *dirs(tmp_path), "--resume", "--loadckpt", str(bad)]) == 2
    assert "the stored last loss must be a finite number, got 'abc'" in error_line(capsys)


def test_memory_running_out_while_drawing_the_runs_pictures_is_one_line(tiny_run, tmp_path, capsys, monkeypatch):
    copy_run(tiny_run, tmp_path)
    before = tree(tmp_path / "ckpt")

    def no_memory(*a, **k):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")
    monkeypatch.setattr(ddpm, "reverse_strip", no_memory)
    # the run was trained with --no-run-pictures: a resume keeps that, unless --run-pictures is typed
    assert ddpm.main([*TINY_RUN, *dirs(tmp_path), "--resume", "--max-steps", "4", "--run-pictures"]) == 2
    line = error_line(capsys)
    assert "out of memory drawing run-before.png; free memory, or leave the run's pictures out" in line
    assert tree(tmp_path / "ckpt") == before  # nothing trained, nothing written


# ----------------------------------------------------------------------------------------------
# a result says what was done
# ----------------------------------------------------------------------------------------------

def test_a_folder_another_command_is_writing_into_is_left_to_it(tiny_run, tmp_path, capsys):
    from filelock import FileLock

    out = tmp_path / "out"
    out.mkdir()
    held = FileLock(str(out / ddpm.OUTPUT_LOCK), timeout=0)
    held.acquire()  # another command is writing into out/ now, and has written nothing yet
    try:
        assert sample(tiny_run / "ckpt", out, "--num-samples", "2") == 0
    finally:
        held.release()
    assert f"another command is writing into {out} now; writing to {out / 'sample-2'} instead" in capsys.readouterr().out
    assert sorted(p.name for p in (out / "sample-2").iterdir()) == ["ddpm-0.png", "ddpm-1.png", "ddpm-all.png"]
    assert not list(out.glob("*.png"))


def test_a_result_whose_name_appears_meanwhile_is_kept_under_another(tiny_run, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    real = ddpm.atomic_write

    def racing(path, write, replace_existing=True):  # another program writes ddpm-1.png while this one samples
        if Path(path).name == "ddpm-1.png" and not Path(path).exists():
            Path(path).write_bytes(b"theirs")
        return real(path, write, replace_existing)
    monkeypatch.setattr(ddpm, "atomic_write", racing)
    assert sample(tiny_run / "ckpt", out, "--num-samples", "2") == 0
    assert f"note: {out / 'ddpm-1.png'} appeared while this command ran" in capsys.readouterr().out
    assert (out / "ddpm-1.png").read_bytes() == b"theirs"
    assert pixels(out / "ddpm-1-2.png").shape == (8, 8, 3)


def test_two_sampling_commands_started_together_write_into_two_folders(tiny_run, tmp_path):
    out = tmp_path / "out"
    argv = [sys.executable, DDPM, "--loadckpt", str(tiny_run / "ckpt"), "--device", "cpu", "--steps", "10",
            "--num-samples", "4", "--save-dir", str(out)]
    procs = [subprocess.Popen([*argv, "--seed", str(k)], env=SUBPROCESS_ENV, stdout=subprocess.PIPE, text=True)
             for k in (1, 2)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    folders = sorted({Path(line.split(" images to ")[1].split(" in ")[0]) for o in outs for line in o.splitlines()
                      if line.startswith("wrote ")})
    assert len(folders) == 2 and out in folders  # one wrote in place, the other in a subfolder of its own
    for f in folders:
        assert sorted(p.name for p in f.glob("ddpm-*.png")) == sorted([f"ddpm-{i}.png" for i in range(4)] + ["ddpm-all.png"])


def test_plot_says_what_it_drew_and_why_not(tiny_run, tmp_path, capsys):
    ckpt = copy_run(tiny_run, tmp_path)
    lines = (ckpt / "metrics.csv").read_text().splitlines()
    (ckpt / "metrics.csv").write_text("\n".join(lines[:2]) + "\n")  # one row
    assert ddpm.main(["--info", str(ckpt), "--plot", "--save-dir", str(tmp_path / "p")]) == 0
    out = capsys.readouterr().out
    assert "note: loss.png not drawn: metrics.csv has 1 row with a loss (2 are needed)" in out and "wrote" not in out
    header = lines[0].split(",")
    swd = header.index("swd")
    rows = [r.split(",") for r in lines[1:]]
    for r, v in zip(rows, ("abc", "31.5", "30.2")):
        r[swd] = v
    (ckpt / "metrics.csv").write_text("\n".join([lines[0]] + [",".join(r) for r in rows]) + "\n")
    assert ddpm.main(["--info", str(ckpt), "--plot", "--save-dir", str(tmp_path / "q")]) == 0
    out = capsys.readouterr().out
    assert f"wrote {tmp_path / 'q' / 'loss.png'}" in out
    assert f"wrote {tmp_path / 'q' / 'quality.png'} (1 rows hold no number there (e.g. step 1))" in out


def test_a_run_that_trained_nothing_is_an_error(tmp_path, capsys, monkeypatch):
    nan_losses(monkeypatch, lambda k: True)
    assert ddpm.main([*TINY_RUN, *dirs(tmp_path), "--max-steps", "3"]) == 1
    err = one_line(capsys.readouterr().err)
    assert "training stopped: every one of the 3 steps was skipped" in err and "nothing was trained" in err


@pytest.mark.parametrize("weight", ["1e9", "10.5", "-1", "nan"])
def test_a_guidance_weight_out_of_its_range_is_one_line(tiny_run, tmp_path, capsys, weight):
    ck = tiny_run / "ckpt"
    assert sample(ck, tmp_path / "o", "--guide", str(ck / "ckpt-0.pth"), "--guidance", weight) == 2
    assert "--guidance must be from 0 to 10" in error_line(capsys)
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------------------------
# safe, and said
# ----------------------------------------------------------------------------------------------

def test_more_steps_than_the_grid_has_are_said(tiny_run, tmp_path, capsys):
    assert sample(tiny_run / "ckpt", tmp_path / "o", "--sampler", "ddpm", "--steps", "10000", "--num-samples", "1") == 0
    out, err = capsys.readouterr()
    assert "--steps 10000: ddpm on the uniform grid of this model (T = 50) makes 50 model calls, its most" in err
    assert "(ddpm, 50 model calls, seed 1)" in out


def test_a_guide_that_is_the_model_itself_is_said(tiny_run, tmp_path, capsys):
    ck = tiny_run / "ckpt" / "ckpt-1.pth"
    assert sample(ck, tmp_path / "o", "--guide", str(ck), "--num-samples", "1") == 0
    assert "has the model's own weights" in capsys.readouterr().err
    assert sample(ck, tmp_path / "o2", "--guide", str(tiny_run / "ckpt" / "ckpt-0.pth"), "--num-samples", "1") == 0
    assert "own weights" not in capsys.readouterr().err


def test_a_save_dir_inside_the_training_data_and_low_precision_on_the_cpu_are_said(tmp_path, capsys):
    data = faces(tmp_path / "data", 8)
    assert ddpm.main(["--train", "--data-folders", str(data), *MODEL, "--batch-size", "4", *QUIET, "--max-steps", "1",
                      "--ckpt-save-dir", str(tmp_path / "ckpt"), "--save-dir", str(data / "out"),
                      "--precision", "bf16"]) == 0
    err = capsys.readouterr().err
    assert f"--save-dir {data / 'out'} is inside the training folder {data}" in err
    assert "--precision bf16 on the CPU" in err


def test_grey_masks_and_odd_fid_weights_are_said(tiny_run, tmp_path, capsys):
    from PIL import Image

    img = faces(tmp_path / "img", 1) / "face0.png"
    Image.new("L", (8, 8), 100).save(tmp_path / "grey.png")
    assert sample(tiny_run / "ckpt", tmp_path / "o", "--init-images", str(img), "--mask", str(tmp_path / "grey.png")) == 0
    assert "100% of the pixels of --mask" in capsys.readouterr().out
    (tmp_path / "weights").mkdir()
    assert ddpm.main(["--loadckpt", str(tiny_run / "ckpt"), "--eval", "fid", "--fid-weights", str(tmp_path / "weights"),
                      "--device", "cpu"]) == 2
    assert "--fid-weights" in error_line(capsys)  # pytorch-fid is missing, or: is a folder


def test_a_folder_of_another_runs_single_checkpoint_is_counted_right(tiny_run, tmp_path, capsys):
    other = tmp_path / "ckpt"
    other.mkdir()
    import shutil

    shutil.copy(tiny_run / "ckpt" / "ckpt-1.pth", other / "ckpt-1.pth")
    shutil.copy(tiny_run / "ckpt" / "ckpt-1.pth", other / "best.pth")
    before = tree(tmp_path)
    assert ddpm.main([*TINY_RUN, *dirs(tmp_path), "--seed", "5"]) == 2
    line = error_line(capsys)
    assert f"{other} holds 1 checkpoint and best.pth of another run" in line and "--resume" in line
    assert tree(tmp_path) == before


def test_overwrite_points_the_old_runs_events_at_its_moved_pictures(tmp_path, capsys):
    train = [*TINY_RUN[:-len(QUIET)], "--device", "cpu", "--no-run-pictures", "--sample-every", "1", "--max-steps", "2"]
    assert ddpm.main([*train, *dirs(tmp_path)]) == 0
    assert ddpm.main([*train, *dirs(tmp_path), "--seed", "7", "--overwrite"]) == 0
    old = next((tmp_path / "ckpt").glob("old-*"))
    previews = [r for r in ddpm.csv.DictReader(open(old / "events.csv")) if r["event"] == "preview"]
    assert previews and all(Path(r["path"]).exists() and "/old-" in r["path"] for r in previews)
    new = (tmp_path / "out" / "preview" / "step-0000001.png").read_bytes()
    assert all(Path(r["path"]).read_bytes() != new for r in previews)
