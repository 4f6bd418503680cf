"""Where Heun's Karras grid should start at few model calls: the share of saturated pixels and the SWD.

A lightly trained model (the demo preset's shape at 16x16 by default, a few hundred steps on the
demo faces, or on --data) is sampled at each --calls with Heun on the Karras grid started at each
--tops noise level (the grid's own start is log-SNR -5.5: sigma 245 for the cosine schedule; EDM's
sampler starts at 80), and with DPM-Solver++ on the same grids for comparison. Reported per row: the
share of pixels at 0 or 255 (a sampler that overshoots saturates them), and SWD x1e3 of the samples
against held-out images beside the real-vs-real floor.

    python benchmarks/heun_start.py                         # about 2 minutes on 2 cores
    python benchmarks/heun_start.py --img-size 32 --steps 1500 --calls 10 25 --threads 2
"""
import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import ddpm  # noqa: E402


def karras_from(top: float):
    """The Karras grid started at noise level `top` (or the model's own start, if lower), whatever the
    sampler's own start."""
    def grid(d: ddpm.GaussianDiffusion, n: int, _=None):
        return [d.t_of_sigma(s) for s in ddpm.karras_sigmas(d.sigma(0), min(d.sigma(d.timesteps - 1), top), n)]
    return grid


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="a folder of images (default: the built-in demo faces)")
    p.add_argument("--img-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=300, help="training steps (lightly trained: a few hundred)")
    p.add_argument("--calls", type=int, nargs="+", default=[6, 10, 14, 25])
    p.add_argument("--tops", type=float, nargs="+", default=[math.exp(5.5), 80.0, 40.0])
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    n = args.samples
    if args.data:
        data = ddpm.load_images([args.data], args.img_size, 3)
    else:
        data = ddpm.demo_faces(4096 + 2 * n, args.img_size, seed=0)
    perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))
    held, train = data[perm[:2 * n]], data[perm[2 * n:]]
    cfg = ddpm.ModelConfig(img_size=args.img_size, num_channels=32, channel_multiples=(1, 2, 2, 2)[:int(math.log2(
        args.img_size)) - 2], has_attn=(False, False, True, True)[:int(math.log2(args.img_size)) - 2], num_blocks=1,
        norm_groups=8)
    tc = ddpm.TrainConfig(batch_size=32, lr=1e-3, ema_decay=0.999, dropout=0.0, lr_schedule="cosine", warmup_steps=50,
                          max_steps=args.steps, epochs=math.ceil(args.steps * 32 / len(train)) + 1, sample_every=0,
                          log_every=50, precision="fp32")
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.time()
        trainer = ddpm.train(cfg, tc, train, Path(tmp) / "ckpt", Path(tmp) / "out", device="cpu", seed=args.seed,
                             pictures=False)
        print(f"trained {trainer.pos.step} steps in {time.time() - t0:.0f} s", flush=True)
    model = trainer.sampling_view()
    rt = ddpm.Runtime(torch.device("cpu"), "fp32")
    floor = ddpm.swd(held[n:], held[:n])["mean"]
    print(f"| sampler | grid start (sigma) | model calls | pixels at 0 or 255 | SWD x1e3 (floor {floor:.2f}) |")
    print("|---|---|---|---|---|")
    real_grid = ddpm.GRIDS["karras"]
    try:
        for calls in args.calls:
            for sampler in ("heun", "dpm++"):
                for top in args.tops:
                    ddpm.GRIDS["karras"] = karras_from(top)
                    spec = ddpm.SampleSpec(sampler, calls, grid="karras")
                    fake = ddpm.generate(model, rt, range(n), 0, spec, show_progress=False)
                    sat = float(((fake == 0) | (fake == 255)).float().mean())
                    print(f"| {sampler} | {min(top, model.sigma(model.timesteps - 1)):.0f} | {model.calls(spec)} | "
                          f"{100 * sat:.1f}% | {ddpm.swd(fake, held[:n])['mean']:.2f} |", flush=True)
    finally:
        ddpm.GRIDS["karras"] = real_grid


if __name__ == "__main__":
    main()
