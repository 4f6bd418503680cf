"""Measure ddpm.py: training throughput, peak memory, compile time, achieved TFLOP/s, and the
seconds per 64 images of every sampler. Prints one JSON object per line.

    python benchmarks/bench.py                 # default 64x64 model, batch 64 and 256, all samplers
    python benchmarks/bench.py --quick         # tiny sizes, for a CPU or CI dry run
    python benchmarks/bench.py --only sample   # samplers only (the 1000-step ddpm included)

Run it in the same session as the original's timing script (seed_baseline.py) and compare ratios:
absolute numbers only mean something on the same GPU.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import ddpm  # noqa: E402

# bf16 dense peak (TFLOP/s) of common GPUs, for the share-of-peak figure
PEAK_BF16 = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0, "4090": 165.0, "4060": 60.0}


def emit(**kw):
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    kw.update(impl="ddpm.py", device=dev, torch=torch.__version__)
    print(json.dumps(kw), flush=True)


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def forward_flops(cfg: ddpm.ModelConfig) -> float:
    """FLOPs of one forward pass of the UNet on one image (torch's FLOP counter)."""
    from torch.utils.flop_counter import FlopCounterMode

    net = ddpm.UNet.from_config(cfg)
    x = torch.randn(1, cfg.img_channels, cfg.img_size, cfg.img_size)
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        net(x, torch.zeros(1, dtype=torch.long))
    return float(fc.get_total_flops())


def bench_train(flags, batch, steps, warmup, flops):
    args = ddpm.parse_args(flags + ["--train", "--batch-size", str(batch), "--ema-decay", "0.9999"])
    rt = ddpm.setup_runtime(args.device, args.precision, args.compile, training=True)
    cfg = ddpm.model_config_from_args(args).validate()
    data = torch.randint(0, 256, (max(batch * 4, 256), cfg.img_channels, cfg.img_size, cfg.img_size), dtype=torch.uint8)
    tr = ddpm.Trainer(args, rt, cfg, ddpm.Batches(data, rt.device, 0), seed=0)

    step = tr.train_step

    if rt.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    step()
    sync()
    first = time.perf_counter() - t0
    for _ in range(warmup):
        step()
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    dt = time.perf_counter() - t0
    ips = steps * batch / dt
    tflops = ips * 3 * flops / 1e12  # forward + backward ~ 3 forwards
    name = torch.cuda.get_device_name() if rt.device.type == "cuda" else ""
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    emit(what="train", batch=batch, precision=rt.precision, compile=rt.compile, img_per_s=round(ips, 1),
         first_step_s=round(first, 2), peak_mem_gb=round(torch.cuda.max_memory_allocated() / 2**30, 2)
         if rt.device.type == "cuda" else None, tflops=round(tflops, 2),
         share_of_bf16_peak=round(tflops / peak, 3) if peak else None)
    return tr


def bench_sample(model, rt, samplers, n, compile_):
    for sampler, steps in samplers:
        fn = ddpm.sampling_model_fn(model, rt, compile_)
        ddpm.generate(model, rt, list(range(n)), 0, sampler, 2, batch_size=n, model_fn=fn, show_progress=False)
        sync()
        t0 = time.perf_counter()
        ddpm.generate(model, rt, list(range(n)), 0, sampler, steps, batch_size=n, model_fn=fn, show_progress=False)
        sync()
        dt = time.perf_counter() - t0
        emit(what="sample", sampler=sampler, steps=steps, images=n, seconds=round(dt, 3),
             seconds_per_64=round(dt * 64 / n, 3), ms_per_step=round(dt / steps * 1e3, 2), compile=compile_)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny model and sizes (CPU / CI)")
    p.add_argument("--only", choices=["train", "sample"], default=None)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--batches", type=int, nargs="+", default=[64, 256])
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--samplers", nargs="+", default=None, metavar="NAME:STEPS",
                   help="e.g. dpm++:25 ddim:50 ddpm:1000 (the default list)")
    p.add_argument("--images", type=int, default=None, help="images per sampling run (default 64)")
    a = p.parse_args()
    flags = ["--device", "cuda" if torch.cuda.is_available() else "cpu"]
    if a.no_compile:
        flags.append("--no-compile")
    samplers = [("dpm++", 25), ("dpm++", 10), ("ddim", 50), ("ddpm", 1000)]
    n_sample = 64
    if a.quick:
        flags += ["--img-size", "16", "--num-channels", "32", "--channel-multiples", "1", "2",
                  "--has-attn", "f", "t", "--num-blocks", "1", "--timesteps", "100"]
        a.steps, a.warmup, a.batches = 3, 1, [8]
        samplers = [("dpm++", 25), ("ddim", 50), ("ddpm", 100)]
        n_sample = 8
    if a.samplers:
        samplers = [(x.split(":")[0], int(x.split(":")[1])) for x in a.samplers]
    if a.images:
        n_sample = a.images
    cfg = ddpm.model_config_from_args(ddpm.parse_args(flags)).validate()
    flops = forward_flops(cfg)
    emit(what="model", params_m=round(sum(p.numel() for p in ddpm.UNet.from_config(cfg).parameters()) / 1e6, 2),
         gflops_per_forward=round(flops / 1e9, 2), img_size=cfg.img_size)
    tr = None
    if a.only in (None, "train"):
        for b in a.batches:
            tr = bench_train(flags, b, a.steps, a.warmup, flops)
    if a.only in (None, "sample"):
        rt = ddpm.setup_runtime(flags[1], "auto", False)
        model = ddpm.build_diffusion(cfg).to(rt.device).eval()
        model.config = cfg
        if rt.device.type == "cuda":
            model.to(memory_format=torch.channels_last)
        bench_sample(model, rt, samplers, n_sample, compile_=False)
        if rt.device.type == "cuda" and not a.no_compile:
            bench_sample(model, rt, [("dpm++", 25)], n_sample, compile_=True)
    del tr


if __name__ == "__main__":
    main()
