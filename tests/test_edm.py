"""The EDM family (Karras et al. 2022, 2024): Heun on the Karras grid, the VP model seen as EDM's
denoiser, EDM's preconditioning and loss, and autoguidance. Expected values come from the papers'
formulas written here, and from Gaussian data, whose optimal denoiser and probability-flow ODE are
known in closed form."""
import math

import pytest
import torch
from torch import nn

import ddpm
from conftest import MODEL, QUIET, dirs, one_line, pixels

MU, S = 0.3, 0.5  # every pixel of x_0 is N(MU, S^2)
# for the tests of the objectives' conversions: a deviation other than EDM's sigma_data (0.5), at which
# c_in applied to x_t instead of x would cancel out exactly in the optimal denoiser
MU2, S2 = 0.2, 0.3


class GaussianNet(nn.Module):
    """The exact network output at x_t for Gaussian data N(mu, s^2) per pixel, as each objective
    parametrises it, at any timestep the sampler asks for, integer or not: eps, or v, at the
    diffusion's own alpha_bar(t); for edm, EDM's preconditioned F(c_in x; c_noise) (Karras et al. 2022,
    Table 1, written here from the paper) with x = x_t / sqrt(alpha_bar) and D the optimal denoiser."""

    def __init__(self, diffusion_ref: list, objective: str = "eps", mu: float = MU, s: float = S):
        super().__init__()
        self.ref, self.objective, self.mu, self.s = diffusion_ref, objective, mu, s

    def forward(self, x, t):
        d, mu, s2 = self.ref[0], self.mu, self.s ** 2
        x = x.double()
        if self.objective == "edm":  # the input is (c_in x, c_noise = ln(sigma) / 4)
            sigma = torch.exp(4 * t.double()).view(-1, 1, 1, 1)
            xe = x * (sigma ** 2 + SD ** 2).sqrt()
            D = mu + s2 / (s2 + sigma ** 2) * (xe - mu)
            c_skip, c_out = SD ** 2 / (sigma ** 2 + SD ** 2), sigma * SD / (sigma ** 2 + SD ** 2).sqrt()
            return ((D - c_skip * xe) / c_out).float()
        a = torch.tensor([d.ab(float(v)) for v in t.tolist()], dtype=torch.float64).view(-1, 1, 1, 1)
        eps = (1 - a).sqrt() * (x - a.sqrt() * mu) / (a * s2 + 1 - a)
        if self.objective == "v":
            return ((eps - (1 - a).sqrt() * x) / a.sqrt()).float()
        return eps.float()


SD = 0.5  # EDM's sigma_data


def gaussian_diffusion(objective: str = "eps", schedule: str = "linear", mu: float = MU,
                       s: float = S) -> ddpm.GaussianDiffusion:
    ref = []
    d = ddpm.GaussianDiffusion(GaussianNet(ref, objective, mu, s),
                               config=ddpm.ModelConfig(objective=objective, beta_schedule=schedule))
    ref.append(d)
    return d


def exact_flow(d: ddpm.GaussianDiffusion, x_T: torch.Tensor, t_top: float) -> torch.Tensor:
    """Where the probability-flow ODE takes x_T (a VP latent at t_top) for this data, then the optimal
    denoiser at the grid's last level (t = 0): x(sigma) = MU + sqrt(S^2 + sigma^2) / sqrt(S^2 +
    sigma_top^2) (x(sigma_top) - MU) in EDM's coordinates x = x_t / sqrt(alpha_bar)."""
    s_top, s_min = d.sigma(t_top), d.sigma(0)
    x_top = x_T.double() / math.sqrt(d.ab(t_top))
    x_min = MU + math.sqrt(S * S + s_min ** 2) / math.sqrt(S * S + s_top ** 2) * (x_top - MU)
    return MU + S * S / (S * S + s_min ** 2) * (x_min - MU)


def test_heun_converges_at_second_order_to_the_exact_flow():
    d = gaussian_diffusion()
    x_T = torch.randn(1, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    errors = []
    for calls in (17, 33, 65, 129):  # 9, 17, 33, 65 grid points: the step halves each time
        spec = ddpm.SampleSpec("heun", calls, clip=False)
        grid = d.grid(spec)
        assert len(grid) == (calls + 1) // 2 and 2 * (len(grid) - 1) + 1 == calls  # --steps counts model calls
        out = d.sample(x_T.clone(), spec, model_fn=d.eps_model)
        errors.append(float((out.double() - exact_flow(d, x_T, grid[0])).abs().max()))
    ratios = [a / b for a, b in zip(errors, errors[1:])]
    assert all(3.0 < r < 5.5 for r in ratios), (errors, ratios)  # about 4x per doubling: second order
    # Euler (one call per step: the toy first-order solver DDIM is) halves its error per doubling only
    first = [float((d.sample(x_T.clone(), ddpm.SampleSpec("ddim", n, clip=False, grid="karras"), model_fn=d.eps_model)
                    .double() - exact_flow(d, x_T, d.grid(ddpm.SampleSpec("ddim", n, grid="karras"))[0])).abs().max())
             for n in (9, 17)]
    assert 1.5 < first[0] / first[1] < 2.6, first


@pytest.mark.parametrize("churn", [0.0, 5.0])
def test_heun_samples_the_gaussian_data_distribution(churn):
    d = gaussian_diffusion(schedule="cosine")
    x_T = torch.randn(64, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(2)
    spec = ddpm.SampleSpec("heun", 161, clip=False, churn=churn)
    out = d.sample(x_T, spec, model_fn=d.eps_model, noise_fn=lambda: torch.randn(x_T.shape, generator=g))
    assert abs(out.mean().item() - MU) < 0.02 * MU and abs(out.std().item() - S) < 0.02 * S, (out.mean(), out.std())
    assert spec.draws_noise == (churn > 0)


def denoiser_error(objective: str) -> float:
    """The largest difference between the model's x_0 estimate at x_t (predict) and EDM's optimal
    denoiser D(x; sigma) of the Gaussian data at x = x_t sqrt(1 + sigma^2), over integer and fractional
    timesteps: 0 up to float round-off when the objective's conversions are right."""
    d = gaussian_diffusion(objective, mu=MU2, s=S2)
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 3
    worst = 0.0
    for t in (5, 250.5, 900):
        sigma = d.sigma(t)
        x_vp = (x / math.sqrt(1 + sigma ** 2)).float()
        x0, eps = d.predict(x_vp, t, ddpm.SampleSpec(clip=False), d.eps_model)
        D = MU2 + S2 * S2 / (S2 * S2 + sigma ** 2) * (x - MU2)  # the optimal denoiser, EDM's D(x; sigma)
        ab = d.ab(t)
        worst = max(worst, float((x0.double() - D).abs().max()),
                    float((x_vp.double() - math.sqrt(ab) * x0.double() - math.sqrt(1 - ab) * eps.double()).abs().max()))
    return worst


@pytest.mark.parametrize("objective", ["eps", "v", "edm"])
def test_the_vp_model_seen_as_edm_round_trips(objective):
    """sigma and the (fractional) timestep invert each other; at an integer timestep the interpolated
    noise level is the schedule's own; EDM's denoiser D(x; sigma) read from the model's output at
    x_t = x / sqrt(1 + sigma^2) is its x_0 estimate, and x_t = sqrt(alpha_bar) x (denoiser_error):
    with every objective's conversions (catches c_in applied to x_t instead of x)."""
    d = gaussian_diffusion(objective)
    for t in (0, 1, 17, 250.5, 500, 731.25, 998.9, 999):
        sigma = d.sigma(t)
        assert d.t_of_sigma(sigma) == pytest.approx(t, abs=1e-6)
        assert d.ab(t) == pytest.approx(1 / (1 + sigma ** 2), rel=1e-6)
        if float(t).is_integer():
            assert d.ab(t) == pytest.approx(float(d.alpha_bar_f64[int(t)]), rel=1e-12)
    assert denoiser_error(objective) < 2e-5


def test_edm_preconditioning_and_loss_follow_the_paper():
    sd = 0.5
    for sigma in (0.002, 0.3, 1.0, 80.0):
        c_skip, c_out, c_in, c_noise = ddpm.edm_preconditioning(sigma)
        assert c_skip == pytest.approx(sd ** 2 / (sigma ** 2 + sd ** 2), rel=1e-12)
        assert c_out == pytest.approx(sigma * sd / math.sqrt(sigma ** 2 + sd ** 2), rel=1e-12)
        assert c_in == pytest.approx(1 / math.sqrt(sigma ** 2 + sd ** 2), rel=1e-12)
        assert c_noise == pytest.approx(math.log(sigma) / 4, rel=1e-12)

    class Fixed(nn.Module):
        def forward(self, x, c_noise):
            return 0.7 * x - 0.1 * c_noise.view(-1, 1, 1, 1)

    d = ddpm.GaussianDiffusion(Fixed(), config=ddpm.ModelConfig(objective="edm"))
    g = torch.Generator().manual_seed(4)
    x0, n = torch.rand(5, 3, 4, 4, generator=g) * 2 - 1, torch.randn(5, 3, 4, 4, generator=g)
    sigma = torch.tensor([0.01, 0.2, 1.0, 5.0, 60.0])
    s = sigma.double().view(-1, 1, 1, 1)
    x = x0.double() + s * n.double()
    F = 0.7 * (x / (s ** 2 + sd ** 2).sqrt()) - 0.1 * (s.log() / 4)
    D = sd ** 2 / (s ** 2 + sd ** 2) * x + s * sd / (s ** 2 + sd ** 2).sqrt() * F
    want = ((s ** 2 + sd ** 2) / (s * sd) ** 2 * (D - x0.double()) ** 2).mean()  # lambda(sigma) ||D - x_0||^2
    assert d(x0, sigma, n).item() == pytest.approx(want.item(), rel=1e-5)
    # the training noise levels: ln sigma ~ N(P_mean, P_std^2)
    levels = d.training_noise_levels(200_000, "cpu", torch.Generator().manual_seed(5), -1.2, 1.2).log()
    assert abs(levels.mean().item() + 1.2) < 0.02 and abs(levels.std().item() - 1.2) < 0.02


def test_an_edm_model_trains_samples_and_is_bounded_from_the_command_line(tmp_path, capsys):
    run = ["--train", "--demo", "--demo-images", "8", *MODEL, "--batch-size", "4", "--max-steps", "2", *QUIET,
           "--objective", "edm", *dirs(tmp_path)]
    assert ddpm.main(run) == 0
    obj = ddpm.read_checkpoint(ddpm.newest_checkpoint(tmp_path / "ckpt"))
    assert obj["config"]["objective"] == "edm" and obj["train"]["edm_p_mean"] == -1.2
    base = ["--loadckpt", str(tmp_path / "ckpt"), "--device", "cpu", "--num-samples", "2", "--seed", "1"]
    for sampler in ("dpm++", "heun", "ddpm"):
        assert ddpm.main([*base, "--sampler", sampler, "--steps", "6", "--save-dir", str(tmp_path / sampler)]) == 0
    assert ddpm.main([*base, "--eval", "nll", "--nll-timesteps", "4"]) == 0
    assert "NLL:" in capsys.readouterr().out
    assert ddpm.main([*run[:-4], "--loss-weight", "min-snr", *dirs(tmp_path / "w")]) == 2
    assert "not defined for --objective edm" in capsys.readouterr().err


def test_autoguidance_is_plain_sampling_at_weight_1_and_with_itself_as_guide(tiny_run, tmp_path):
    model = ddpm.load_model(tiny_run / "ckpt")
    other = ddpm.load_model(tiny_run / "ckpt" / "ckpt-0.pth")  # an earlier step of the run: a real guide
    rt = ddpm.Runtime(torch.device("cpu"), "fp32")
    net = ddpm.sampling_net(model, rt)
    for spec in (ddpm.SampleSpec(), ddpm.SampleSpec("heun", 9), ddpm.SampleSpec("ddpm", 10)):
        plain = ddpm.generate(model, rt, range(4), 3, spec, model_fn=net, show_progress=False)
        for guide, w in ((other, 1.0), (model, 2.5), (model, 0.0)):
            fn = ddpm.Guidance(net, guide, ddpm.sampling_net(guide, rt), w)
            got = ddpm.generate(model, rt, range(4), 3, spec, model_fn=fn, show_progress=False)
            assert torch.equal(got, plain), (spec.sampler, w)
        fn = ddpm.Guidance(net, other, ddpm.sampling_net(other, rt), 2.0)  # a real guide at w != 1 changes them
        assert not torch.equal(ddpm.generate(model, rt, range(4), 3, spec, model_fn=fn, show_progress=False), plain)


def test_guide_snapshot_and_guidance_from_the_command_line(tmp_path, capsys):
    run = ["--train", "--demo", "--demo-images", "8", *MODEL, "--batch-size", "4", "--epochs", "2", *QUIET,
           "--guide-snapshot", "0.5", *dirs(tmp_path)]
    assert ddpm.main(run) == 0
    guide = ddpm.read_checkpoint(tmp_path / "ckpt" / "guide.pth")
    assert guide["step"] == 2 and ddpm.read_checkpoint(ddpm.newest_checkpoint(tmp_path / "ckpt"))["step"] == 4
    capsys.readouterr()
    base = ["--loadckpt", str(tmp_path / "ckpt"), "--device", "cpu", "--num-samples", "2", "--seed", "1"]
    assert ddpm.main([*base, "--guide", str(tmp_path / "ckpt" / "guide.pth"), "--guidance", "1",
                      "--save-dir", str(tmp_path / "g1")]) == 0
    assert "weight 1 is plain sampling, so the guide is not run" in capsys.readouterr().out
    assert ddpm.main([*base, "--guide", str(tmp_path / "ckpt" / "guide.pth"), "--guidance", "2",
                      "--save-dir", str(tmp_path / "g2")]) == 0
    assert "two networks per model call" in capsys.readouterr().out
    assert ddpm.main([*base, "--save-dir", str(tmp_path / "plain")]) == 0
    assert (pixels(tmp_path / "g1" / "ddpm-0.png") == pixels(tmp_path / "plain" / "ddpm-0.png")).all()
    # a guide of other images is refused in one line
    other = tmp_path / "other"
    assert ddpm.main(["--train", "--demo", "--demo-images", "8", "--img-size", "16", "--num-channels", "32",
                      "--channel-multiples", "1", "2", "--has-attn", "f", "t", "--num-blocks", "1", "--timesteps",
                      "50", "--batch-size", "4", "--max-steps", "1", *QUIET, *dirs(other)]) == 0
    capsys.readouterr()
    assert ddpm.main([*base, "--guide", str(other / "ckpt"), "--save-dir", str(tmp_path / "bad")]) == 2
    assert "a guide must be a model of the same data" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# every sampler, grid, schedule and objective against Gaussian data
# ----------------------------------------------------------------------------------------------

def sampling_errors(objectives=("eps", "v", "edm"), schedules=("linear", "cosine")) -> list:
    """The cases where sampling Gaussian data N(MU2, S2^2) with its exact network (GaussianNet) misses,
    with every sampler on every grid: at 100 model calls the sample mean within 0.03 of MU2 and the
    deviation within 5% of S2 (8% for the ancestral sampler, whose large variance is an upper bound at
    few steps); at 25 calls, where the grids take big first steps, within 25% (the discretisation
    error of a sound solver there is up to 16%). What a wrong formula gives is far outside: Heun started
    from T-1 (not its sigma 80) on the uniform grid of the cosine schedule has a deviation of 0.93 at 25
    calls, not 0.3;
    EDM's c_skip applied to x_t instead of x_t / sqrt(alpha_bar) takes 10% or more off the deviation
    with the deterministic samplers at 100 calls."""
    bad = []
    for objective in objectives:
        for schedule in schedules:
            d = gaussian_diffusion(objective, schedule, MU2, S2)
            x_T = torch.randn(1, 1, 64, 64, generator=torch.Generator().manual_seed(0))
            for sampler in ddpm.SAMPLERS:
                for grid in ddpm.GRIDS:
                    for calls, tol in ((100, 0.08 if sampler == "ddpm" else 0.05), (25, 0.25)):
                        g = torch.Generator().manual_seed(1)
                        out = d.sample(x_T.clone(), ddpm.SampleSpec(sampler, calls, clip=False, grid=grid),
                                       model_fn=d.eps_model, noise_fn=lambda: torch.randn(x_T.shape, generator=g))
                        m, s = out.mean().item(), out.std().item()
                        if not (abs(m - MU2) < 0.03 and abs(s / S2 - 1) < tol):
                            bad.append(f"{objective} {schedule} {sampler} {grid} {calls}: mean {m:.3f}, std {s:.3f}")
    return bad


@pytest.mark.parametrize("objective", ["eps", "v", "edm"])
def test_every_sampler_on_every_grid_samples_gaussian_data(objective):
    """Catches a first step that is not sound (Heun from T-1 on the uniform grid) and a wrong conversion
    between an objective's output and x_0 (see sampling_errors)."""
    assert sampling_errors([objective]) == []


def test_autoguidance_follows_its_closed_form_with_a_guide_that_differs():
    """D = D_guide + w (D_model - D_guide) at the same noise level, the guide a model of other Gaussian
    data, so that its role cannot be swapped unnoticed (x_0 + w (x_0 of the guide - x_0) fails)."""
    main, guide = gaussian_diffusion("v", "cosine"), gaussian_diffusion("edm", "cosine", mu=-0.2, s=0.3)
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(6))
    spec = ddpm.SampleSpec(clip=False)
    for w in (0.0, 1.0, 2.0, 3.5):
        fn = ddpm.Guidance(main.eps_model, guide, guide.eps_model, w)
        for t in (10, 400, 731.5, 990):
            sigma = main.sigma(t)
            xe = x.double() * math.sqrt(1 + sigma ** 2)  # EDM's x at x_t
            d_main = MU + S * S / (S * S + sigma ** 2) * (xe - MU)
            d_guide = -0.2 + 0.09 / (0.09 + sigma ** 2) * (xe + 0.2)
            x0 = main.predict(x, t, spec, fn)[0]
            torch.testing.assert_close(x0.double(), d_guide + w * (d_main - d_guide), rtol=2e-5, atol=2e-5)


def test_the_closed_form_tests_catch_a_one_line_change(monkeypatch):
    """The mutations the tests above name each fail them."""
    real_denoise, real_grid = ddpm.GaussianDiffusion.denoise, ddpm.GaussianDiffusion.grid

    def mutated(skip_on_xt: bool):
        def denoise(self, xt, t, ab_t=None, model_fn=None):  # EDM's conversion with one line changed
            if self.objective != "edm":
                return real_denoise(self, xt, t, ab_t, model_fn)
            c_skip, c_out, c_in, c_noise = ddpm.edm_preconditioning(ddpm.sqrt_of((1 - ab_t) / ab_t))
            x = xt / ddpm.sqrt_of(ab_t)
            out = (model_fn or self.eps_model)(c_in * (x if skip_on_xt else xt), self._time_input(c_noise, xt))
            x0 = c_skip * (xt if skip_on_xt else x) + c_out * out.to(xt.dtype)
            return x0, (xt - ddpm.sqrt_of(ab_t) * x0) / ddpm.sqrt_of(1 - ab_t)
        return denoise

    def uncapped(self, spec, start=None):  # Heun started from T-1 where the uniform grid starts
        grid = real_grid(self, spec, start)
        return [float(self.timesteps - 1)] + grid[1:] if spec.grid == "uniform" and grid else grid
    for skip_on_xt in (True, False):  # c_skip applied to x_t instead of x; c_in applied to x_t instead of x
        monkeypatch.setattr(ddpm.GaussianDiffusion, "denoise", mutated(skip_on_xt))
        assert denoiser_error("edm") > 0.05, skip_on_xt
        if skip_on_xt:
            assert len(sampling_errors(["edm"], ["cosine"])) >= 6
        monkeypatch.undo()
    monkeypatch.setattr(ddpm.GaussianDiffusion, "grid", uncapped)
    assert any("cosine heun uniform" in e for e in sampling_errors(["eps"], ["cosine"]))
    monkeypatch.undo()
    monkeypatch.setattr(ddpm.Guidance, "combine", lambda self, x0, x0_g: x0 + self.weight * (x0_g - x0))
    with pytest.raises(AssertionError):
        test_autoguidance_follows_its_closed_form_with_a_guide_that_differs()


# ----------------------------------------------------------------------------------------------
# Heun's calls and churn, as the paper counts them
# ----------------------------------------------------------------------------------------------

def test_heun_makes_the_model_calls_asked_for_and_churns_every_level():
    """--steps counts model calls for every sampler, even or odd (an even count takes its first step
    with Euler's one call); with --churn, gamma = min(S_churn / N, sqrt(2) - 1) with N the number of
    noise levels (Karras et al. 2022, Alg. 2), at every level including the last before sigma = 0."""
    d = gaussian_diffusion(schedule="cosine")
    x_T = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    for calls in (1, 2, 9, 10, 25, 50):
        seen = []
        spec = ddpm.SampleSpec("heun", calls, clip=False)
        d.sample(x_T.clone(), spec, model_fn=lambda x, t: (seen.append(float(t[0])), d.eps_model(x, t))[1])
        assert len(seen) == calls == d.calls(spec), (calls, len(seen))
    for churn in (2.0, 40.0):
        spec = ddpm.SampleSpec("heun", 9, clip=False, churn=churn)
        grid = d.grid(spec)
        n = len(grid)
        gamma = min(churn / n, math.sqrt(2) - 1)
        first_calls, draws = [], []
        calls = iter(range(1000))

        def fn(x, t):
            if next(calls) % 2 == 0:  # the first call of each level (the last level has one call only)
                first_calls.append(float(t[0]))
            return d.eps_model(x, t)
        d.sample(x_T.clone(), spec, model_fn=fn, noise_fn=lambda: (draws.append(1), torch.zeros_like(x_T))[1])
        want = [d.t_of_sigma(d.sigma(t) * (1 + gamma)) for t in grid]
        assert len(draws) == n and first_calls == pytest.approx(want, abs=1e-3), (first_calls, want)  # float32 t


def test_interpolation_with_a_churned_sampler_is_deterministic(tiny_run, tmp_path):
    for k in (1, 2):
        assert ddpm.main(["--loadckpt", str(tiny_run / "ckpt"), "--device", "cpu", "--num-samples", "1",
                          "--sampler", "heun", "--churn", "5", "--steps", "9", "--interpolate", "1", "2",
                          "--seed", str(k), "--save-dir", str(tmp_path / str(k))]) == 0
    assert (pixels(tmp_path / "1" / "interpolate.png") == pixels(tmp_path / "2" / "interpolate.png")).all()


def test_a_guide_that_cannot_cover_the_models_noise_levels_is_refused(tiny_run, tmp_path, capsys):
    other = tmp_path / "linear"
    assert ddpm.main(["--train", "--demo", "--demo-images", "8", *MODEL, "--beta-schedule", "linear",
                      "--batch-size", "4", "--max-steps", "1", *QUIET, *dirs(other)]) == 0
    capsys.readouterr()
    base = ["--loadckpt", str(tiny_run / "ckpt"), "--device", "cpu", "--num-samples", "1", "--save-dir",
            str(tmp_path / "o")]
    assert ddpm.main([*base, "--guide", str(other / "ckpt")]) == 2
    line = one_line(capsys.readouterr().err)
    assert "(linear schedule, T = 50)" in line and "(cosine schedule, T = 50)" in line and "must cover" in line
    assert ddpm.main([*base, "--guide", str(tiny_run / "ckpt" / "ckpt-0.pth"), "--eval", "nll"]) == 2
    assert "--eval nll measures the model's own bound" in one_line(capsys.readouterr().err)
    assert ddpm.main([*base, "--sampler", "heun", "--churn", "100", "--steps", "9"]) == 0
    assert "--churn 100 is above its cap: each of the 5 noise levels" in capsys.readouterr().err
    assert not (tmp_path / "o" / "sample-2").exists()
