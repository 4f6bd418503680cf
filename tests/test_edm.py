"""The EDM family (Karras et al. 2022, 2024): Heun on the Karras grid, the VP model seen as EDM's
denoiser, EDM's preconditioning and loss, and autoguidance. Expected values come from the papers'
formulas written here, and from Gaussian data, whose optimal denoiser and probability-flow ODE are
known in closed form."""
import math

import pytest
import torch
from torch import nn

import ddpm
from conftest import MODEL, QUIET, dirs, pixels

MU, S = 0.3, 0.5  # every pixel of x_0 is N(MU, S^2)


class GaussianNet(nn.Module):
    """The exact eps (or v) at x_t for Gaussian data, at any timestep the sampler asks for, integer or
    not: the noise level is the diffusion's own alpha_bar(t)."""

    def __init__(self, diffusion_ref: list, objective: str = "eps"):
        super().__init__()
        self.ref, self.objective = diffusion_ref, objective

    def forward(self, x, t):
        d = self.ref[0]
        a = torch.tensor([d.ab(float(v)) for v in t.tolist()], dtype=torch.float64).view(-1, 1, 1, 1)
        x = x.double()
        eps = (1 - a).sqrt() * (x - a.sqrt() * MU) / (a * S * S + 1 - a)
        if self.objective == "v":
            return ((eps - (1 - a).sqrt() * x) / a.sqrt()).float()
        return eps.float()


def gaussian_diffusion(objective: str = "eps", schedule: str = "linear") -> ddpm.GaussianDiffusion:
    ref = []
    d = ddpm.GaussianDiffusion(GaussianNet(ref, objective), config=ddpm.ModelConfig(objective=objective,
                                                                                    beta_schedule=schedule))
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
    for calls in (9, 17, 33, 65):  # 5, 9, 17, 33 grid points: the step halves each time
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


@pytest.mark.parametrize("objective", ["eps", "v"])
def test_the_vp_model_seen_as_edm_round_trips(objective):
    """sigma and the (fractional) timestep invert each other; at an integer timestep the interpolated
    noise level is the schedule's own; EDM's denoiser D(x; sigma) read from the VP model's output at
    x_t = x / sqrt(1 + sigma^2) is its x_0 estimate, and x_t = sqrt(alpha_bar) x."""
    d = gaussian_diffusion(objective)
    for t in (0, 1, 17, 250.5, 500, 731.25, 998.9, 999):
        sigma = d.sigma(t)
        assert d.t_of_sigma(sigma) == pytest.approx(t, abs=1e-6)
        assert d.ab(t) == pytest.approx(1 / (1 + sigma ** 2), rel=1e-6)
        if float(t).is_integer():
            assert d.ab(t) == pytest.approx(float(d.alpha_bar_f64[int(t)]), rel=1e-12)
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 3
    for t in (5, 250.5, 900):
        ab = d.ab(t)
        sigma = math.sqrt((1 - ab) / ab)
        x_vp = (x / math.sqrt(1 + sigma ** 2)).float()
        assert torch.allclose(x_vp.double(), math.sqrt(ab) * x, rtol=1e-6, atol=1e-6)
        x0, eps = d.predict(x_vp, t, ddpm.SampleSpec(clip=False), d.eps_model)
        D = MU + S * S / (S * S + sigma ** 2) * (x - MU)  # the optimal denoiser, EDM's D(x; sigma)
        torch.testing.assert_close(x0.double(), D, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(x_vp.double(), math.sqrt(ab) * x0.double() + math.sqrt(1 - ab) * eps.double(),
                                   rtol=1e-5, atol=1e-5)


def test_edm_preconditioning_and_loss_follow_the_paper():
    sd = 0.5
    for sigma in (0.002, 0.3, 1.0, 80.0):
        c_skip, c_out, c_in, c_noise = ddpm.edm_preconditioning(sigma)
        assert c_skip == pytest.approx(sd ** 2 / (sigma ** 2 + sd ** 2), rel=1e-12)
        assert c_out == pytest.approx(sigma * sd / math.sqrt(sigma ** 2 + sd ** 2), rel=1e-12)
        assert c_in == pytest.approx(1 / math.sqrt(sigma ** 2 + sd ** 2), rel=1e-12)
        assert c_noise == pytest.approx(math.log(sigma) / 4, rel=1e-12)
        assert ddpm.edm_loss_weight(sigma) == pytest.approx((sigma ** 2 + sd ** 2) / (sigma * sd) ** 2, rel=1e-12)

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
