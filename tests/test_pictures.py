"""The pictures people share: reverse and forward strips, the denoising GIF, seed interpolation."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import ddpm
from conftest import MODEL

TINY = [*MODEL, "--device", "cpu"]


@pytest.fixture
def trained(tiny_run):
    """The session's tiny run (3 steps on 8 demo faces)."""
    return tiny_run


def pixels(path) -> torch.Tensor:
    """A PNG as a (C, H, W) uint8 tensor."""
    return torch.from_numpy(np.asarray(Image.open(path).convert("RGB")).copy()).permute(2, 0, 1)


def test_strips_gif_and_interpolation(trained, tmp_path):
    out = tmp_path / "out"
    rc = ddpm.main(["--loadckpt", str(trained / "ckpt"), "--num-samples", "4", "--sampler", "dpm++", "--steps", "6",
                    "--seed", "3", "--device", "cpu", "--save-dir", str(out), "--reverse-steps", "--forward-steps",
                    "--demo", "--demo-images", "16", "--gif", "--interpolate", "3", "9"])
    assert rc == 0
    s = 8
    # reverse.png: 8 rows of images; x_T, then one column per kept snapshot (all 6 steps here)
    rev = Image.open(out / "reverse.png")
    n_cols = 1 + len(ddpm.snapshot_steps(6))
    assert rev.size == (n_cols * s, 8 * s)
    # its first column is the per-image noise of seed 3, its last the final images = ddpm-0..3.png
    arr = pixels(out / "reverse.png")
    noise = ddpm.to_uint8(ddpm.ImageNoise(3, range(8), (3, s, s), torch.device("cpu"))())
    assert torch.equal(arr[:, :, :s], torch.cat(list(noise), dim=1))
    for i in range(4):
        assert torch.equal(arr[:, i * s:(i + 1) * s, -s:], pixels(out / f"ddpm-{i}.png"))
    # forward.png: x_0 and ten noised columns for 8 training images; the first column is the data itself
    fwd = Image.open(out / "forward.png")
    assert fwd.size == (11 * s, 8 * s)
    data = ddpm.demo_faces(16, s, seed=0)[:8]
    farr = pixels(out / "forward.png")
    assert torch.equal(farr[:, :, :s], torch.cat(list(data), dim=1))
    # the columns are ever noisier: their correlation with the data falls as sqrt(alpha_bar_t) does
    col = torch.cat(list(data), 1).float().flatten()
    corr = [float(torch.corrcoef(torch.stack([farr[:, :, k * s:(k + 1) * s].float().flatten(), col]))[0, 1])
            for k in range(1, 11)]
    assert corr[0] > 0.9 and corr[-1] < corr[0] - 0.2
    # denoise.gif: several frames of a grid of the 4 images
    gif = Image.open(out / "denoise.gif")
    assert gif.n_frames > 3
    # interpolate.png: 8 images; the ends are exactly the images of seeds 3 and 9 (index 0)
    itp = pixels(out / "interpolate.png")
    assert itp.shape == (3, s, 8 * s)
    model = ddpm.load_model(trained / "ckpt")  # the newest checkpoint in the folder
    rt = ddpm.Runtime(torch.device("cpu"), "fp32")
    a = ddpm.generate(model, rt, [0], 3, ddpm.SampleSpec("dpm++", 6), show_progress=False)[0]
    b = ddpm.generate(model, rt, [0], 9, ddpm.SampleSpec("dpm++", 6), show_progress=False)[0]
    assert torch.equal(itp[:, :, :s], a) and torch.equal(itp[:, :, -s:], b)
    assert not torch.equal(itp[:, :, 3 * s:4 * s], a)


def test_slerp_keeps_the_norm_of_gaussian_noise():
    g = torch.Generator().manual_seed(0)
    z0, z1 = torch.randn(3, 32, 32, generator=g), torch.randn(3, 32, 32, generator=g)
    assert torch.equal(ddpm.slerp(z0, z1, 0.0), z0)
    mid = ddpm.slerp(z0, z1, 0.5)
    # a linear mix would shrink the norm by ~1/sqrt(2); slerp of two near-orthogonal vectors keeps it
    assert abs(mid.norm() / z0.norm() - 1) < 0.05
    assert (0.5 * (z0 + z1)).norm() / z0.norm() < 0.8


def _pictures(out: Path) -> dict:
    return {name: (out / name).read_bytes() for name in ("reverse.png", "denoise.gif", "interpolate.png")}


def test_every_picture_honours_the_sampling_flags(tiny_run, tmp_path):
    """One SampleSpec reaches every picture: --no-clip and --eta change each picture whose sampling
    they touch; the interpolation runs eta 0 by design, so --eta leaves it alone."""
    got = {}
    for name, flags in (("clip", []), ("no-clip", ["--no-clip"]), ("ddim", ["--sampler", "ddim"]),
                        ("ddim-eta", ["--sampler", "ddim", "--eta", "0.7"])):
        out = tmp_path / name
        assert ddpm.main(["--loadckpt", str(tiny_run / "ckpt"), "--num-samples", "4", "--steps", "6", "--seed", "3",
                          "--device", "cpu", "--save-dir", str(out), "--reverse-steps", "--gif", "--interpolate", "3",
                          "9", *flags]) == 0
        got[name] = _pictures(out)
    for pic in ("reverse.png", "denoise.gif", "interpolate.png"):
        assert got["clip"][pic] != got["no-clip"][pic], pic
    for pic in ("reverse.png", "denoise.gif"):
        assert got["ddim"][pic] != got["ddim-eta"][pic], pic
    assert got["ddim"]["interpolate.png"] == got["ddim-eta"]["interpolate.png"]


def test_run_pictures_and_previews_honour_the_sampling_flags(tmp_path):
    from conftest import MODEL, dirs

    got = {}
    for name, flags in (("clip", []), ("no-clip", ["--no-clip"]), ("ddim", ["--sampler", "ddim"]),
                        ("ddim-eta", ["--sampler", "ddim", "--eta", "0.7"])):
        root = tmp_path / name
        assert ddpm.main(["--train", "--demo", "--demo-images", "8", *MODEL, "--batch-size", "4", "--max-steps", "2",
                          "--seed", "0", "--device", "cpu", "--sample-every", "2", "--steps", "6", "--num-samples", "4",
                          "--eval-every", "0",
                          *dirs(root), *flags]) == 0
        out = root / "out"
        got[name] = {p: (out / p).read_bytes() for p in ("run-before.png", "run-after.png", "final-grid.png",
                                                         "preview/step-0000002.png")}
    for pic in got["clip"]:
        assert got["clip"][pic] != got["no-clip"][pic], pic
        assert got["ddim"][pic] != got["ddim-eta"][pic], pic


def test_previews_without_ema_leave_dropout_on(tmp_path, monkeypatch):
    """Without an EMA a preview or a quality measurement samples the raw model in eval mode; the next step
    trains it again, with dropout on (a preview that left it in eval mode turned dropout off for the rest
    of the run)."""
    modes = []
    real_step = ddpm.Trainer.train_step

    def train_step(self):
        modes.append(self.model.training)
        real_step(self)
    monkeypatch.setattr(ddpm.Trainer, "train_step", train_step)
    assert ddpm.main(["--train", "--demo", "--demo-images", "8", *TINY, "--batch-size", "4", "--max-steps", "3",
                      "--ema-decay", "0", "--dropout", "0.1", "--sample-every", "1", "--eval-every", "1", "--eval-samples", "4",
                      "--no-run-pictures", "--seed", "0", "--ckpt-save-dir", str(tmp_path / "ckpt"),
                      "--save-dir", str(tmp_path / "out")]) == 0
    assert len(list((tmp_path / "out" / "preview").glob("step-*.png"))) == 3
    assert modes == [True, True, True]
