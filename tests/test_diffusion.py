"""Gaussian diffusion: the schedule, q(x_t | x_0), the posterior, the loss, the reverse step, the
samplers against data whose optimal denoiser is known exactly, per-image seeds, and the EMA.

Every expected value is computed here in float64 from the formulas of Ho et al. 2020, Song et al.
2020 (DDIM) and Lu et al. 2022 (DPM-Solver++), not read from ddpm.py's buffers.
"""
import math

import pytest
import torch
from torch import nn

import ddpm

T = 1000
BETA_MIN, BETA_MAX = 1e-4, 0.02
BETA = [BETA_MIN + (BETA_MAX - BETA_MIN) * i / (T - 1) for i in range(T)]
ALPHA_BAR = []
for _b in BETA:
    ALPHA_BAR.append((ALPHA_BAR[-1] if ALPHA_BAR else 1.0) * (1 - _b))
AB = torch.tensor(ALPHA_BAR, dtype=torch.float64)


class Affine(nn.Module):
    """A deterministic stand-in for eps_theta that depends on x and t."""

    def forward(self, x, t):
        return 0.3 * x + 0.001 * t.float().view(-1, 1, 1, 1) - 0.2


def tiny_cfg(**kw) -> ddpm.ModelConfig:
    d = dict(img_channels=3, img_size=8, num_channels=32, channel_multiples=(1, 2), has_attn=(False, True),
             num_blocks=1, timesteps=50)
    d.update(kw)
    return ddpm.ModelConfig(**d)


# -- schedule -------------------------------------------------------------------------------------

def test_schedule_matches_closed_form():
    d = ddpm.GaussianDiffusion(Affine())
    ab = d.alpha_bar_f64
    assert ab.dtype == torch.float64
    assert torch.all(ab[1:] < ab[:-1]) and ab.min() > 0 and ab.max() < 1
    assert torch.all(d.alpha_bar[1:] < d.alpha_bar[:-1]) and d.alpha_bar.min() > 0 and d.alpha_bar.max() < 1
    torch.testing.assert_close(ab, AB, rtol=1e-12, atol=0)
    torch.testing.assert_close(d.beta.double(), torch.tensor(BETA, dtype=torch.float64), rtol=1e-6, atol=0)
    torch.testing.assert_close(d.alpha_bar.double(), AB, rtol=1e-6, atol=0)
    torch.testing.assert_close(d.alpha_bar_prev_f64, torch.cat([AB.new_ones(1), AB[:-1]]), rtol=1e-12, atol=0)
    assert ALPHA_BAR[-1] < 1e-4  # x_T is close to pure noise


# -- forward process ------------------------------------------------------------------------------

def test_q_sample_moments():
    d = ddpm.GaussianDiffusion(Affine())
    ts = [0, 10, 250, 500, 999]
    values = [0.9, -0.5, 0.3, 1.0, -1.0]
    n = 128 * 128
    x0 = torch.tensor(values).view(-1, 1, 1, 1).expand(-1, 1, 128, 128).contiguous()
    torch.manual_seed(0)
    xt = d.q_sample(x0, torch.tensor(ts)).double().flatten(1)
    for k, (t, v) in enumerate(zip(ts, values)):
        mean, var = math.sqrt(ALPHA_BAR[t]) * v, 1 - ALPHA_BAR[t]
        # 5 standard errors of the sample mean and of the sample variance (Gaussian)
        assert abs(xt[k].mean().item() - mean) < 5 * math.sqrt(var / n), (t, xt[k].mean().item(), mean)
        assert abs(xt[k].var().item() - var) < 5 * var * math.sqrt(2 / n), (t, xt[k].var().item(), var)


def test_q_posterior_closed_form_and_bayes():
    d = ddpm.GaussianDiffusion(Affine())
    ts = [0, 1, 5, 100, 500, 999]
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(len(ts), 2, 3, 3, generator=g)
    xt = torch.randn(len(ts), 2, 3, 3, generator=g)
    mean, var = d.q_posterior(x0, xt, torch.tensor(ts))
    for k, t in enumerate(ts):
        ab, ab_prev, beta = ALPHA_BAR[t], (ALPHA_BAR[t - 1] if t > 0 else 1.0), BETA[t]
        # eq. 6-7 of Ho et al.
        c1, c2 = math.sqrt(ab_prev) * beta / (1 - ab), math.sqrt(1 - beta) * (1 - ab_prev) / (1 - ab)
        want_var = (1 - ab_prev) / (1 - ab) * beta
        want_mean = c1 * x0[k].double() + c2 * xt[k].double()
        torch.testing.assert_close(mean[k].double(), want_mean, rtol=1e-5, atol=1e-6)
        assert var[k].unique().numel() == 1
        assert math.isclose(var[k].flatten()[0].item(), want_var, rel_tol=1e-5, abs_tol=1e-12)
        if t == 0:  # x_{-1} is x_0 itself
            assert want_var == 0 and math.isclose(c1, 1) and c2 == 0
            continue
        # Bayes on scalars: q(x_t | x_{t-1}) = N(sqrt(alpha_t) x_{t-1}, beta_t) times
        # q(x_{t-1} | x_0) = N(sqrt(ab_prev) x_0, 1 - ab_prev), as a Gaussian in x_{t-1}
        for a0, at in [(0.7, -0.2), (-1.0, 1.5), (0.0, 0.3)]:
            precision = (1 - beta) / beta + 1 / (1 - ab_prev)
            m = (math.sqrt(1 - beta) * at / beta + math.sqrt(ab_prev) * a0 / (1 - ab_prev)) / precision
            m_code, v_code = d.q_posterior(torch.full((1, 1, 1, 1), a0), torch.full((1, 1, 1, 1), at),
                                           torch.tensor([t]))
            assert math.isclose(m_code.item(), m, rel_tol=1e-5, abs_tol=1e-6), (t, m_code.item(), m)
            assert math.isclose(v_code.item(), 1 / precision, rel_tol=1e-5), (t, v_code.item(), 1 / precision)


# -- loss and reverse step ------------------------------------------------------------------------

@torch.no_grad()
def test_loss_is_epsilon_mse():
    torch.manual_seed(0)
    net = ddpm.UNet.from_config(tiny_cfg()).eval()
    d = ddpm.GaussianDiffusion(net, timesteps=50)
    ab = torch.tensor([math.prod(1 - (BETA_MIN + (BETA_MAX - BETA_MIN) * i / 49) for i in range(t + 1))
                       for t in range(50)], dtype=torch.float64)
    x0 = torch.rand(4, 3, 8, 8) * 2 - 1
    t = torch.tensor([0, 7, 30, 49])
    noise = torch.randn(4, 3, 8, 8)
    a = ab[t].view(-1, 1, 1, 1)
    xt = (a.sqrt() * x0.double() + (1 - a).sqrt() * noise.double()).float()
    want = ((noise.double() - net(xt, t).double()) ** 2).mean().item()
    got = d(x0, t, noise).item()
    assert math.isclose(got, want, rel_tol=1e-5), (got, want)
    # t and noise matter: a different noise gives a different loss
    assert not math.isclose(d(x0, t, noise.flip(0)).item(), want, rel_tol=1e-3)


@torch.no_grad()
def test_p_sample_original_semantics():
    d = ddpm.GaussianDiffusion(Affine())
    ts = [0, 1, 500, 999]
    g = torch.Generator().manual_seed(0)
    xt = torch.randn(len(ts), 2, 4, 4, generator=g)
    z = torch.randn(len(ts), 2, 4, 4, generator=g)
    t = torch.tensor(ts)
    got = d.p_sample(xt, t, eps=z).double()
    eps_theta = Affine()(xt, t).double()
    for k, tk in enumerate(ts):
        ab, beta = ALPHA_BAR[tk], BETA[tk]
        mean = (xt[k].double() - beta / math.sqrt(1 - ab) * eps_theta[k]) / math.sqrt(1 - beta)
        sigma = math.sqrt(beta) if tk > 0 else 0.0  # sigma_t^2 = beta_t, and no noise at t = 0
        torch.testing.assert_close(got[k], mean + sigma * z[k].double(), rtol=1e-5, atol=1e-5)
    # the noise enters with weight sqrt(beta_t) exactly where t > 0
    moved = (d.p_sample(xt, t, eps=z + 1).double() - got).flatten(1).mean(1)
    want = torch.tensor([math.sqrt(BETA[tk]) if tk > 0 else 0.0 for tk in ts], dtype=torch.float64)
    torch.testing.assert_close(moved, want, rtol=1e-4, atol=1e-6)


# -- samplers against an exact answer -------------------------------------------------------------

MU, S = 0.3, 0.5
SHAPE = (64, 1, 32, 32)  # 65536 independent pixels
N = math.prod(SHAPE)


def gaussian_eps(x, t):
    """E[eps | x_t] when every pixel of x_0 is N(MU, S^2): x_t ~ N(sqrt(ab) MU, ab S^2 + 1 - ab) and
    Cov(eps, x_t) = sqrt(1 - ab)."""
    a = AB[t].view(-1, 1, 1, 1)
    return ((1 - a).sqrt() * (x.double() - a.sqrt() * MU) / (a * S * S + 1 - a)).float()


def predicted_output(sampler, ts, eta, variance="large"):
    """Mean and std of the sampler's output for this data and x_T ~ N(0, 1), in float64.

    With the exact eps for Gaussian data, eps and x0_pred are affine in x_t, so every update is an
    affine map plus independent noise: propagate (mean, variance); for DPM-Solver++(2M) the affine
    dependence on x_T of x and of the previous x0_pred (x = a x_T + b)."""
    m, v = 0.0, 1.0                   # ddpm / ddim: mean and variance of x
    a, b, pa, pb, h_prev = 1.0, 0.0, None, None, None   # dpm++: x = a x_T + b, previous x0 = pa x_T + pb
    for i, t in enumerate(ts):
        s = ts[i + 1] if i + 1 < len(ts) else None
        at, as_ = ALPHA_BAR[t], (ALPHA_BAR[s] if s is not None else 1.0)
        k = math.sqrt(1 - at) / (at * S * S + 1 - at)             # eps = k x + e0
        e0 = -k * math.sqrt(at) * MU
        c0, d0 = (1 - math.sqrt(1 - at) * k) / math.sqrt(at), -math.sqrt(1 - at) * e0 / math.sqrt(at)  # x0 = c0 x + d0
        if sampler == "dpm++":
            x0a, x0b = c0 * a, c0 * b + d0
            if s is None:
                a, b = x0a, x0b
                continue
            lam = lambda ab_: 0.5 * math.log(ab_ / (1 - ab_))
            h = lam(as_) - lam(at)
            if pa is None:
                da, db = x0a, x0b                                  # first step: first order
            else:
                r = h_prev / h                                     # Lu et al. 2022, Alg. 2
                da, db = (1 + 1 / (2 * r)) * x0a - pa / (2 * r), (1 + 1 / (2 * r)) * x0b - pb / (2 * r)
            coef = math.sqrt((1 - as_) / (1 - at))
            a, b = coef * a - math.sqrt(as_) * (math.exp(-h) - 1) * da, coef * b - math.sqrt(as_) * (math.exp(-h) - 1) * db
            pa, pb, h_prev = x0a, x0b, h
            continue
        if s is None:
            A, B, sig = c0, d0, 0.0
        elif sampler == "ddpm":  # respaced ancestral step, sigma^2 = the respaced beta or the posterior's
            beta = 1 - at / as_
            A = (1 - beta / math.sqrt(1 - at) * k) / math.sqrt(1 - beta)
            B = -beta / math.sqrt(1 - at) * e0 / math.sqrt(1 - beta)
            sig = math.sqrt(beta if variance == "large" else (1 - as_) / (1 - at) * beta)
        else:  # DDIM, Song et al. eq. 12
            sig = eta * math.sqrt((1 - as_) / (1 - at) * (1 - at / as_))
            r = math.sqrt(1 - as_ - sig ** 2)
            A, B = math.sqrt(as_) * c0 + r * k, math.sqrt(as_) * d0 + r * e0
        m, v = A * m + B, A * A * v + sig * sig
    return (b, abs(a)) if sampler == "dpm++" else (m, math.sqrt(v))


def run_sampler(sampler, steps, eta, model_fn, seed=0, variance="large", objective="eps"):
    # T = 1000, the original's linear schedule; model_fn replaces eps_model
    d = ddpm.GaussianDiffusion(Affine(), config=ddpm.ModelConfig(objective=objective, beta_schedule="linear"))
    g = torch.Generator().manual_seed(seed)
    ts = []

    def fn(x, t):
        assert t.unique().numel() == 1
        ts.append(int(t[0]))
        return model_fn(x, t)
    x = torch.randn(SHAPE, generator=g)
    spec = ddpm.SampleSpec(sampler, steps, eta, clip=False, variance=variance)  # Gaussian data is unbounded
    out = d.sample(x, spec, noise_fn=lambda: torch.randn(SHAPE, generator=g), model_fn=fn)
    assert len(ts) == steps and ts[0] == T - 1 and ts[-1] == 0 and all(p > q for p, q in zip(ts, ts[1:]))
    return out.double(), ts


@pytest.mark.parametrize("sampler, steps, eta, converged", [
    ("ddpm", 1000, 0.0, True),
    ("dpm++", 20, 0.0, True),
    ("ddim", 50, 0.0, False),
    ("ddim", 200, 0.0, True),
    ("ddim", 100, 1.0, False),
    ("ddim", 500, 1.0, True),
])
def test_sampler_reproduces_gaussian_data(sampler, steps, eta, converged):
    """With the exact optimal eps, the output must (1) follow the distribution the algorithm's own
    update equations predict, within sampling error, and (2) where the step count makes the
    discretisation error small, be the data distribution N(MU, S^2): mean and std within 2%.
    (DDIM's bias at 50 steps, eta 0, is -5.6% of the std and at 100 steps, eta 1, -6.4%, since it
    leaves out the variance of x_0 given x_t: these only get check (1).)"""
    out, ts = run_sampler(sampler, steps, eta, gaussian_eps)
    mean, std = out.mean().item(), out.std().item()
    pm, ps = predicted_output(sampler, ts, eta)
    assert abs(mean - pm) < 5 * ps / math.sqrt(N), (mean, pm)
    assert abs(std - ps) < 5 * ps / math.sqrt(2 * N), (std, ps)
    if converged:
        assert abs(mean - MU) < 0.02 * MU, mean
        assert abs(std - S) < 0.02 * S, std


@pytest.mark.parametrize("steps, variance, spread", [(50, "large", "over"), (50, "small", "under"),
                                                    (1000, "large", "data"), (1000, "small", "data")])
def test_ddpm_variance_small_and_large(steps, variance, spread):
    """Both variances follow their own update equations. On this data, at 50 respaced steps sigma^2 =
    beta over-disperses (+3.5% std) and the posterior's beta-tilde under-disperses (-11%); at all
    1000 steps both give the data distribution."""
    out, ts = run_sampler("ddpm", steps, 0.0, gaussian_eps, variance=variance)
    mean, std = out.mean().item(), out.std().item()
    pm, ps = predicted_output("ddpm", ts, 0.0, variance)
    assert abs(mean - pm) < 5 * ps / math.sqrt(N) and abs(std - ps) < 5 * ps / math.sqrt(2 * N), (mean, std, pm, ps)
    got = "data" if abs(std - S) < 0.02 * S else ("over" if std > S else "under")
    assert got == spread, std


def gaussian_v(x, t):
    """The exact v = sqrt(ab) eps - sqrt(1 - ab) x_0 for the same data: (eps - sqrt(1 - ab) x_t) / sqrt(ab)."""
    a = AB[t].view(-1, 1, 1, 1)
    return ((gaussian_eps(x, t).double() - (1 - a).sqrt() * x.double()) / a.sqrt()).float()


@pytest.mark.parametrize("sampler, steps, eta", [("ddpm", 1000, 0.0), ("dpm++", 20, 0.0), ("ddim", 200, 0.0)])
def test_v_prediction_samples_the_same_distribution(sampler, steps, eta):
    out, ts = run_sampler(sampler, steps, eta, gaussian_v, objective="v")
    pm, ps = predicted_output(sampler, ts, eta)
    assert abs(out.mean().item() - pm) < 5 * ps / math.sqrt(N) and abs(out.std().item() - ps) < 5 * ps / math.sqrt(2 * N)
    assert abs(out.mean().item() - MU) < 0.02 * MU and abs(out.std().item() - S) < 0.02 * S


A0 = 0.6


def two_point_eps(x, t):
    """Pixels of x_0 are -A0 or +A0 with probability 1/2: E[x_0 | x_t] = A0 tanh(sqrt(ab) A0 x_t / (1 - ab))
    and eps = (x_t - sqrt(ab) E[x_0 | x_t]) / sqrt(1 - ab)."""
    a = AB[t].view(-1, 1, 1, 1)
    xd = x.double()
    x0 = A0 * torch.tanh(a.sqrt() * A0 * xd / (1 - a))
    return ((xd - a.sqrt() * x0) / (1 - a).sqrt()).float()


@pytest.mark.parametrize("sampler, steps", [("ddim", 50), ("dpm++", 20)])
def test_sampler_finds_both_modes_of_a_two_point_mixture(sampler, steps):
    out, _ = run_sampler(sampler, steps, 0.0, two_point_eps)
    near_plus = ((out - A0).abs() < 0.1).double().mean().item()
    near_minus = ((out + A0).abs() < 0.1).double().mean().item()
    assert 0.4 < near_plus < 0.6 and 0.4 < near_minus < 0.6, (near_plus, near_minus)
    assert near_plus + near_minus > 0.98, (near_plus, near_minus)


# -- per-image seeds ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    cfg = tiny_cfg()
    return ddpm.build_diffusion(cfg).eval()


@pytest.mark.parametrize("sampler", ddpm.SAMPLERS)
def test_images_do_not_depend_on_batch_size(tiny_model, sampler):
    rt = ddpm.Runtime(torch.device("cpu"), "fp32")
    kw = dict(seed=123, spec=ddpm.SampleSpec(sampler, 10), show_progress=False)
    one = ddpm.generate(tiny_model, rt, list(range(6)), batch_size=1, **kw)
    four = ddpm.generate(tiny_model, rt, list(range(6)), batch_size=4, **kw)
    assert one.shape == (6, 3, 8, 8) and one.dtype == torch.uint8
    assert torch.equal(one, four)
    alone = ddpm.generate(tiny_model, rt, [3], batch_size=4, **kw)  # what --index 3 generates
    assert torch.equal(alone[0], one[3])
    # images differ from each other and with the seed, so the equalities above are not trivial
    assert not torch.equal(one[0], one[1])
    other = ddpm.generate(tiny_model, rt, [3], batch_size=1, **{**kw, "seed": 124})
    assert not torch.equal(other[0], one[3])


# -- EMA ------------------------------------------------------------------------------------------

def test_ema_warmup_and_decay():
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    decay = 0.95
    ema = ddpm.EMA(model, decay)
    shadow = [p.detach().double().clone() for p in model.parameters()]
    for q, p in zip(ema.model.parameters(), model.parameters()):
        assert torch.equal(q, p) and q is not p and not q.requires_grad
    # steps where the warm-up (1 + n) / (10 + n) is below the decay, and where the decay wins
    for step, d in [(0, 0.1), (1, 2 / 11), (5, 0.4), (50, 51 / 60), (500, decay), (10_000, decay)]:
        assert d == min(decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn_like(p) * 3)
        ema.n.fill_(step)  # its count of updates, on the device
        ema.update()
        assert ema.n.item() == step + 1
        shadow = [d * e + (1 - d) * p.detach().double() for e, p in zip(shadow, model.parameters())]
        for q, e in zip(ema.model.parameters(), shadow):
            torch.testing.assert_close(q.double(), e, rtol=1e-6, atol=1e-6)
