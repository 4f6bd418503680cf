"""The Python API keeps its promises: the README's "Use from Python" example runs as printed,
ddpm.train writes the same files as --train, and a sampler is one function and one table row."""
import dataclasses
import math
import re
from pathlib import Path

import numpy as np
import torch

import ddpm
from conftest import MODEL, LOCK_FILES, pixels

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_example() -> str:
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Use from Python"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_example_runs_as_printed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(readme_example(), "README.md", "exec"), scope)
    assert scope["imgs"].shape == (16, 3, 16, 16) and scope["imgs"].dtype == torch.uint8
    assert scope["trainer"].pos.step == 2 * (128 // 32)
    ckpt = ddpm.read_checkpoint(ddpm.newest_checkpoint(tmp_path / "ckpt-notebook"))
    assert ckpt["config"]["objective"] == "v" and ckpt["train"]["dropout"] == 0.0
    out = tmp_path / "output-notebook"
    for name in ("run-before.png", "run-after.png", "final-grid.png"):
        assert (out / name).is_file()
    assert sorted(p.name for p in out.glob("ddpm-*.png")) == [f"ddpm-{i}.png" for i in range(4)] + ["ddpm-all.png"]


def files(root: Path) -> list:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.name not in LOCK_FILES)


def test_train_from_python_writes_what_the_command_line_writes(tmp_path):
    argv = ["--train", "--demo", "--demo-images", "8", *MODEL, "--batch-size", "4", "--max-steps", "3", "--epochs", "2",
            "--sample-every", "2", "--log-every", "1", "--seed", "4", "--device", "cpu", "--eval-every", "0"]
    cli, api = tmp_path / "cli", tmp_path / "api"
    assert ddpm.main([*argv, "--ckpt-save-dir", str(cli / "ckpt"), "--save-dir", str(cli / "out")]) == 0
    job = ddpm.parse_command_line(argv)
    trainer = ddpm.train(job.cfg, job.train, ddpm.demo_faces(8, 8), api / "ckpt", api / "out", device="cpu", seed=4)
    assert trainer.pos.step == 3
    assert files(cli) == files(api) and "out/final-grid.png" in files(api) and "out/loss.png" in files(api)
    assert "out/preview/step-0000002.png" in files(api) and "ckpt/metrics.csv" in files(api)
    a, b = (ddpm.read_checkpoint(ddpm.newest_checkpoint(root / "ckpt")) for root in (cli, api))
    for part in ("model", "ema"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    assert (pixels(cli / "out" / "final-grid.png") == pixels(api / "out" / "final-grid.png")).all()


def euler_step(d, x, t, s, spec, model_fn, noise_fn, hist):
    """A toy sampler: the first-order data-prediction step in lambda (DPM-Solver-1), which is DDIM
    with eta 0 written another way: x_s = sigma_s / sigma_t x_t + alpha_s (1 - e^-h) x_0, where
    e^-h = alpha_t sigma_s / (sigma_t alpha_s)."""
    ab_t, ab_s = d.ab(t), d.ab(s)
    x0, _ = d.predict(x, t, spec, model_fn)
    r = math.sqrt((1 - ab_s) / (1 - ab_t))  # sigma_s / sigma_t
    return r * x + math.sqrt(ab_s) * (1 - math.sqrt(ab_t / ab_s) * r) * x0, x0


def test_a_sampler_is_one_function_and_one_row(tiny_run, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(ddpm.SAMPLERS, "euler", ddpm.Sampler(euler_step, "logsnr", False, False, 12, "first order"))
    capsys.readouterr()
    base = ["--loadckpt", str(tiny_run / "ckpt"), "--device", "cpu", "--num-samples", "4", "--seed", "2"]
    assert ddpm.main([*base, "--sampler", "euler", "--save-dir", str(tmp_path / "euler")]) == 0
    assert "(euler, 12 model calls, seed 2)" in capsys.readouterr().out  # its default steps, from the row
    assert ddpm.main([*base, "--sampler", "ddim", "--steps", "12", "--save-dir", str(tmp_path / "ddim")]) == 0
    for i in range(4):  # the same path as DDIM with eta 0, on the same grid
        a, b = (pixels(tmp_path / d / f"ddpm-{i}.png").astype(int) for d in ("euler", "ddim"))
        assert np.abs(a - b).max() <= 1
    # every place reads the row: the parser's help, inversion refusing a sampler that draws noise
    assert "euler = first order" in " ".join(ddpm.build_parser().format_help().split())
    monkeypatch.setitem(ddpm.SAMPLERS, "noisy", dataclasses.replace(ddpm.SAMPLERS["euler"], stochastic=True))
    assert ddpm.main([*base, "--sampler", "noisy", "--invert", str(tmp_path / "euler" / "ddpm-0.png")]) == 2
    assert "not a stochastic sampler" in capsys.readouterr().err
    assert ddpm.deterministic(ddpm.SampleSpec("noisy")).sampler == ddpm.INVERTIBLE
