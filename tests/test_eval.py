"""--eval nll / fid / nearest and --holdout: checked against closed forms and independent references."""
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from numpy.polynomial.hermite_e import hermegauss
from PIL import Image
from scipy import linalg
from scipy.stats import norm

import ddpm

TINY = ["--img-size", "8", "--num-channels", "32", "--channel-multiples", "1", "2", "--has-attn", "f", "t",
        "--num-blocks", "1", "--timesteps", "20"]


# -- helpers ---------------------------------------------------------------------------------------

def gaussian_bound_reference(x0, mu, s, T, bmin, bmax):
    """Expected terms of the bound, in nats per image, for data x0: (N, D) (float64 on the 256-level grid)
    under the exact epsilon model of N(mu, s^2) pixels, eps*(x_t) = sqrt(1-ab)(x_t - sqrt(ab) mu)/(ab s^2 + 1 - ab).
    Everything is Gaussian and the model mean is linear in x_t, so each KL's expectation over
    x_t | x_0 is closed form; the decoder's expectation is Gauss-Hermite quadrature. Returns (N, 3)."""
    beta = np.linspace(bmin, bmax, T)
    alpha = 1 - beta
    ab = np.cumprod(alpha)
    abp = np.r_[1.0, ab[:-1]]
    v = 1 - ab[-1]
    prior = 0.5 * (-np.log(v) + v + ab[-1] * x0 ** 2 - 1)
    kl = np.zeros_like(x0)
    for i in range(1, T):
        vq = beta[i] * (1 - abp[i]) / (1 - ab[i])
        c1 = beta[i] * math.sqrt(abp[i]) / (1 - ab[i])
        c2 = (1 - abp[i]) * math.sqrt(alpha[i]) / (1 - ab[i])
        a, b = 1 / math.sqrt(alpha[i]), beta[i] / math.sqrt(1 - ab[i])
        k = math.sqrt(1 - ab[i]) / (ab[i] * s * s + 1 - ab[i])
        # mean_q - mean_p = c1 x0 + c2 x_t - a (x_t - b k (x_t - sqrt(ab) mu)) = c1 x0 + D x_t + E
        D, E = c2 - a + a * b * k, -a * b * k * math.sqrt(ab[i]) * mu
        m = (c1 + D * math.sqrt(ab[i])) * x0 + E  # its mean given x0; its variance is D^2 (1 - ab)
        kl += 0.5 * (math.log(beta[i] / vq) + vq / beta[i] - 1) + (m * m + D * D * (1 - ab[i])) / (2 * beta[i])
    a, b = 1 / math.sqrt(alpha[0]), beta[0] / math.sqrt(1 - ab[0])
    k = math.sqrt(1 - ab[0]) / (ab[0] * s * s + 1 - ab[0])
    gain, sd = a * (1 - b * k), math.sqrt(beta[0])
    e, w = hermegauss(60)
    w = w / math.sqrt(2 * math.pi)
    dec = np.zeros_like(x0)
    for u in np.unique(x0):
        mean_p = gain * (math.sqrt(ab[0]) * u + math.sqrt(1 - ab[0]) * e) + a * b * k * math.sqrt(ab[0]) * mu
        lo = np.full_like(e, -np.inf) if u < -0.999 else (u - 1 / 255 - mean_p) / sd
        hi = np.full_like(e, np.inf) if u > 0.999 else (u + 1 / 255 - mean_p) / sd
        p = np.where(lo > 0, norm.sf(lo) - norm.sf(hi), norm.cdf(hi) - norm.cdf(lo))
        dec[x0 == u] = -np.sum(w * np.log(p))
    return np.stack([prior.sum(1), kl.sum(1), dec.sum(1)], 1)


def tiny_checkpoint(folder: Path, data_folders=None, demo=False, holdout=None) -> Path:
    cfg = ddpm.ModelConfig(3, 8, 32, (1, 2), (False, True), 1, 20)
    torch.manual_seed(0)
    model = ddpm.build_diffusion(cfg)
    path = folder / "ckpt-0.pth"
    torch.save({"format": ddpm.FORMAT, "version": ddpm.FORMAT_VERSION, "config": cfg.to_dict(),
                "model": model.state_dict(), "ema": None, "step": 7, "holdout": holdout,
                "train": {"data_folders": [str(f) for f in data_folders or []], "demo": demo}}, path)
    return path


def write_pngs(folder: Path, n: int, seed: int) -> np.ndarray:
    folder.mkdir(parents=True)
    arr = np.random.default_rng(seed).integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)
    for i, a in enumerate(arr):
        Image.fromarray(a).save(folder / f"{i:03d}.png")
    return arr


def stand_in_features(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] -> (B, 12): 2x2 average pooling, a cheap stand-in for Inception."""
    return torch.nn.functional.adaptive_avg_pool2d(x, 2).flatten(1)


STAND_IN = ddpm.Features(stand_in_features, "stand-in 2x2 pooling")


def scipy_fid(f1: np.ndarray, f2: np.ndarray) -> float:
    m1, m2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2)
    return float(((m1 - m2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean).real)


# -- bits/dim --------------------------------------------------------------------------------------

def test_decoder_is_a_distribution_over_the_256_levels():
    levels = torch.arange(256, dtype=torch.float64) / 127.5 - 1  # uint8 -> [-1, 1]
    for mean, std in [(0.0, 0.01), (-0.98, 0.003), (0.999, 0.05), (0.3, 2.0), (1.4, 0.01)]:
        logp = ddpm.discretized_gaussian_log_likelihood(levels, torch.full_like(levels, mean), torch.full_like(levels, std))
        assert torch.isfinite(logp).all()
        assert logp.exp().sum().item() == pytest.approx(1.0, abs=1e-9)
        j = 128  # an inner bin: the Gaussian mass of [x - 1/255, x + 1/255]
        ref = norm.cdf((levels[j] + 1 / 255 - mean) / std) - norm.cdf((levels[j] - 1 / 255 - mean) / std)
        assert logp[j].exp().item() == pytest.approx(ref, rel=1e-9, abs=1e-300)


def test_bits_per_dim_matches_closed_form_for_gaussian_data():
    T, bmin, bmax, mu, s = 100, 1e-4, 0.1, 0.1, 0.4
    N, C, H = 96, 3, 8
    g = np.random.default_rng(0)
    u8 = np.clip(np.round((mu + s * g.standard_normal((N, C, H, H)) + 1) * 127.5), 0, 255).astype(np.uint8)
    ref = gaussian_bound_reference(u8.reshape(N, -1) / 127.5 - 1, mu, s, T, bmin, bmax) / (C * H * H * math.log(2))
    ab = torch.tensor(np.cumprod(1 - np.linspace(bmin, bmax, T)))

    def eps_star(x, t):
        a = ab[t].view(-1, 1, 1, 1)
        return (torch.sqrt(1 - a) * (x.double() - torch.sqrt(a) * mu) / (a * s * s + 1 - a)).float()
    diffusion = ddpm.GaussianDiffusion(torch.nn.Identity(), T, bmin, bmax)
    data = torch.from_numpy(u8)
    r = ddpm.bits_per_dim(diffusion, data, None, batch_size=48, seed=1, model_fn=eps_star)
    assert (r["K"], r["T"], r["n"]) == (T, T, N)
    assert r["prior"] == pytest.approx(ref[:, 0].mean(), rel=1e-9)  # exact: no Monte Carlo in L_T
    assert r["kl"] == pytest.approx(ref[:, 1].mean(), rel=0.01)
    assert r["decoder"] == pytest.approx(ref[:, 2].mean(), rel=0.01)
    total = ref.sum(1).mean()
    assert abs(r["bpd"] - total) < 2 * r["ci"] and abs(r["bpd"] - total) < 0.01 * total
    assert r["per_image"].shape == (N,)
    # strided: K = 10 of T = 100 timesteps is unbiased: the mean over seeds converges to the full bound
    runs = [ddpm.bits_per_dim(diffusion, data, 10, batch_size=96, seed=sd, model_fn=eps_star) for sd in range(8)]
    est = np.array([x["bpd"] for x in runs])
    assert runs[0]["K"] == 10 and runs[0]["ci"] > r["ci"]
    assert abs(est.mean() - total) < 4 * est.std(ddof=1) / math.sqrt(len(est)) + 1e-3 * total


# -- FID -------------------------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pytorch-fid passes sqrtm's deprecated disp=
def test_frechet_distance_and_stats_match_scipy_and_pytorch_fid():
    from pytorch_fid.fid_score import calculate_frechet_distance

    g = np.random.default_rng(1)
    f1 = g.standard_normal((300, 24)) @ g.standard_normal((24, 24)) * 0.5 + 1.0
    f2 = g.standard_normal((200, 24)) @ g.standard_normal((24, 24)) * 0.3
    chunks = iter([torch.from_numpy(c) for c in np.split(f1, 2)])  # a "network" that returns given features
    mu1, s1, n1 = ddpm.activation_stats([torch.zeros(150, 1, 1, 1, dtype=torch.uint8)] * 2, lambda x: next(chunks))
    assert n1 == 300
    np.testing.assert_allclose(mu1.numpy(), f1.mean(0), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(s1.numpy(), np.cov(f1, rowvar=False), rtol=1e-8, atol=1e-10)
    d = ddpm.frechet_distance(mu1, s1, torch.from_numpy(f2.mean(0)), torch.from_numpy(np.cov(f2, rowvar=False)))
    assert d == pytest.approx(scipy_fid(f1, f2), rel=1e-7)
    assert d == pytest.approx(calculate_frechet_distance(f1.mean(0), np.cov(f1, rowvar=False), f2.mean(0),
                                                         np.cov(f2, rowvar=False)), rel=1e-7)
    s = np.cov(f1, rowvar=False)
    assert abs(ddpm.frechet_distance(f1.mean(0), s, f1.mean(0), s)) < 1e-8
    few = f2[:10]  # 10 samples in 24 dimensions: a singular covariance, as with small FID runs
    assert ddpm.frechet_distance(few.mean(0), np.cov(few, rowvar=False), f1.mean(0), s) == pytest.approx(
        scipy_fid(few, f1), rel=1e-6)


def test_fid_pipeline_with_stand_in_features(tmp_path, capsys):
    real = write_pngs(tmp_path / "real", 12, seed=2)
    ckpt = tiny_checkpoint(tmp_path, data_folders=[tmp_path / "real"])
    argv = ["--loadckpt", str(ckpt), "--eval", "fid", "--num-samples", "10", "--sampler", "ddim", "--steps", "2",
            "--seed", "5", "--batch-size", "10", "--device", "cpu"]
    rt = ddpm.setup_runtime("cpu")
    assert ddpm.eval_command(ddpm.parse_command_line(argv), features=STAND_IN) == 0
    out = capsys.readouterr().out
    fid = float(re.search(r"FID: ([0-9.]+) \(10 samples: ddim, 2 model calls, seed 5; vs 12 real images", out).group(1))
    assert "stand-in 2x2 pooling" in out and "saved to" in out
    # independently: the same samples (per-image seeds), features, numpy/scipy statistics and distance
    imgs = ddpm.generate(ddpm.load_model(ckpt), rt, list(range(10)), 5, ddpm.SampleSpec("ddim", 2), batch_size=10,
                         show_progress=False)
    f_real = stand_in_features(torch.from_numpy(real).permute(0, 3, 1, 2).float() / 255).numpy()
    f_fake = stand_in_features(imgs.float() / 255).numpy()
    assert fid == pytest.approx(scipy_fid(f_fake, f_real), abs=1e-4)
    caches = list(tmp_path.glob("fid-stats-*.pt"))
    assert len(caches) == 1
    st = torch.load(caches[0], weights_only=True)
    np.testing.assert_allclose(st["mu"].numpy(), f_real.mean(0), rtol=1e-6)
    assert st["n"] == 12
    assert ddpm.eval_command(ddpm.parse_command_line(argv), features=STAND_IN) == 0
    out = capsys.readouterr().out
    assert "(cached)" in out and f"FID: {fid:.4f}" in out


def test_fid_without_weights_exits_2_naming_the_flag(tmp_path, monkeypatch, capsys):
    ckpt = tiny_checkpoint(tmp_path, demo=True)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))  # an empty torch.hub cache
    assert ddpm.main(["--loadckpt", str(ckpt), "--eval", "fid", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--fid-weights" in err[0]
    assert str(tmp_path / "hub" / "checkpoints" / ddpm.FID_WEIGHTS_NAME) in err[0]
    # a file that is not the standard weights is refused (checked by its sha256), also in one line
    (tmp_path / "fake.pth").write_bytes(b"not inception")
    assert ddpm.main(["--loadckpt", str(ckpt), "--eval", "fid", "--fid-weights", str(tmp_path / "fake.pth"),
                      "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "6726825d" in err[0]


# -- memorisation ----------------------------------------------------------------------------------

def test_nearest_neighbours_match_brute_force():
    g = torch.Generator().manual_seed(0)
    q, bank = torch.randn(5, 7, generator=g), torch.randn(30, 7, generator=g)
    d, idx = ddpm.nearest_neighbours(q, bank, 3)
    full = np.sqrt(((q.double().numpy()[:, None, :] - bank.double().numpy()[None]) ** 2).sum(-1))
    np.testing.assert_array_equal(idx.numpy(), np.argsort(full, 1)[:, :3])
    np.testing.assert_allclose(d.numpy(), np.sort(full, 1)[:, :3], rtol=1e-9)
    a, b = ddpm.demo_faces(2, 8)  # at 8x8 no downsampling: the distance is the RMS difference in [-1, 1]
    fa, fb = ddpm.pixel_features(torch.stack([a, b]))
    assert float((fa - fb).norm()) == pytest.approx(float(((a.double() - b.double()) / 127.5).square().mean().sqrt()), rel=1e-5)


def test_copy_check_flags_training_images_but_not_fresh_ones():
    train = ddpm.demo_faces(40, 16, seed=0)
    held = ddpm.demo_faces(12, 16, seed=1)
    f_train, f_held = ddpm.pixel_features(train), ddpm.pixel_features(held)
    picks = [3, 17, 0, 39, 22, 8]
    copies = ddpm.copy_check(ddpm.pixel_features(train[picks]), f_train, f_held, f_train, 0.02)
    assert copies["copies"] == len(picks)
    assert copies["idx"][:, 0].tolist() == picks and float(copies["dist"][:, 0].max()) < 1e-6
    fresh = torch.randint(0, 256, (6, 3, 16, 16), generator=torch.Generator().manual_seed(3), dtype=torch.uint8)
    r = ddpm.copy_check(ddpm.pixel_features(fresh), f_train, f_held, f_train, 0.02)
    assert r["copies"] == 0 and r["q_samples"][0] > r["threshold"] > 0
    assert r["q_real"] == sorted(r["q_real"]) and len(r["real"]) == 12


# -- holdout and the command line ------------------------------------------------------------------

def test_holdout_is_left_out_recorded_and_rebuilt_by_eval(tmp_path, monkeypatch, capsys):
    seen = []

    class Spy(ddpm.Batches):
        def __init__(self, data, device, seed):
            seen.append(data.clone())
            super().__init__(data, device, seed)
    monkeypatch.setattr(ddpm, "Batches", Spy)
    ck, out = tmp_path / "ckpt", tmp_path / "out"
    assert ddpm.main(["--train", "--demo", "--demo-images", "24", *TINY, "--max-steps", "1", "--batch-size", "8",
                      "--holdout", "25%", "--no-run-pictures", "--sample-every", "0", "--eval-every", "0", "--seed", "3",
                      "--device", "cpu",
                      "--ckpt-save-dir", str(ck), "--save-dir", str(out)]) == 0
    obj = torch.load(next(ck.glob("ckpt-*.pth")), weights_only=True)
    assert obj["holdout"] == {"fraction": 0.25, "seed": 3, "n": 6, "total": 24}
    everything = ddpm.demo_faces(24, 8)
    trained = {bytes(x.numpy()) for x in seen[0]}
    assert len(seen[0]) == 18 and trained <= {bytes(x.numpy()) for x in everything}
    job = ddpm.parse_command_line(["--loadckpt", str(ck), "--eval", "nll"])
    train, held, what = ddpm.eval_datasets(obj, ddpm.ModelConfig.from_dict(obj["config"]), job.data)
    assert torch.equal(train, seen[0]) and len(held) == 6 and "held-out split" in what
    assert not trained & {bytes(x.numpy()) for x in held}
    capsys.readouterr()
    assert ddpm.main(["--loadckpt", str(ck), "--eval", "nll", "--nll-timesteps", "3", "--seed", "0",
                      "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    m = re.search(r"NLL: ([0-9.]+) bits/dim \+- ([0-9.]+) \(95% CI over 6 images of the checkpoint's held-out split", text)
    assert m and float(m.group(1)) > 0 and "strided estimate (3 of 20 timesteps)" in text
    assert ddpm.main(["--loadckpt", str(ck), "--eval", "nearest", "--num-samples", "4", "--sampler", "ddim",
                      "--steps", "2", "--seed", "0", "--device", "cpu", "--save-dir", str(out)]) == 0
    text = capsys.readouterr().out
    assert re.search(r"possible copies: \d of 4", text) and "6 held-out real images" in text
    with Image.open(out / "nearest.png") as im:  # 4 rows x (sample + 3 neighbours), 8 px + 2 px padding, 2x
        assert im.size == (2 * (4 * 10 + 2), 2 * (4 * 10 + 2))


def test_eval_needs_a_checkpoint_and_fractions_parse(capsys):
    assert ddpm.main(["--eval", "nll"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--loadckpt" in err[0]
    assert ddpm.main(["--eval", "nearest", "--train", "--demo", "--loadckpt", "x.pth"]) == 2
    assert ddpm.parse_fraction("1%") == pytest.approx(0.01) and ddpm.parse_fraction("0.25") == 0.25
    for bad in ("100%", "-0.1", "abc", "1"):
        with pytest.raises(Exception):
            ddpm.parse_fraction(bad)
