"""Behaviour kept through refactoring: a fixed 3-step training run and sampling from its checkpoint
with every sampler give the figures recorded in tests/golden.json, on any x86 CPU.

What is recorded does not depend on the last bits of floating-point reductions, which differ with
the CPU's vector unit (AVX-512, AVX2, SSE4.1 and oneDNN's paths round differently):
- the loss of each training step, to a relative 1e-5;
- what the trained weights compute: the network's output (raw and EMA weights, in float64) on a
  fixed probe batch, to 1e-4 of its RMS. Not the weights themselves: Adam turns the rounding noise of
  a gradient that is zero by symmetry (a bias in front of GroupNorm(32) at 32 channels, the key bias
  of attention) into a full step of lr in either direction, so such weights differ by up to 5e-5
  between vector units, while the function the network computes does not see them;
- the sampled images as uint8: at most 1 level apart, in at most 1% of the values (a weight that
  differs in its last bits moves a pixel across a rounding boundary now and then).
Measured on one AMD EPYC (AVX-512) under its own, AVX2 and SSE4.1 kernels: losses equal to 1e-6,
outputs within 2.4e-6 of their RMS (demo recipe) and 1.9e-5 (original recipe), images within 1 level
in 1 value of 3,072. A real change is far larger: test_a_one_line_change_is_caught makes each kind of
change and shows it fails.

Two recipes: the original's (add, 32 groups, eps, linear) and the demo preset's (scale-shift, 8
groups, v, cosine). After a change meant to alter the figures (a new default, another torch), record
them again with `python tests/test_golden.py --update` and say why in the commit.
"""
import csv
import dataclasses
import json
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script (--update): conftest and ddpm
import conftest  # noqa: E402,F401  (puts ddpm on the path)
import ddpm  # noqa: E402
from conftest import MODEL, pixels

pytestmark = pytest.mark.golden  # .ci/run runs these once more under the SSE4.1 kernels

GOLDEN = Path(__file__).with_name("golden.json")
RUN = ["--train", "--demo", "--demo-images", "8", *MODEL, "--batch-size", "4", "--epochs", "6", "--seed", "3", "--max-steps", "3",
       "--warmup-steps", "50", "--ema-decay", "0.999",  # the figures' own recipe, whatever the --demo preset holds
       "--device", "cpu", "--no-run-pictures", "--sample-every", "0", "--log-every", "1", "--eval-every", "0"]
RECIPES = {"original": ["--time-cond", "add", "--norm-groups", "32", "--objective", "eps", "--beta-schedule", "linear"],
           "demo": ["--time-cond", "scale-shift", "--norm-groups", "8", "--objective", "v",
                    "--beta-schedule", "cosine"]}
SAMPLERS = {"dpm++": [], "ddim-eta": ["--sampler", "ddim", "--eta", "0.5", "--steps", "10"],
            "ddpm": ["--sampler", "ddpm", "--steps", "20"], "ddpm-no-clip": ["--sampler", "ddpm", "--no-clip"]}
LOSS_RTOL, OUTPUT_TOL, LEVELS, SHARE = 1e-5, 1e-4, 1, 0.01


def probe(state: dict, cfg: ddpm.ModelConfig) -> torch.Tensor:
    """The network's output with these weights on a fixed batch (4 images, 4 timesteps), in float64."""
    model = ddpm.build_diffusion(cfg)
    model.load_state_dict(state)
    net = model.eps_model.double().eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, cfg.img_channels, cfg.img_size, cfg.img_size, generator=g, dtype=torch.float64)
    t = torch.linspace(0, cfg.timesteps - 1, 4).round().long()
    with torch.no_grad():
        return net(x, t)


def train(root: Path, recipe: str) -> dict:
    """The losses of the 3 steps and the probe outputs of the trained raw and EMA weights."""
    assert ddpm.main([*RUN, *RECIPES[recipe], "--ckpt-save-dir", str(root / "ckpt"), "--save-dir",
                      str(root / "out")]) == 0
    obj = ddpm.read_checkpoint(ddpm.newest_checkpoint(root / "ckpt"))
    cfg = ddpm.ModelConfig.from_dict(obj["config"])
    with open(root / "ckpt" / "metrics.csv", newline="") as f:
        loss = [float(r["loss"]) for r in csv.DictReader(f)]
    return {"step": obj["step"], "loss": loss, **{part: [float(f"{v:.7g}") for v in probe(obj[part], cfg).flatten()]
                                                  for part in ("model", "ema")}}


def sample(root: Path, out_root: Optional[Path] = None) -> dict:
    """4 images of seed 11 from the run's checkpoint in root/ckpt with each sampler, as uint8 hex,
    written under out_root (default: root)."""
    out = {}
    for name, flags in SAMPLERS.items():
        folder = (out_root or root) / name
        assert ddpm.main(["--loadckpt", str(root / "ckpt"), "--device", "cpu", "--num-samples", "4", "--seed", "11",
                          "--save-dir", str(folder), *flags]) == 0
        out[name] = np.stack([pixels(folder / f"ddpm-{i}.png") for i in range(4)]).tobytes().hex()
    return out


def record(root: Path, recipe: str) -> dict:
    return {**train(root, recipe), **sample(root)}


def differences(got: dict, want: dict) -> list:
    """What differs beyond the tolerances above, one line each; empty when the figures match."""
    out = []
    if got["step"] != want["step"]:
        out.append(f"step {got['step']} != {want['step']}")
    if len(got["loss"]) != len(want["loss"]) or not np.allclose(got["loss"], want["loss"], rtol=LOSS_RTOL, atol=0):
        out.append(f"losses {got['loss']} != {want['loss']}")
    for part in ("model", "ema"):
        a, b = np.array(got[part]), np.array(want[part])
        rms = np.sqrt(np.mean(b ** 2))
        if a.shape != b.shape or np.abs(a - b).max() > OUTPUT_TOL * rms:
            worst = np.abs(a - b).max() / rms if a.shape == b.shape else float("inf")
            out.append(f"{part} weights compute other outputs: max difference {worst:.3g} of the RMS")
    for name in SAMPLERS:
        a = np.frombuffer(bytes.fromhex(got[name]), np.uint8).astype(int)
        b = np.frombuffer(bytes.fromhex(want[name]), np.uint8).astype(int)
        d = np.abs(a - b) if a.shape == b.shape else np.full(1, 256)
        if d.max() > LEVELS or (d > 0).mean() > SHARE:
            out.append(f"{name} images differ: up to {d.max()} levels in {(d > 0).mean():.1%} of the values")
    return out


def expected(recipe: str) -> dict:
    return json.loads(GOLDEN.read_text())[recipe]


@pytest.mark.parametrize("recipe", RECIPES)
def test_training_and_sampling_match_the_recorded_figures(tmp_path, recipe):
    torch.set_num_threads(1)
    assert differences(record(tmp_path, recipe), expected(recipe)) == []


def test_a_one_line_change_is_caught(tmp_path, monkeypatch):
    """Each kind of real change fails the comparison, by far more than the tolerances."""
    torch.set_num_threads(1)
    want = expected("demo")
    ok = record(tmp_path / "ok", "demo")
    assert differences(ok, want) == []
    # the loss: x_t drawn with 1% more noise than eq. 4 (one line of GaussianDiffusion.q_sample)
    real_q = ddpm.GaussianDiffusion.q_sample
    monkeypatch.setattr(ddpm.GaussianDiffusion, "q_sample", lambda self, x0, t, eps=None: real_q(self, x0, t, eps * 1.01))
    bad = train(tmp_path / "loss", "demo")
    monkeypatch.undo()
    found = differences({**ok, **bad}, want)
    assert any(f.startswith("losses") for f in found) and any(f.startswith("model weights") for f in found), found
    # a sampler step: DPM-Solver++(2M) taken as first order (its x0 history forgotten)
    row = ddpm.SAMPLERS["dpm++"]
    monkeypatch.setitem(ddpm.SAMPLERS, "dpm++", dataclasses.replace(
        row, step=lambda d, x, t, s, spec, fn, noise_fn, hist: row.step(d, x, t, s, spec, fn, noise_fn, {})))
    found = differences({**ok, **sample(tmp_path / "ok", tmp_path / "first-order")}, want)
    assert len(found) == 1 and found[0].startswith("dpm++ images differ"), found


if __name__ == "__main__" and "--update" in sys.argv:
    import tempfile

    torch.set_num_threads(1)
    figures = {"_recorded_with": f"torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()} kernels"}
    for name in RECIPES:
        with tempfile.TemporaryDirectory() as tmp:
            figures[name] = record(Path(tmp), name)
    GOLDEN.write_text(json.dumps(figures, indent=1) + "\n")
    print({k: (v if isinstance(v, str) else {n: str(x)[:60] for n, x in v.items()}) for k, v in figures.items()})
