"""The user's two commands end to end, `python ddpm.py --train --data-folders data/faces` and
`python ddpm.py --loadckpt ckpt/ckpt-0.pth --batch-size 4`, plus the hand-over between them:
checkpoint rotation, picking the newest checkpoint, seeds, resume, fine-tune and --demo.

The two main commands run as subprocesses in a tmp folder (relative paths, as typed); the
variations call ddpm.main in this process, which is much cheaper on two cores.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import ddpm
from conftest import DDPM, MODEL, TINY_CFG, pixels, rows

CFG = TINY_CFG
N_FACES = 8  # batch 4: 2 steps per epoch


def cli(cwd: Path, *args, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, DDPM, *args], cwd=cwd, env=env, capture_output=True, text=True,
                       timeout=timeout)
    assert p.returncode == 0, f"exit {p.returncode}\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}"
    return p


def write_faces(folder: Path, n: int = N_FACES) -> Path:
    """n small RGB PNGs (12x10: resized and centre-cropped to 8x8 when loaded)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:10, 0:12]
    for i in range(n):
        c = rng.integers(0, 256, 3)
        img = np.clip(c[None, None, :] * 0.5 + (xx[..., None] * 10 + yy[..., None] * 7 * (i % 3))
                      + rng.integers(0, 40, (10, 12, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(folder / f"face{i:02d}.png")
    return folder


def step_of(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=True)["step"])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """`python ddpm.py --train --data-folders data/faces` (tiny model, 2 epochs), then sampling
    `python ddpm.py --loadckpt ckpt/ckpt-0.pth --batch-size 4 --steps 3`, in one working folder."""
    root = tmp_path_factory.mktemp("cli")
    write_faces(root / "data" / "faces")
    cli(root, "--train", "--data-folders", "data/faces", *MODEL, "--batch-size", "4", "--epochs", "2",
        "--seed", "0", "--device", "cpu")
    cli(root, "--loadckpt", "ckpt/ckpt-0.pth", "--batch-size", "4", "--steps", "3", "--seed", "0",
        "--device", "cpu")
    return root


# ----------------------------------------------------------------------------------------------
# The two commands
# ----------------------------------------------------------------------------------------------

def test_train_writes_rotating_checkpoints_and_run_pictures(trained):
    ckpt = trained / "ckpt"
    assert sorted(p.name for p in ckpt.glob("*.pth")) == ["ckpt-0.pth", "ckpt-1.pth"]
    assert step_of(ckpt / "ckpt-0.pth") == 2 and step_of(ckpt / "ckpt-1.pth") == 4  # after epochs 1 and 2
    out = trained / "output"
    # run-before/after: 8 rows of 8x8 images (x_T ... x_0 strips), enlarged 2x
    for name in ("run-before.png", "run-after.png"):
        h, w = pixels(out / name).shape[:2]
        assert h == 8 * 8 * 2 and w % 16 == 0 and w >= 3 * 16
    # final grid: 64 images of 8x8, make_grid(nrow=8, padding=2): 8 * (8 + 2) + 2 = 82, enlarged 2x
    assert pixels(out / "final-grid.png").shape == (164, 164, 3)


def test_sampling_writes_images_and_the_original_grid(trained):
    out = trained / "output"
    imgs = [pixels(out / f"ddpm-{i}.png") for i in range(4)]
    assert all(im.shape == (8, 8, 3) for im in imgs)
    assert not (out / "ddpm-4.png").exists()
    grid = pixels(out / "ddpm-all.png")
    # torchvision make_grid, nrow 8, padding 2, pad value 0 in [-1, 1] (grey 128): 4 images in one row
    assert grid.shape == (8 + 4, 4 * (8 + 2) + 2, 3)
    for i, im in enumerate(imgs):
        x = 2 + i * 10
        assert (grid[2:10, x:x + 8] == im).all()
    assert (grid[0:2] == 128).all() and (grid[:, 0:2] == 128).all()


def test_sampling_from_a_checkpoint_equals_the_live_model(trained):
    """No model flags are needed: load_model(path) + generate gives the CLI's PNGs, and so does a
    model built by hand from the flags, holding the checkpoint's EMA weights."""
    path = trained / "ckpt" / "ckpt-0.pth"
    rt = ddpm.Runtime(torch.device("cpu"), "fp32")
    want = np.stack([pixels(trained / "output" / f"ddpm-{i}.png") for i in range(4)])  # (4, H, W, C)

    loaded = ddpm.load_model(path)
    assert loaded.config == CFG  # from the checkpoint alone
    got = ddpm.generate(loaded, rt, [0, 1, 2, 3], seed=0, spec=ddpm.SampleSpec(steps=3), batch_size=4,
                        show_progress=False)
    assert (got.permute(0, 2, 3, 1).numpy() == want).all()

    by_hand = ddpm.GaussianDiffusion(ddpm.UNet(3, 32, (1, 2), (False, True), 1, time_cond="scale-shift",
                                               norm_groups=CFG.norm_groups),
                                     50, config=CFG)  # the schedule and objective are the config's
    by_hand.load_state_dict(torch.load(path, map_location="cpu", weights_only=True)["ema"])
    by_hand.eval()
    by_hand.config = CFG  # generate reads the image shape from it
    got2 = ddpm.generate(by_hand, rt, [0, 1, 2, 3], seed=0, spec=ddpm.SampleSpec(steps=3), batch_size=4,
                         show_progress=False)
    assert torch.equal(got2, got)
    # one image alone (another batch size) is the same image
    one = ddpm.generate(loaded, rt, [2], seed=0, spec=ddpm.SampleSpec(steps=3), batch_size=1, show_progress=False)
    assert torch.equal(one[0], got[2])


def test_seed_zero_is_a_real_seed(trained, tmp_path):
    """--seed 0 here gives the files of the subprocess's --seed 0 run; --seed 1 gives others."""
    def sample(seed, out):
        assert ddpm.main(["--loadckpt", str(trained / "ckpt" / "ckpt-0.pth"), "--batch-size", "4", "--steps", "3",
                          "--seed", str(seed), "--device", "cpu", "--save-dir", str(tmp_path / out)]) == 0
        return [(tmp_path / out / f"ddpm-{i}.png").read_bytes() for i in range(4)]

    first = [(trained / "output" / f"ddpm-{i}.png").read_bytes() for i in range(4)]
    assert sample(0, "a") == first
    assert all(x != y for x, y in zip(first, sample(1, "b")))


# ----------------------------------------------------------------------------------------------
# Checkpoint rotation and the newest checkpoint
# ----------------------------------------------------------------------------------------------

def test_six_epochs_leave_five_checkpoints_newest_in_ckpt_0(tmp_path):
    faces = write_faces(tmp_path / "faces")
    assert ddpm.main(["--train", "--data-folders", str(faces), *MODEL, "--batch-size", str(N_FACES), "--epochs", "6",
                      "--seed", "0", "--device", "cpu", "--no-run-pictures", "--sample-every", "0",
                      "--ckpt-save-dir", str(tmp_path / "ckpt"), "--save-dir", str(tmp_path / "out")]) == 0
    ckpt = tmp_path / "ckpt"
    assert sorted(p.name for p in ckpt.glob("*.pth")) == [f"ckpt-{k}.pth" for k in range(5)]
    # one step per epoch; epoch e (1..6) is saved to ckpt-{(e - 1) % 5}: ckpt-0 holds epoch 6
    for k in range(5):
        obj = torch.load(ckpt / f"ckpt-{k}.pth", map_location="cpu", weights_only=True)
        e = 6 if k == 0 else k + 1
        assert (obj["epoch"], obj["step"]) == (e, e)
    events = [(int(e["step"]), Path(e["path"]).name) for e in rows(ckpt / "events.csv") if e["event"] == "checkpoint"]
    assert events == [(e, f"ckpt-{(e - 1) % 5}.pth") for e in range(1, 7)]


@pytest.fixture
def touched(trained, tmp_path):
    """A copy of the trained run's checkpoints where the older one (ckpt-0, step 2) is the newer file."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(trained / "ckpt", ckpt)
    t = (ckpt / "ckpt-1.pth").stat().st_mtime
    os.utime(ckpt / "ckpt-1.pth", (t - 3600, t - 3600))
    os.utime(ckpt / "ckpt-0.pth", (t + 3600, t + 3600))
    assert max(ckpt.glob("*.pth"), key=lambda p: p.stat().st_mtime).name == "ckpt-0.pth"
    return ckpt


def test_loadckpt_folder_picks_the_newest_by_step(touched, tmp_path, capsys):
    assert ddpm.main(["--loadckpt", str(touched), "--batch-size", "2", "--steps", "2", "--seed", "0",
                      "--device", "cpu", "--save-dir", str(tmp_path / "a")]) == 0
    assert f"model: {touched / 'ckpt-1.pth'} (step 4, EMA weights)" in capsys.readouterr().out
    assert ddpm.main(["--loadckpt", str(touched / "ckpt-1.pth"), "--batch-size", "2", "--steps", "2", "--seed", "0",
                      "--device", "cpu", "--save-dir", str(tmp_path / "b")]) == 0
    assert (tmp_path / "a" / "ddpm-all.png").read_bytes() == (tmp_path / "b" / "ddpm-all.png").read_bytes()


def test_resume_continues_from_the_newest_by_step(trained, touched, tmp_path, capsys):
    # no model flags: the checkpoint knows its model; --epochs 3 is the run's total
    assert ddpm.main(["--train", "--resume", "--data-folders", str(trained / "data" / "faces"), "--batch-size", "4",
                      "--epochs", "3", "--device", "cpu", "--no-run-pictures", "--sample-every", "0", "--log-every", "1",
                      "--ckpt-save-dir", str(touched), "--save-dir", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert f"resume: {touched / 'ckpt-1.pth'} (step 4, epoch 2)" in out
    assert step_of(touched / "ckpt-2.pth") == 6  # epoch 3 of 3: steps 5 and 6
    steps = [int(r["step"]) for r in rows(touched / "metrics.csv")]
    assert steps == [5, 6]  # the first run logged every 50 steps: no rows before step 4


def test_finetune_starts_from_the_checkpoint_with_the_new_lr(trained, tmp_path, capsys):
    src = trained / "ckpt" / "ckpt-1.pth"  # step 4
    before = torch.load(src, map_location="cpu", weights_only=True)
    assert ddpm.main(["--train", "--loadckpt", str(src), "--lr", "1e-5", "--data-folders",
                      str(trained / "data" / "faces"), "--batch-size", "4", "--max-steps", "5", "--device", "cpu",
                      "--seed", "0", "--no-run-pictures", "--sample-every", "0",
                      "--ckpt-save-dir", str(tmp_path / "ft"), "--save-dir", str(tmp_path / "out")]) == 0
    assert f"fine-tune: weights from {src}, lr 1e-05" in capsys.readouterr().out
    after = torch.load(ddpm.newest_checkpoint(tmp_path / "ft"), map_location="cpu", weights_only=True)
    assert after["step"] == 5  # the counters continue
    assert [g["lr"] for g in after["optimizer"]["param_groups"]] == [1e-5]
    assert after["train"]["lr"] == 1e-5
    # one Adam step from X's weights moves each weight by at most lr (|m_hat / sqrt(v_hat)| <= 1 at step 1)
    diffs = [(after["model"][k] - before["model"][k]).abs().max().item() for k in before["model"]]
    assert max(diffs) <= 1e-5 * 1.01
    assert max(diffs) > 1e-6


# ----------------------------------------------------------------------------------------------
# --demo, shortened, and learning
# ----------------------------------------------------------------------------------------------

def test_demo_command_shortened(tmp_path, capsys):
    """`python ddpm.py --train --demo`, cut to 4 steps, 16x16 images and 8 final samples (the rest of
    the preset kept), then sampling from its checkpoint folder with no model flags. In this process:
    the subprocess path is covered by the fixture above, and an interpreter start costs seconds here."""
    assert ddpm.main(["--train", "--demo", "--demo-images", "64", "--max-steps", "4", "--batch-size", "8",
                      "--img-size", "16", "--num-samples", "8", "--seed", "0", "--device", "cpu",
                      "--ckpt-save-dir", str(tmp_path / "ckpt"), "--save-dir", str(tmp_path / "output")]) == 0
    assert "64 built-in demo faces (16x16" in capsys.readouterr().out
    # 8 images of 16x16 in one row of make_grid (padding 2), enlarged 2x
    assert pixels(tmp_path / "output" / "final-grid.png").shape == (2 * 20, 2 * (8 * 18 + 2), 3)
    ckpt = ddpm.newest_checkpoint(tmp_path / "ckpt")
    obj = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert obj["step"] == 4 and obj["train"]["lr"] == ddpm.DEMO_PRESET["lr"]
    assert obj["config"]["channel_multiples"] == list(ddpm.DEMO_PRESET["channel_multiples"])
    assert ddpm.main(["--loadckpt", str(tmp_path / "ckpt"), "--num-samples", "4", "--steps", "3", "--device", "cpu",
                      "--save-dir", str(tmp_path / "samples")]) == 0
    for i in range(4):
        assert pixels(tmp_path / "samples" / f"ddpm-{i}.png").shape == (16, 16, 3)  # the checkpoint's size
    assert pixels(tmp_path / "samples" / "ddpm-all.png").shape == (16 + 4, 4 * 18 + 2, 3)


def test_a_short_run_lowers_the_loss(tmp_path):
    # 320 faces, batch 8: the 40 steps are one epoch, so one checkpoint is written (they are slow here)
    assert ddpm.main(["--train", "--demo", "--demo-images", "320", *MODEL, "--batch-size", "8", "--max-steps", "40",
                      "--lr", "1e-3", "--log-every", "5", "--seed", "0", "--device", "cpu", "--no-run-pictures", "--eval-every", "0",
                      "--sample-every", "0", "--ckpt-save-dir", str(tmp_path / "ckpt"),
                      "--save-dir", str(tmp_path / "out")]) == 0
    loss = [float(r["loss"]) for r in rows(tmp_path / "ckpt" / "metrics.csv")]
    assert len(loss) == 8
    first, last = np.mean(loss[:2]), np.mean(loss[-2:])
    assert last < 0.75 * first, loss
