"""Editing real images with the unconditional model: SDEdit (--init-images --strength), inpainting
(--mask, RePaint's resampling), DDIM inversion (--invert) and interpolation between two real faces."""
import math
from pathlib import Path

import pytest
import torch

import ddpm
from conftest import one_line, pixels
from test_diffusion import MU, S, Affine, gaussian_eps


@pytest.fixture(scope="module")
def faces(tmp_path_factory) -> Path:
    """Four 8x8 demo faces as PNG files, and a mask (white right half: regenerate)."""
    folder = tmp_path_factory.mktemp("faces")
    for i, img in enumerate(ddpm.demo_faces(4, 8, seed=5)):
        ddpm.save_png(img, folder / f"face{i}.png")
    mask = torch.zeros(1, 8, 8, dtype=torch.uint8)
    mask[:, :, 4:] = 255
    ddpm.save_png(mask, folder / "mask.png")
    return folder


def cli(tiny_run, out: Path, *flags) -> int:
    return ddpm.main(["--loadckpt", str(tiny_run / "ckpt"), "--device", "cpu", "--seed", "5", "--steps", "10",
                      "--save-dir", str(out), *flags])


def model_and_images(tiny_run, faces):
    model = ddpm.load_model(tiny_run / "ckpt")
    images = ddpm.load_image_files([faces / f"face{i}.png" for i in range(4)], 8, 3, (255, 255, 255), "--init-images")
    return model, images, ddpm.Runtime(torch.device("cpu"), "fp32")


def test_strength_1_is_plain_sampling_from_that_seed(tiny_run, faces, tmp_path):
    assert cli(tiny_run, tmp_path / "edit", "--init-images", str(faces / "face0.png"), str(faces / "face1.png"),
               "--strength", "1", "--num-samples", "2") == 0
    assert cli(tiny_run, tmp_path / "plain", "--num-samples", "2") == 0
    for j in range(2):
        for v in range(2):  # variation v of any image at strength 1 is image v of the seed
            assert (pixels(tmp_path / "edit" / f"edit-{j}-{v}.png") == pixels(tmp_path / "plain" / f"ddpm-{v}.png")).all()
    grid = pixels(tmp_path / "edit" / "edit-grid.png")  # rows: input, then two results; 8 px upscaled x2, 2 px pad
    assert grid.shape == (2 * (2 + 2 * 10), 2 * (2 + 3 * 10), 3)


def test_lower_strength_stays_closer_to_the_input(tiny_run, faces):
    model, images, rt = model_and_images(tiny_run, faces)
    spec = ddpm.SampleSpec("ddim", 20)
    dist = []
    for s in (0.03, 0.2, 0.4, 0.7, 1.0):  # 0.03: the grid's t = 1 of T = 50
        out = ddpm.generate(model, rt, [0, 1, 2, 3], 5, spec, edit=ddpm.Edit(images, s), show_progress=False)
        dist.append((out.float() - images.float()).abs().mean().item())
    assert all(a < b for a, b in zip(dist, dist[1:])), dist
    assert dist[0] < 8  # about 3% of the range: the image, barely touched


def test_edits_do_not_depend_on_the_batch_size(tiny_run, faces):
    model, images, rt = model_and_images(tiny_run, faces)
    mask = torch.ones(4, 1, 8, 8)
    mask[..., :4] = 0
    edit = ddpm.Edit(images, 0.6, mask, jumps=2)
    spec = ddpm.SampleSpec("ddpm", 10)
    one = ddpm.generate(model, rt, [0, 1, 2, 3], 5, spec, batch_size=1, edit=edit, show_progress=False)
    four = ddpm.generate(model, rt, [0, 1, 2, 3], 5, spec, batch_size=4, edit=edit, show_progress=False)
    assert torch.equal(one, four)


@pytest.mark.parametrize("jumps", [1, 3])
def test_inpainting_keeps_the_known_pixels_and_redraws_the_masked_ones(tiny_run, faces, tmp_path, jumps):
    out = tmp_path / "out"
    assert cli(tiny_run, out, "--init-images", *[str(faces / f"face{i}.png") for i in range(2)], "--mask",
               str(faces / "mask.png"), "--resample-jumps", str(jumps), "--num-samples", "3", "--sampler", "ddpm") == 0
    for j in range(2):
        original = pixels(faces / f"face{j}.png")
        results = [pixels(out / f"edit-{j}-{v}.png") for v in range(3)]
        for r in results:
            assert (abs(r[:, :4].astype(int) - original[:, :4].astype(int)) <= 1).all()  # kept, to uint8 rounding
            assert (r[:, 4:] != original[:, 4:]).any()                                   # redrawn
        assert (results[0][:, 4:] != results[1][:, 4:]).any()  # variations differ


def test_ddim_inversion_is_exact_to_solver_error_on_the_gaussian_denoiser():
    """With the exact eps of N(MU, S^2) data, inverting and sampling back returns the data up to the
    solver's error, which is first order: it halves each time the steps double (measured: PSNR 32.4 dB
    at 50 DDIM steps, 38.3 at 100, 44.7 at 200, on the [-1, 1] scale)."""
    d = ddpm.GaussianDiffusion(Affine())
    g = torch.Generator().manual_seed(0)
    x0 = MU + S * torch.randn(8, 1, 16, 16, generator=g)
    err, db = {}, {}
    for steps in (50, 100, 200):
        spec = ddpm.SampleSpec("ddim", steps, clip=False)
        z = d.invert(x0, spec, gaussian_eps)
        assert abs(z.std().item() - 1) < 0.1  # x_T is noise-like
        back = d.sample(z, spec, model_fn=gaussian_eps)
        err[steps] = (back - x0).abs().mean().item()
        db[steps] = 10 * math.log10(4 / (back - x0).pow(2).mean().item())
    assert db[200] > 44, db
    for a, b in ((50, 100), (100, 200)):
        assert 1.8 < err[a] / err[b] < 2.2, err  # first order in the step size


def test_invert_writes_latents_reconstructions_and_their_psnr(tiny_run, faces, tmp_path, capsys):
    out = tmp_path / "out"
    paths = [str(faces / "face0.png"), str(faces / "face1.png")]
    assert cli(tiny_run, out, "--invert", *paths, "--sampler", "ddim", "--steps", "50") == 0
    text = capsys.readouterr().out
    for i in range(2):
        z = torch.load(out / f"edit-invert-face{i}.pt", weights_only=True)
        assert z.shape == (3, 8, 8)
        value = float(text.split(f"face{i}.png: x_T")[1].split("PSNR ")[1].split(" dB")[0])
        rec, orig = pixels(out / f"edit-invert-face{i}.png"), pixels(faces / f"face{i}.png")
        mse = ((rec.astype(float) - orig.astype(float)) ** 2).mean()
        assert value == pytest.approx(10 * math.log10(255 ** 2 / mse), abs=0.01)
        assert value > 20  # even a model trained for 3 steps is smooth enough to invert
    assert (out / "edit-grid.png").exists()


def test_interpolation_between_two_real_faces(tiny_run, faces, tmp_path):
    a, b = str(faces / "face0.png"), str(faces / "face1.png")
    assert cli(tiny_run, tmp_path / "inv", "--invert", a, b, "--sampler", "ddim") == 0
    assert cli(tiny_run, tmp_path / "img", "--interpolate", a, b, "--num-samples", "1") == 0
    pts = [str(tmp_path / "inv" / f"edit-invert-face{i}.pt") for i in range(2)]
    assert cli(tiny_run, tmp_path / "pt", "--interpolate", *pts, "--num-samples", "1") == 0
    strip = pixels(tmp_path / "img" / "interpolate.png")
    assert (strip == pixels(tmp_path / "pt" / "interpolate.png")).all()  # image files = their inverted files
    assert (strip[:, :8] == pixels(tmp_path / "inv" / "edit-invert-face0.png")).all()   # the ends: the
    assert (strip[:, -8:] == pixels(tmp_path / "inv" / "edit-invert-face1.png")).all()  # reconstructions


def test_editing_errors_are_one_line_and_write_nothing(tiny_run, faces, tmp_path, capsys):
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"not an image")
    f0, f1, mask = str(faces / "face0.png"), str(faces / "face1.png"), str(faces / "mask.png")
    cases = [(["--init-images", str(tmp_path / "missing.png")], "--init-images", "does not exist"),
             (["--init-images", str(garbage)], "--init-images", "cannot be used"),
             (["--init-images", f0, "--mask", str(garbage)], "--mask", "cannot be used"),
             (["--init-images", f0, f1, "--mask", mask, mask, mask], "--mask", "one mask for all 2"),
             (["--init-images", f0, "--strength", "0"], "--strength", "in (0, 1]"),
             (["--init-images", f0, "--strength", "1.5"], "--strength", "in (0, 1]"),
             (["--mask", mask], "--mask goes with --init-images", ""),
             (["--invert", f0, "--sampler", "ddpm"], "--invert", "not a stochastic sampler"),
             (["--invert", f0, "--sampler", "ddim", "--eta", "0.5"], "--invert", "not a stochastic sampler"),
             (["--interpolate", f0, str(tmp_path / "none.pt")], "--interpolate", "does not exist or is not a regular file")]
    capsys.readouterr()
    for flags, flag, message in cases:
        assert cli(tiny_run, tmp_path / "out", *flags) == 2, flags
        line = one_line(capsys.readouterr().err)
        assert flag in line and message in line, line
    assert not (tmp_path / "out").exists()
