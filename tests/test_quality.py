"""Quality options against closed forms: time conditioning that survives GroupNorm, norm groups,
v-prediction, Min-SNR-gamma, the cosine schedule, the signal-left warning, old checkpoints, and the
sliced Wasserstein distance (checked against scipy's 1-D Wasserstein distance)."""
import csv
import math

import numpy as np
import pytest
import torch

import ddpm
from conftest import MODEL, QUIET, copy_run, dirs


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
        got_x0, got_eps = d.denoise(xt, 500, ab, model_fn=lambda x, tt: v)  # a network that returns this v
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
        d = ddpm.GaussianDiffusion(Fixed(), config=ddpm.ModelConfig(objective=objective, beta_schedule="linear"))
        w_got = d.loss_weights(t, weight, 5.0)
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
    assert (legacy.norm_groups, legacy.objective, legacy.beta_schedule) == (32, "eps", "linear")


def test_new_models_get_the_recipe_that_won_and_the_original_flags_still_name_its_own(tmp_path):
    """The README's first used-by command trains the measured recipe; typing the original's four
    choices gives exactly the original's model config."""
    job = ddpm.parse_command_line(["--train", "--data-folders", str(tmp_path)])
    c = job.cfg
    assert (c.time_cond, c.norm_groups, c.objective, c.beta_schedule) == ("scale-shift", 32, "v", "cosine")
    demo = ddpm.parse_command_line(["--train", "--demo"]).cfg  # 8 groups won at the demo's 32 channels
    assert (demo.time_cond, demo.norm_groups, demo.objective, demo.beta_schedule) == ("scale-shift", 8, "v", "cosine")
    assert c == ddpm.ModelConfig()  # the parser and the dataclass agree
    job = ddpm.parse_command_line(["--train", "--data-folders", str(tmp_path), "--time-cond", "add",
                                   "--norm-groups", "32", "--objective", "eps", "--beta-schedule", "linear"])
    assert job.cfg == ddpm.ModelConfig(**ddpm.OLD_CHECKPOINT_DEFAULTS)


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


# -- the real-image yardstick and quality during training ------------------------------------------

def test_the_yardstick_separates_real_from_untrained_and_sees_colour_shifts(tmp_path):
    from PIL import Image

    folder = tmp_path / "pics"
    folder.mkdir()
    faces = ddpm.demo_faces(64, 16, seed=3)
    for i, img in enumerate(faces):  # a small messy folder: RGBA and palette files among RGB ones
        im = Image.fromarray(img.permute(1, 2, 0).numpy())
        (im.convert("RGBA") if i % 3 == 0 else im.convert("P") if i % 3 == 1 else im).save(folder / f"{i}.png")
    real = ddpm.load_images([folder], 16)
    a, b = real[:32], real[32:]
    model = ddpm.build_diffusion(ddpm.ModelConfig(img_size=16, num_channels=16, channel_multiples=(1, 2),
                                                  has_attn=(False, True), num_blocks=1, timesteps=50, norm_groups=8))
    rt = ddpm.Runtime(torch.device("cpu"), "fp32")
    fake = ddpm.generate(model.eval(), rt, range(32), 0, ddpm.SampleSpec(steps=5), show_progress=False)
    floor, untrained = ddpm.swd(b, a)["mean"], ddpm.swd(fake, a)["mean"]
    assert floor < 0.5 * untrained, (floor, untrained)
    # SWD barely sees a brightness shift of 20 levels; the colour statistic measures it
    shifted = (b.int() + 20).clamp(0, 255).to(torch.uint8)
    gap = ddpm.colour_gap(shifted, b)["mean"]
    assert gap == pytest.approx(float((shifted.double() - b.double()).mean((0, 2, 3)).abs().max()), abs=1e-9)
    assert gap > 12 and ddpm.colour_gap(b, b) == {"mean": 0.0, "std": 0.0}
    assert ddpm.swd(shifted, b)["mean"] < 0.5 * floor  # while SWD calls the shifted set closer than another real one


def test_eval_every_logs_its_rows_and_keeps_the_best_checkpoint(tmp_path, monkeypatch, capsys):
    # a run whose quality is forced to get better, then worse: best.pth stays at the best step
    values = iter([50.0, 40.0, 30.0, 35.0, 45.0, 60.0])
    real_measure = ddpm.QualityProbe.measure

    def measure(self, model, rt):
        return {**real_measure(self, model, rt), "swd": next(values)}  # the real sampling and SWD, a forced mean
    monkeypatch.setattr(ddpm.QualityProbe, "measure", measure)
    argv = ["--train", "--demo", "--demo-images", "8", *MODEL, "--batch-size", "4", "--epochs", "3", "--seed", "0",
            "--device", "cpu", "--no-run-pictures", "--sample-every", "0", "--log-every", "1", "--eval-every", "1",
            "--eval-samples", "4", *dirs(tmp_path)]
    assert ddpm.main(argv) == 0
    out = capsys.readouterr().out
    assert "eval: every 1 steps, 4 samples (dpm++, 25 steps, EMA) against 4 held-out images of 8 new demo faces" in out
    assert "s per evaluation" in out and "eval: 6 evaluations took" in out and "best SWD 30.00 at step 3" in out
    rows = [r for r in csv.DictReader(open(tmp_path / "ckpt" / "metrics.csv")) if r["swd"]]
    assert [(int(r["step"]), float(r["swd"])) for r in rows] == list(zip(range(1, 7), [50.0, 40.0, 30.0, 35.0, 45.0,
                                                                                     60.0]))
    for r in rows:  # beside the mean, the SWD of each pyramid level (8 px: one) and the colour gap SWD cannot see
        assert r["swd_levels"].startswith("8:") and float(r["colour_mean"]) >= 0 and float(r["colour_std"]) >= 0
    assert "eval at step 1: SWD 50.00 (8px " in out and "colour gap" in out
    best = ddpm.read_checkpoint(tmp_path / "ckpt" / "best.pth")
    assert best["step"] == 3 and best["quality"]["best_swd"] == 30.0
    newest = ddpm.read_checkpoint(ddpm.newest_checkpoint(tmp_path / "ckpt"))
    assert newest["step"] == 6 and newest["quality"]["best_step"] == 3
    assert (tmp_path / "out" / "quality.png").is_file()
    assert ddpm.main(["--info", str(tmp_path / "ckpt")]) == 0
    assert "best SWD 30.00 at step 3" in capsys.readouterr().out
    # resumed, the best so far is remembered: a worse figure does not replace best.pth
    values = iter([33.0, 31.0])
    before = (tmp_path / "ckpt" / "best.pth").read_bytes()
    assert ddpm.main(["--train", "--resume", *dirs(tmp_path), "--epochs", "4"]) == 0
    assert (tmp_path / "ckpt" / "best.pth").read_bytes() == before
    # a folder of images needs held-out images for it
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, img in enumerate(ddpm.demo_faces(8, 8)):
        ddpm.save_png(img, folder / f"{i}.png")
    assert ddpm.main(["--train", "--data-folders", str(folder), *MODEL, "--batch-size", "4", "--eval-every", "1",
                      "--device", "cpu", "--ckpt-save-dir", str(tmp_path / "c2"), "--save-dir", str(tmp_path / "o2")]) == 2
    assert "--eval-every needs held-out images" in capsys.readouterr().err


def test_checkpoints_of_format_3_keep_their_training_options(tiny_run, tmp_path, capsys):
    """Before format 4, dropout and the loss weighting were in the model config: a resume and a
    fine-tune read them from there."""
    ckpt = copy_run(tiny_run, tmp_path)
    for path in ckpt.glob("ckpt-*.pth"):
        obj = ddpm.read_checkpoint(path)
        for k in ("dropout", "loss_weight", "min_snr_gamma"):
            obj["config"][k] = {"dropout": 0.3, "loss_weight": "min-snr", "min_snr_gamma": 4.0}[k]
            obj["train"].pop(k, None)
        obj["version"] = 3
        torch.save(obj, path)
    capsys.readouterr()
    assert ddpm.main(["--train", "--resume", *dirs(tmp_path), "--epochs", "3"]) == 0
    new = ddpm.read_checkpoint(ddpm.newest_checkpoint(ckpt))
    assert (new["train"]["dropout"], new["train"]["loss_weight"], new["train"]["min_snr_gamma"]) == (0.3, "min-snr", 4.0)
    assert "dropout" not in new["config"] and new["version"] == ddpm.FORMAT_VERSION
    old = tmp_path / "old.pth"
    obj = ddpm.read_checkpoint(ckpt / "ckpt-1.pth")
    torch.save(obj, old)
    assert ddpm.main(["--loadckpt", str(old), "--num-samples", "2", "--steps", "3", "--device", "cpu",
                      "--save-dir", str(tmp_path / "s")]) == 0


def test_the_probe_reads_the_same_places_every_time(capsys):
    """--eval-every's figure of one set of samples is the same to the last digit every time, and a small
    change to the samples moves it a little (patches at the same places in every image, from the
    probe's seed: one level more in one pixel of 64 images moves it by 1e-6 here; with places drawn
    from each image's own pixels, by 0.4%, and by up to 4% on other sets)."""
    held = ddpm.demo_faces(192, 32, seed=3)
    probe = ddpm.QualityProbe(held, 64, 1, 0, "test faces")
    fake = ddpm.demo_faces(64, 32, seed=4)
    a, b = probe.compare(fake), probe.compare(fake.clone())
    assert a == b
    nudged = fake.clone()
    nudged[0, 0, 16, 16] += 1 if nudged[0, 0, 16, 16] < 255 else -1
    c = probe.compare(nudged)
    assert c != a and abs(c["swd"] / a["swd"] - 1) < 0.001, (a["swd"], c["swd"])
    # the colour gap SWD cannot see: a shift of every pixel by 10 levels
    shifted = (fake.int() + 10).clamp(0, 255).to(torch.uint8)
    assert probe.compare(shifted)["colour_mean"] > a["colour_mean"] + 8


def test_best_is_only_recorded_for_weights_that_are_saved(tmp_path, monkeypatch, capsys):
    """The best step is recorded after the weights' finite check: best.pth is never older than the step
    it claims."""
    real_finite, poisoned = ddpm.Trainer.weights_finite, []

    def finite(self):  # the weights are not finite when the first evaluation looks at them
        if self.probe is not None and self.probe.count == 1 and not poisoned:
            poisoned.append(self.pos.step)
            return False
        return real_finite(self)
    real_measure = ddpm.QualityProbe.measure
    monkeypatch.setattr(ddpm.Trainer, "weights_finite", finite)
    monkeypatch.setattr(ddpm.QualityProbe, "measure",  # the first figure is the better one
                        lambda self, model, rt: {**real_measure(self, model, rt), "swd": [10.0, 20.0][self.count - 1]})
    assert ddpm.main(["--train", "--demo", "--demo-images", "8", *MODEL, "--batch-size", "4", "--max-steps", "2",
                      "--seed", "0", "--device", "cpu", "--no-run-pictures", "--sample-every", "0", "--log-every", "1",
                      "--eval-every", "1", "--eval-samples", "4", *dirs(tmp_path)]) == 0
    assert poisoned == [1]
    best = ddpm.read_checkpoint(tmp_path / "ckpt" / "best.pth")
    assert best["step"] == 2 and best["quality"]["best_step"] == 2
