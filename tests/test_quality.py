"""Quality options against closed forms: time conditioning that survives GroupNorm, norm groups,
v-prediction, Min-SNR-gamma, the cosine schedule, the signal-left warning, old checkpoints, and the
sliced Wasserstein distance (checked against scipy's 1-D Wasserstein distance)."""
import math

import numpy as np
import pytest
import torch

import ddpm
from conftest import MODEL, QUIET, dirs


def block_outputs(channels: int, time_cond: str, groups: int = 32):
    """A residual block's output for one input and two very different time embeddings."""
    torch.manual_seed(0)
    cfg = ddpm.ModelConfig(num_channels=16, time_cond=time_cond, norm_groups=groups)  # a 64-wide time embedding
    block = ddpm.ResidualBlock(cfg, channels, channels).eval()
    with torch.no_grad():
        for p in block.time_emb.parameters():  # a real, non-zero projection of the embedding
            p.normal_(0, 0.5)
        x = torch.randn(2, channels, 8, 8)
        t1, t2 = torch.randn(1, 64).expand(2, -1), 5 * torch.randn(1, 64).expand(2, -1)
        return block(x, t1), block(x, t2)


@pytest.mark.parametrize("channels", [32, 64, 128])
def test_scale_shift_blocks_see_t_at_every_width(channels):
    a, b = block_outputs(channels, "scale-shift")
    assert (a - b).abs().max() > 0.1


def test_the_original_add_block_is_blind_to_t_at_32_channels_and_not_with_fewer_groups():
    a, b = block_outputs(32, "add")  # GroupNorm(32, 32): one channel per group subtracts the shift again
    assert (a - b).abs().max() < 1e-5
    a, b = block_outputs(64, "add")  # two channels a group: only the difference between them survives
    assert (a - b).abs().max() > 1e-3
    a, b = block_outputs(32, "add", groups=8)  # 4 channels a group
    assert (a - b).abs().max() > 1e-3


def test_fewer_groups_keep_each_images_colour_offset():
    x = torch.randn(1, 32, 8, 8)
    offset = torch.randn(1, 32, 1, 1)
    inst, grouped = torch.nn.GroupNorm(32, 32), torch.nn.GroupNorm(8, 32)
    # instance norm removes a per-channel constant entirely; 8 groups keep its differences within a group
    assert torch.allclose(inst(x + offset), inst(x), atol=1e-5)
    assert (grouped(x + offset) - grouped(x)).abs().max() > 0.1


def test_norm_groups_are_validated_and_stored(tmp_path, capsys):
    bad = ddpm.ModelConfig(num_channels=36, channel_multiples=(1, 2), has_attn=(False, True), norm_groups=8)
    with pytest.raises(ddpm.DDPMError, match="must be a multiple of --norm-groups 8"):
        bad.validate()
    ddpm.ModelConfig(num_channels=24, channel_multiples=(1, 2), has_attn=(False, True), norm_groups=8).validate()
    assert ddpm.main(["--train", "--demo", "--demo-images", "8", *MODEL, "--norm-groups", "8", "--batch-size", "4",
                      "--max-steps", "1", *QUIET, *dirs(tmp_path)]) == 0
    model = ddpm.load_model(tmp_path / "ckpt")
    assert model.config.norm_groups == 8 and model.eps_model.out_conv[0].num_groups == 8


def test_v_conversions_are_exact():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64), torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64)
    d = ddpm.GaussianDiffusion(torch.nn.Identity(), config=ddpm.ModelConfig(objective="v"))
    for ab in (0.9999, 0.5, 4e-5):
        xt = math.sqrt(ab) * x0 + math.sqrt(1 - ab) * eps
        v = math.sqrt(ab) * eps - math.sqrt(1 - ab) * x0
        got_x0, got_eps = d.x0_and_eps(xt, v, ab)
        torch.testing.assert_close(got_x0, x0, rtol=0, atol=1e-12)
        torch.testing.assert_close(got_eps, eps, rtol=0, atol=1e-12)


@pytest.mark.parametrize("objective", ["eps", "v"])
def test_losses_match_their_closed_forms(objective):
    torch.manual_seed(0)
    out = torch.randn(4, 3, 8, 8)

    class Fixed(torch.nn.Module):
        def forward(self, x, t):
            return out

    g = torch.Generator().manual_seed(1)
    x0, noise = torch.rand(4, 3, 8, 8, generator=g) * 2 - 1, torch.randn(4, 3, 8, 8, generator=g)
    t = torch.tensor([0, 10, 500, 999])
    ab = torch.tensor([ddpm.linear_beta_schedule(1000, 1e-4, 0.02)[:k + 1].neg().add(1).prod().item() for k in t.tolist()])
    a = ab.view(-1, 1, 1, 1)
    target = noise if objective == "eps" else a.sqrt() * noise - (1 - a).sqrt() * x0
    per = (out - target).pow(2).flatten(1).mean(1)
    snr = ab / (1 - ab)
    w = snr.clamp(max=5) / (snr if objective == "eps" else snr + 1)
    for weight, want in (("none", per.mean()), ("min-snr", (w * per).mean())):
        d = ddpm.GaussianDiffusion(Fixed(), config=ddpm.ModelConfig(objective=objective))
        w_got = ddpm.loss_weights(d, t, ddpm.TrainConfig(loss_weight=weight))
        torch.testing.assert_close(d(x0, t, noise, w_got), want.float(), rtol=1e-5, atol=1e-6)


def test_cosine_schedule_matches_nichol_and_dhariwal():
    T, s = 1000, 0.008
    beta = ddpm.cosine_beta_schedule(T)
    f = [math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2 for t in range(T + 1)]
    want = [min(0.999, 1 - (f[t + 1] / f[0]) / (f[t] / f[0])) for t in range(T)]
    assert torch.allclose(beta, torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=1e-15)
    assert beta.max() == 0.999 and torch.cumprod(1 - beta, 0)[-1] < 1e-6
    d = ddpm.GaussianDiffusion(torch.nn.Identity(), 50, config=ddpm.ModelConfig(beta_schedule="cosine", timesteps=50))
    assert torch.allclose(d.beta.double(), ddpm.cosine_beta_schedule(50), atol=1e-7)


def test_the_logsnr_grid_spends_its_steps_above_the_floor():
    """The cosine schedule's clipped last betas put lambda_T at -9.9: spaced from there, ten of 25 steps
    fell on t = 999..990. From the floor up, the first step jumps from T-1 and the others are evenly
    spaced in lambda; the linear schedule, whose lambda_T is above the floor, keeps its grid."""
    for name, lam_T in (("cosine", -9.92), ("linear", -5.06)):
        ab = torch.cumprod(1 - ddpm.beta_schedule(name, 1000, 1e-4, 0.02), 0)
        lam = 0.5 * torch.log(ab / (1 - ab))
        assert float(lam[-1]) == pytest.approx(lam_T, abs=0.01)
        grid = ddpm.logsnr_grid(ab, 25)
        assert grid[0] == 999 and grid[-1] == 0 and len(set(grid)) == 25 and grid == sorted(grid, reverse=True)
        lo = max(float(lam[-1]), ddpm.LAMBDA_FLOOR)
        want = np.linspace(lo, float(lam[0]), 25)[1:]  # where steps 1..24 should sit, in lambda
        got = lam[grid[1:]].numpy()
        assert np.abs(got - want).max() < 0.45, (got, want)  # to the nearest timestep
        assert sum(t >= 990 for t in grid) <= 3


def test_a_schedule_that_leaves_signal_at_T_is_warned_about(tmp_path, capsys):
    base = ["--train", "--demo", "--demo-images", "8", *MODEL, "--batch-size", "4", "--max-steps", "1", *QUIET]
    assert ddpm.main([*base, "--beta-schedule", "linear", *dirs(tmp_path / "a")]) == 0  # T = 50, T = 1000's range
    out = capsys.readouterr().out
    assert "warning: --timesteps 50 with this schedule leaves alpha_bar_T = 0.603" in out and "--beta-max 0.4" in out
    for extra in (["--beta-schedule", "linear", "--beta-max", "0.4"], ["--beta-schedule", "cosine"]):
        assert ddpm.main([*base, *extra, *dirs(tmp_path / extra[-1])]) == 0
        assert "leaves alpha_bar_T" not in capsys.readouterr().out


def test_checkpoints_without_the_new_fields_load_as_the_original(tiny_run, tmp_path):
    obj = ddpm.read_checkpoint(tiny_run / "ckpt" / "ckpt-1.pth")
    for key in ("time_cond", "norm_groups", "objective", "beta_schedule", "loss_weight", "min_snr_gamma"):
        obj["config"].pop(key, None)
    cfg = ddpm.ModelConfig.from_dict(obj["config"])
    assert (cfg.time_cond, cfg.norm_groups, cfg.objective, cfg.beta_schedule) == ("add", 32, "eps", "linear")
    # and the model flags' defaults do not change a file of the original script either
    legacy = ddpm.config_from_checkpoint({"eps_model.x": torch.zeros(1)}, tmp_path / "old.pth", {}, ddpm.ModelConfig())
    assert legacy.time_cond == "add" and legacy.legacy_attention


def test_new_defaults_change_the_parameter_count_only_by_the_projections():
    add = ddpm.UNet.from_config(ddpm.ModelConfig(time_cond="add"))
    new = ddpm.UNet.from_config(ddpm.ModelConfig())
    n_add, n_new = (sum(p.numel() for p in m.parameters()) for m in (add, new))
    extra = sum(m.time_emb[1].out_features // 2 * (m.time_emb[1].in_features + 1)
                for m in new.modules() if isinstance(m, ddpm.ResidualBlock))
    assert n_add == 54_563_779 and n_new - n_add == extra  # the original: 54.56M


# -- sliced Wasserstein distance ------------------------------------------------------------------

def test_sliced_wasserstein_matches_scipy_on_a_fixed_pair():
    from scipy.stats import wasserstein_distance

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(40, 5)), rng.normal(0.3, 1.2, size=(40, 5))
    dirs = rng.normal(size=(5, 7))
    dirs /= np.linalg.norm(dirs, axis=0, keepdims=True)
    want = np.mean([wasserstein_distance(a @ dirs[:, k], b @ dirs[:, k]) for k in range(7)])
    got = ddpm.sliced_wasserstein(torch.tensor(a), torch.tensor(b), torch.tensor(dirs))
    assert got == pytest.approx(want, rel=1e-12)


def test_swd_is_zero_for_identical_sets_and_ignores_their_order():
    faces = ddpm.demo_faces(48, 32)
    assert ddpm.swd(faces, faces)["mean"] == 0.0
    other = ddpm.demo_faces(96, 32)[48:]
    perm = torch.randperm(48, generator=torch.Generator().manual_seed(0))
    a, b = ddpm.swd(faces, other), ddpm.swd(faces[perm], other)
    assert a["sizes"] == [32, 16] and a["mean"] > 0 and a == b


def test_swd_grows_with_blur_and_with_a_shift():
    faces, other = ddpm.demo_faces(64, 32), ddpm.demo_faces(128, 32)[64:]
    base = ddpm.swd(other, faces)
    blurred = ddpm._blur(other.double()).round().clamp(0, 255).to(torch.uint8)
    shifted = torch.roll(other, 4, dims=3)
    for changed in (blurred, shifted):
        worse = ddpm.swd(changed, faces)
        assert worse["mean"] > 1.2 * base["mean"], (worse, base)
    blurred2 = ddpm._blur(blurred.double()).round().clamp(0, 255).to(torch.uint8)
    assert ddpm.swd(blurred2, faces)["per_level"][0] > ddpm.swd(blurred, faces)["per_level"][0]  # more blur, further


def test_eval_swd_prints_samples_and_real_vs_real(tiny_run, capsys):
    assert ddpm.main(["--loadckpt", str(tiny_run / "ckpt"), "--eval", "swd", "--num-samples", "8", "--steps", "4",
                      "--seed", "0", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.startswith("SWD x1e3:"))
    assert "8px" in line and "mean" in line and "16 new demo faces" in line
    assert "real vs real:" in out
