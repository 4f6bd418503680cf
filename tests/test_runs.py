"""Run observability and hand-over: metrics.csv / events.csv, resume, --time-budget, previews,
TensorBoard, loss.png, --info and the safetensors export.

Most runs call ddpm.main in this process (cheaper than a new interpreter on two cores), with
absolute --ckpt-save-dir / --save-dir so the working directory does not matter; --time-budget
goes through a subprocess because it is measured on the wall clock.
"""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import ddpm
from conftest import MODEL, ROOT as REPO, pixels, rows

TINY = [*MODEL, "--batch-size", "4", "--device", "cpu"]
# 16 demo faces, batch 4: 4 steps per epoch
TRAIN = ["--train", "--demo", "--demo-images", "16", *TINY, "--warmup-steps", "0", "--lr-schedule", "constant",
         "--sampler", "dpm++", "--steps", "10"]
QUIET = ["--no-run-pictures", "--sample-every", "0", "--eval-every", "0"]


def dirs(root: Path):
    return ["--ckpt-save-dir", str(root / "ckpt"), "--save-dir", str(root / "output")]


def train(root: Path, *extra) -> int:
    return ddpm.main([*TRAIN, *dirs(root), *extra])


@pytest.fixture(scope="module")
def run6(tmp_path_factory):
    """A finished run of 6 steps, logged every step: checkpoints at steps 4 (epoch end, ckpt-0)
    and 6 (--max-steps, ckpt-1). Tests that change it work on a copy."""
    root = tmp_path_factory.mktemp("run6")
    assert train(root, "--max-steps", "6", "--log-every", "1", "--seed", "0", *QUIET) == 0
    return root


# ----------------------------------------------------------------------------------------------
# metrics.csv, events.csv and resume
# ----------------------------------------------------------------------------------------------

def test_resume_continues_metrics_without_duplicate_steps(run6, tmp_path):
    shutil.copytree(run6 / "ckpt", tmp_path / "ckpt")
    first = rows(tmp_path / "ckpt" / "metrics.csv")
    assert [int(r["step"]) for r in first] == list(range(1, 7))
    # as if the run had gone on past its last checkpoint (step 6) and been killed: rows 7-8 are stale
    with open(tmp_path / "ckpt" / "metrics.csv", "a") as f:
        f.write("7,1,28,99.0,0.001,1.0,1.0\n8,1,32,99.0,0.001,1.0,1.0\n")
    with open(tmp_path / "ckpt" / "events.csv", "a") as f:
        f.write("8,checkpoint,stale.pth,1.0\n")
    assert train(tmp_path, "--resume", "--max-steps", "10", "--log-every", "1", *QUIET) == 0
    metrics = rows(tmp_path / "ckpt" / "metrics.csv")
    assert list(metrics[0].keys()) == ["step", "epoch", "images_seen", "loss", "skipped", "loss_fine", "loss_detail",
                                       "loss_shape", "loss_coarse", "lr", "img_per_s", "swd", "swd_levels",
                                       "colour_mean", "colour_std", "wall_time"]
    steps = [int(r["step"]) for r in metrics]
    assert steps == list(range(1, 11))
    assert metrics[:6] == first  # continued, not rewritten
    for r in metrics:
        s = int(r["step"])
        assert int(r["images_seen"]) == 4 * s
        assert int(r["epoch"]) == (s - 1) // 4  # the epoch the step belongs to
        assert float(r["lr"]) == pytest.approx(1e-3)  # the --demo preset
        assert 0 < float(r["loss"]) < 10 and float(r["img_per_s"]) > 0
    walls = [float(r["wall_time"]) for r in metrics]
    assert walls == sorted(walls)

    events = rows(tmp_path / "ckpt" / "events.csv")
    ckpts = [(int(e["step"]), Path(e["path"]).name) for e in events if e["event"] == "checkpoint"]
    # epoch ends at steps 4 and 8 (ckpt-{(epoch - 1) % 5}), stops at 6 and 10 (ckpt-{epoch % 5})
    assert ckpts == [(4, "ckpt-0.pth"), (6, "ckpt-1.pth"), (8, "ckpt-1.pth"), (10, "ckpt-2.pth")]
    last = {}
    for step, name in ckpts:
        last[name] = step
    for name, step in last.items():
        assert ddpm.checkpoint_meta(tmp_path / "ckpt" / name)[0] == step


def test_metrics_loss_is_the_mean_since_the_last_row(run6, tmp_path):
    """The same run logged every step and every 2 steps: each row of the second is the mean of two."""
    assert train(tmp_path, "--max-steps", "4", "--log-every", "2", "--seed", "0", *QUIET) == 0
    every = {int(r["step"]): float(r["loss"]) for r in rows(run6 / "ckpt" / "metrics.csv")}
    pairs = rows(tmp_path / "ckpt" / "metrics.csv")
    assert [int(r["step"]) for r in pairs] == [2, 4]
    for r in pairs:
        s = int(r["step"])
        assert float(r["loss"]) == pytest.approx((every[s - 1] + every[s]) / 2, abs=2e-6)


# ----------------------------------------------------------------------------------------------
# --time-budget
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, seconds", [("2h", 7200), ("90m", 5400), ("45s", 45), ("1h30m", 5400),
                                           ("10", 10), ("1.5h", 5400), (" 2H ", 7200)])
def test_parse_duration(text, seconds):
    assert ddpm.parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["soon", "", "5x", "-5s", "h", "1h 30m", "1h-30m"])
def test_parse_duration_rejects(bad, capsys):
    with pytest.raises(SystemExit) as e:
        ddpm.main(["--train", "--demo", f"--time-budget={bad}"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--time-budget" in err and "duration" in err


def test_time_budget_stops_cleanly(tmp_path):
    """The budget counts from the start of main (not the interpreter's start, which takes seconds
    here), so the launcher notes when main begins; the subprocess's wall time is measured too."""
    budget = 5
    launcher = ("import sys, time; sys.path.insert(0, sys.argv.pop(1)); import ddpm; "
                "print('main-start', repr(time.time()), file=sys.stderr, flush=True); sys.exit(ddpm.main(sys.argv[1:]))")
    cmd = [sys.executable, "-c", launcher, str(REPO), *TRAIN, "--epochs", "100000", "--time-budget", f"{budget}s",
           "--log-every", "1", "--sample-every", "0", "--num-samples", "4", "--seed", "0"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    t0 = time.monotonic()
    p = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    wall, end = time.monotonic() - t0, time.time()
    assert p.returncode == 0, p.stderr
    start = float(p.stderr.split("main-start ")[1].split()[0])
    assert wall > budget - 1
    assert budget - 1 < end - start < budget + 20, end - start  # stop, save and the final pictures included
    assert "stopped (time budget)" in p.stdout
    assert "time left" in p.stdout  # the progress display counts down
    events = [e for e in rows(tmp_path / "ckpt" / "events.csv") if e["event"] == "checkpoint"]
    assert budget - 0.01 <= float(events[-1]["wall_time"]) - start < budget + 15  # saved once the budget ran out
    ckpt = ddpm.newest_checkpoint(tmp_path / "ckpt")
    model = ddpm.load_model(ckpt)
    metrics = rows(tmp_path / "ckpt" / "metrics.csv")
    assert model.source.step == int(metrics[-1]["step"]) > 0  # saved at the step it stopped
    assert ddpm.read_checkpoint(ckpt)["epoch"] < 100000
    # the final grid: 4 images of 8x8 in make_grid's layout (padding 2), enlarged 2x
    assert pixels(tmp_path / "output" / "final-grid.png").shape == (2 * 12, 2 * 42, 3)


# ----------------------------------------------------------------------------------------------
# --info
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("which, name, step, epoch", [("ckpt", "ckpt-1.pth", 6, 1),  # a folder: its newest
                                                     ("ckpt/ckpt-0.pth", "ckpt-0.pth", 4, 1)])
def test_info_of_a_checkpoint(run6, which, name, step, epoch, capsys):
    path = ddpm.resolve_checkpoint(run6 / which)
    assert path.name == name
    capsys.readouterr()
    assert ddpm.main(["--info", str(run6 / which)]) == 0
    out = capsys.readouterr().out
    cfg = ddpm.ModelConfig(3, 8, 32, (1, 2), (False, True), 1, 50)
    n = sum(p.numel() for p in ddpm.UNet.from_config(cfg).parameters())
    last = float(rows(run6 / "ckpt" / "metrics.csv")[step - 1]["loss"])  # the row of that step
    assert str(path) in out
    assert f"step: {step} |" in out and f"epoch: {epoch} |" in out and f"images seen: {4 * step} |" in out
    assert f"last loss: {last:.6f}" in out
    assert "EMA: yes" in out and f"format version {ddpm.FORMAT_VERSION}" in out
    assert "img_size=8" in out and "num_channels=32" in out and "timesteps=50" in out
    assert f"parameters: {n / 1e6:.2f}M" in out
    assert f"file: {path.stat().st_size / 2**20:.1f} MiB" in out


def test_info_of_an_original_format_file(tmp_path, capsys):
    net = ddpm.GaussianDiffusion(ddpm.UNet(3, 32, (1, 2), (False, True), 1), 50)
    state = net.state_dict()
    assert all(k.startswith("eps_model.") for k in state)
    torch.save(state, tmp_path / "orig.pth")
    assert ddpm.main(["--info", str(tmp_path / "orig.pth")]) == 0
    out = capsys.readouterr().out
    assert "original script" in out
    assert "step, epoch, images seen, last loss: unknown" in out
    assert "config: unknown" in out and "img_channels=3, num_channels=32" in out
    assert "EMA: no" in out
    assert f"parameters: {sum(v.numel() for v in state.values()) / 1e6:.2f}M" in out


def test_info_of_a_missing_file_is_one_line(tmp_path, capsys):
    assert ddpm.main(["--info", str(tmp_path / "nope.pth")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "does not exist" in err


# ----------------------------------------------------------------------------------------------
# --export (safetensors)
# ----------------------------------------------------------------------------------------------

def test_export_safetensors_samples_like_the_checkpoint(run6, tmp_path, capsys):
    pytest.importorskip("safetensors")
    from safetensors import safe_open
    from safetensors.torch import load_file

    ckpt = ddpm.newest_checkpoint(run6 / "ckpt")
    obj = torch.load(ckpt, map_location="cpu", weights_only=True)
    ema, raw = tmp_path / "ema.safetensors", tmp_path / "raw.safetensors"
    assert ddpm.main(["--loadckpt", str(ckpt), "--export", str(ema)]) == 0
    assert ddpm.main(["--loadckpt", str(ckpt), "--export", str(raw), "--no-ema"]) == 0

    # the tensors: EMA by default, raw with --no-ema, bitwise
    for path, want in ((ema, obj["ema"]), (raw, obj["model"])):
        got = load_file(str(path))
        assert set(got) == set(want)
        assert all(torch.equal(got[k], want[k]) for k in want)
    assert not all(torch.equal(obj["ema"][k], obj["model"][k]) for k in obj["ema"])  # the test can tell them apart
    with safe_open(str(ema), framework="pt") as f:
        meta = f.metadata()
    assert json.loads(meta["config"]) == obj["config"] and meta["step"] == "6" and meta["weights"] == "ema"

    # load_model reads it, and it samples exactly like the checkpoint's EMA weights
    rt = ddpm.Runtime(torch.device("cpu"), "fp32")
    a = ddpm.generate(ddpm.load_model(ema), rt, [0, 1, 2], seed=4, spec=ddpm.SampleSpec(steps=3), show_progress=False)
    b = ddpm.generate(ddpm.load_model(ckpt), rt, [0, 1, 2], seed=4, spec=ddpm.SampleSpec(steps=3), show_progress=False)
    assert torch.equal(a, b)

    # and so does the sampling command (--loadckpt accepts the file): same PNG files, byte for byte
    for src, out in ((ckpt, "pth"), (ema, "st")):
        assert ddpm.main(["--loadckpt", str(src), "--batch-size", "3", "--steps", "3", "--seed", "0",
                          "--device", "cpu", "--save-dir", str(tmp_path / out)]) == 0
    for name in ("ddpm-0.png", "ddpm-1.png", "ddpm-2.png", "ddpm-all.png"):
        assert (tmp_path / "st" / name).read_bytes() == (tmp_path / "pth" / name).read_bytes()

    assert f"model: {ema} (step 6, EMA weights)" in capsys.readouterr().out  # the sampling log of the export

    # --info on the export knows its step and that the weights are the EMA; so does a re-export
    assert ddpm.main(["--info", str(ema)]) == 0
    out = capsys.readouterr().out
    assert "step: 6 |" in out and "exported ema weights" in out
    again = tmp_path / "again.safetensors"
    assert ddpm.main(["--loadckpt", str(ema), "--export", str(again)]) == 0
    with safe_open(str(again), framework="pt") as f:
        assert f.metadata()["weights"] == "ema" and f.metadata()["step"] == "6"
    assert all(torch.equal(v, obj["ema"][k]) for k, v in load_file(str(again)).items())


def test_resume_from_an_export_is_one_line(run6, tmp_path, capsys):
    pytest.importorskip("safetensors")
    st = tmp_path / "m.safetensors"
    assert ddpm.main(["--loadckpt", str(run6 / "ckpt"), "--export", str(st)]) == 0
    capsys.readouterr()
    rc = ddpm.main([*TRAIN, *dirs(tmp_path), "--resume", "--loadckpt", str(st), "--max-steps", "5", *QUIET])
    assert rc == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "resume" in err


# ----------------------------------------------------------------------------------------------
# TensorBoard and loss.png
# ----------------------------------------------------------------------------------------------

def test_tensorboard_logs_scalars_and_previews(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    args = ["--log-every", "1", "--sample-every", "2", "--tensorboard", "--no-run-pictures", "--seed", "0"]
    assert train(tmp_path, "--max-steps", "2", *args) == 0
    assert train(tmp_path, "--max-steps", "3", "--resume", *args) == 0  # the resumed run keeps step 2
    tb = tmp_path / "ckpt" / "tensorboard"
    assert list(tb.glob("events.out.tfevents.*"))
    acc = EventAccumulator(str(tb))
    acc.Reload()
    loss = acc.Scalars("train/loss")
    metrics = rows(tmp_path / "ckpt" / "metrics.csv")
    assert [e.step for e in loss] == [1, 2, 3]
    assert [e.value for e in loss] == pytest.approx([float(r["loss"]) for r in metrics], abs=1e-5)
    assert {"train/lr", "train/img_per_s"} <= set(acc.Tags()["scalars"])
    images = acc.Images("preview")
    assert [e.step for e in images] == [2] and (images[0].width, images[0].height) == (42, 42)


def test_tensorboard_missing_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    assert train(tmp_path, "--max-steps", "2", "--tensorboard", *QUIET) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "pip install tensorboard" in err
    assert not (tmp_path / "ckpt").exists()  # refused before anything was written


def test_loss_png_after_training(run6):
    pytest.importorskip("matplotlib")
    from PIL import Image

    with Image.open(run6 / "output" / "loss.png") as im:
        assert im.format == "PNG" and im.width > 100 and im.height > 100


def test_loss_png_without_matplotlib_is_a_note(run6, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    ddpm.write_curve(run6 / "ckpt" / "metrics.csv", tmp_path / "loss.png", "loss")
    assert not (tmp_path / "loss.png").exists()
    assert "pip install matplotlib" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------
# Preview grids
# ----------------------------------------------------------------------------------------------

def test_preview_grids_every_n_steps_and_reproducible(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    assert train(a, "--max-steps", "4", "--sample-every", "2", "--seed", "0", "--no-run-pictures") == 0
    prev = a / "output" / "preview"
    assert sorted(p.name for p in prev.iterdir()) == ["step-0000002.png", "step-0000004.png"]
    g2, g4 = pixels(prev / "step-0000002.png"), pixels(prev / "step-0000004.png")
    # 16 images of 8x8 in a 4x4 make_grid (padding 2): 4 * (8 + 2) + 2 = 42, shown 2x for images <= 32 px
    assert g2.shape == g4.shape == (84, 84, 3)
    events = [(int(e["step"]), e["event"], Path(e["path"]).name) for e in rows(a / "ckpt" / "events.csv")]
    assert [(s, n) for s, ev, n in events if ev == "preview"] == [(2, "step-0000002.png"), (4, "step-0000004.png")]

    # the same seed gives the same preview at the same step; another seed does not
    assert train(b, "--max-steps", "2", "--sample-every", "2", "--seed", "0", "--no-run-pictures") == 0
    assert train(c, "--max-steps", "2", "--sample-every", "2", "--seed", "1", "--no-run-pictures") == 0
    assert (b / "output" / "preview" / "step-0000002.png").read_bytes() == (prev / "step-0000002.png").read_bytes()
    assert not (pixels(c / "output" / "preview" / "step-0000002.png") == g2).all()
