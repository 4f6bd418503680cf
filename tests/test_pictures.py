"""The pictures people share: reverse and forward strips, the denoising GIF, seed interpolation."""
import numpy as np
import pytest
import torch
from PIL import Image

import ddpm

TINY = ["--img-size", "8", "--num-channels", "32", "--channel-multiples", "1", "2", "--has-attn", "f", "t",
        "--num-blocks", "1", "--timesteps", "50", "--device", "cpu"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny checkpoint (2 steps on demo faces) and its folder."""
    folder = tmp_path_factory.mktemp("pictures")
    rc = ddpm.main(["--train", "--demo", "--demo-images", "16", *TINY, "--batch-size", "8", "--max-steps", "2",
                    "--no-run-pictures", "--sample-every", "0", "--seed", "0", "--ckpt-save-dir", str(folder / "ckpt"),
                    "--save-dir", str(folder / "output")])
    assert rc == 0
    return folder


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
