"""Measure ddpm.py: training throughput, peak memory (measured and planned), compile time, achieved
TFLOP/s, and the seconds per 64 images of every sampler. Prints one JSON object per line.

    python benchmarks/bench.py                 # default 64x64 model, batch 64 and 256, three samplers
    python benchmarks/bench.py --quick         # tiny sizes, for a CPU or CI dry run
    python benchmarks/bench.py --only sample   # samplers only
    python benchmarks/bench.py --only train --batches 64 --precisions bf16 fp16 --compile-modes on off \\
        --mem-cap-gib 8                        # the 8 GB laptop: the default model under an 8 GiB cap

Each training configuration gets a fresh trainer, a reset compiler (no reuse of another batch
size's graphs) and fresh peak-memory counters, with enough distinct batches that no epoch ends
inside the timed steps. Run it in the same session as the original's timing script
(seed_baseline.py) and compare ratios: absolute numbers only mean something on the same GPU.
"""
import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import ddpm  # noqa: E402

# Dense bf16 tensor-core peak with fp32 accumulation (what PyTorch's bf16 matmuls use), TFLOP/s.
# GeForce cards run fp32-accumulate at half their fp16-accumulate rate, which spec sheets quote.
# First match wins, so the more specific names come first.
PEAK_BF16 = [("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0), ("L40S", 362.0),
             ("L4", 121.0), ("4090", 165.2), ("4080", 97.5), ("4070", 58.3), ("4060 Laptop", 29.1),
             ("4060", 30.2), ("3090", 71.0)]


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def emit(**kw):
    kw.update(impl="ddpm.py", device=device_name(), torch=torch.__version__)
    print(json.dumps(kw), flush=True)


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def fresh():
    """Forget the previous configuration: compiled graphs, cached blocks, peak counters."""
    torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def forward_flops(cfg: ddpm.ModelConfig) -> dict:
    """FLOPs of one forward pass of the UNet on one image: torch's FLOP counter, plus the attention
    products where it did not count them (its CPU path misses F.scaled_dot_product_attention): per
    attention block over L = H*W positions of C channels, Q K^T and the weighted sum of V, 4 L^2 C."""
    from torch.utils.flop_counter import FlopCounterMode

    net = ddpm.UNet.from_config(cfg)
    shapes = []
    for m in net.modules():
        if isinstance(m, ddpm.AttentionBlock):
            m.register_forward_hook(lambda mod, inp, out: shapes.append(tuple(inp[0].shape)))
    x = torch.randn(1, cfg.img_channels, cfg.img_size, cfg.img_size)
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        net(x, torch.zeros(1, dtype=torch.long))
    counted = float(fc.get_total_flops())
    ops = {str(op) for by_op in fc.get_flop_counts().values() for op in by_op}
    attention = float(sum(4 * (h * w) ** 2 * c for _, c, h, w in shapes))
    sdpa_counted = any("scaled_dot_product" in op for op in ops)
    total = counted if sdpa_counted else counted + attention
    return {"total": total, "attention": attention, "counter": counted, "sdpa_counted": sdpa_counted}


LAYOUTS = {"auto": (None, False), "channels_last": (True, False), "nchw": (False, False), "nchw-opt": (False, True)}


def bench_train(cfg, device, batch, precision, compile_, steps, warmup, flops, profile=None, mode="default",
                layout="auto"):
    """Training img/s of one configuration: compile mode default or reduce-overhead (CUDA graphs), and
    the layout: auto (channels_last under compile on CUDA), channels_last, nchw, or nchw with
    inductor's own layout optimisation forced on (TORCHINDUCTOR_FORCE_LAYOUT_OPT=1)."""
    fresh()
    channels_last, force_opt = LAYOUTS[layout]
    import torch._inductor.config as inductor_config
    inductor_config.force_layout_optimization = force_opt
    rt = ddpm.setup_runtime(device, precision, compile_, training=True, compile_mode=mode)
    rt.channels_last = channels_last
    tc = ddpm.TrainConfig(batch_size=batch, precision=precision)
    n = batch * (warmup + steps + 2)  # one epoch covers every step: no reshuffle inside the timing
    data = torch.randint(0, 256, (n, cfg.img_channels, cfg.img_size, cfg.img_size), dtype=torch.uint8)
    tr = ddpm.Trainer(tc, rt, cfg, ddpm.Batches(data, rt.device, 0), seed=0)
    if rt.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    tr.train_step()
    sync()
    first = time.perf_counter() - t0
    for _ in range(warmup):
        tr.train_step()
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        tr.train_step()
    sync()
    dt = time.perf_counter() - t0
    ips = steps * batch / dt
    tflops = ips * 3 * flops["total"] / 1e12  # forward + backward ~ 3 forwards
    peak = next((v for k, v in PEAK_BF16 if k in device_name()), None)
    cuda = rt.device.type == "cuda"
    emit(what="train", batch=batch, precision=rt.precision, compile=rt.compile, mode=rt.compile_mode if rt.compile
         else None, graphs=tr.graphs, layout=layout, channels_last=tr.channels_last, micro=tr.micro, accum=tr.accum,
         data_on_gpu=tr.batches.on_device if cuda else None, img_per_s=round(ips, 1), first_step_s=round(first, 2),
         peak_mem_gb=round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
         plan=tr.memory_note or None, tflops=round(tflops, 2),
         share_of_bf16_peak=round(tflops / peak, 3) if peak else None)
    if profile:
        write_profile(tr, profile)
    del tr, data


def write_profile(tr, path):
    """One short torch.profiler trace of 5 training steps: the kernels that take the time."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=acts) as prof:
        for _ in range(5):
            tr.train_step()
        sync()
    key = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
    Path(path).write_text(prof.key_averages().table(sort_by=key, row_limit=30, max_name_column_width=70))
    emit(what="profile", path=str(path))


def bench_sample(model, rt, samplers, n, compile_):
    for sampler, steps in samplers:
        fresh()
        fn = ddpm.sampling_net(model, rt, compile_)
        ddpm.generate(model, rt, list(range(n)), 0, ddpm.SampleSpec(sampler, 2), batch_size=n, model_fn=fn,
                      show_progress=False)
        sync()
        t0 = time.perf_counter()
        ddpm.generate(model, rt, list(range(n)), 0, ddpm.SampleSpec(sampler, steps), batch_size=n, model_fn=fn,
                      show_progress=False)
        sync()
        dt = time.perf_counter() - t0
        emit(what="sample", sampler=sampler, steps=steps, images=n, seconds=round(dt, 3),
             seconds_per_64=round(dt * 64 / n, 3), ms_per_step=round(dt / steps * 1e3, 2), compile=fn.compiled,
             precision=rt.precision)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny model and sizes (CPU / CI)")
    p.add_argument("--only", choices=["train", "sample"], default=None)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--batches", type=int, nargs="+", default=[64, 256])
    p.add_argument("--precisions", nargs="+", default=["auto"], choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--compile-modes", nargs="+", default=None, choices=["on", "off", "graphs"],
                   help="training with torch.compile (on: default mode; graphs: reduce-overhead, CUDA graphs) and/or "
                        "without (default: on where CUDA is)")
    p.add_argument("--layouts", nargs="+", default=["auto"], choices=list(LAYOUTS),
                   help="training layouts to measure (auto: channels_last under compile on CUDA)")
    p.add_argument("--mem-cap-gib", type=float, default=None,
                   help="cap this process's GPU memory (torch.cuda.set_per_process_memory_fraction)")
    p.add_argument("--profile", type=str, default=None, metavar="FILE",
                   help="after the last training configuration, write a torch.profiler table of 5 steps")
    p.add_argument("--samplers", nargs="+", default=None, metavar="NAME:STEPS",
                   help="e.g. dpm++:10 ddpm:1000 (default: dpm++:25 ddim:50 ddpm:100)")
    p.add_argument("--images", type=int, default=None, help="images per sampling run (default 64)")
    a = p.parse_args()
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    modes = a.compile_modes or (["on"] if cuda else ["off"])
    samplers = [("dpm++", 25), ("ddim", 50), ("ddpm", 100)]
    n_sample = 64
    cfg = ddpm.ModelConfig()  # the default 64x64 model
    if a.quick:
        cfg = ddpm.ModelConfig(img_size=16, num_channels=32, channel_multiples=(1, 2), has_attn=(False, True),
                               num_blocks=1, timesteps=100)
        a.steps, a.warmup, a.batches = 3, 1, [8]
        samplers = [("dpm++", 25), ("ddim", 50), ("ddpm", 100)]
        n_sample = 8
    if a.samplers:
        samplers = [(x.split(":")[0], int(x.split(":")[1])) for x in a.samplers]
    if a.images:
        n_sample = a.images
    if a.mem_cap_gib and cuda:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, a.mem_cap_gib * 2**30 / total))
        emit(what="memory_cap", gib=a.mem_cap_gib, total_gib=round(total / 2**30, 1))
    cfg = cfg.validate()
    flops = forward_flops(cfg)
    emit(what="model", params_m=round(sum(p.numel() for p in ddpm.UNet.from_config(cfg).parameters()) / 1e6, 2),
         gflops_per_forward=round(flops["total"] / 1e9, 3), attention_gflops=round(flops["attention"] / 1e9, 3),
         counter_gflops=round(flops["counter"] / 1e9, 3), sdpa_counted=flops["sdpa_counted"], img_size=cfg.img_size)
    if a.only in (None, "train"):
        configs = [(b, pr, m, lay) for b in a.batches for pr in a.precisions for m in modes for lay in a.layouts]
        for k, (b, pr, m, lay) in enumerate(configs):
            try:
                bench_train(cfg, device, b, pr, m != "off", a.steps, a.warmup, flops,
                            a.profile if k == len(configs) - 1 else None,
                            mode="reduce-overhead" if m == "graphs" else "default", layout=lay)
            except (torch.OutOfMemoryError, ddpm.TrainingError) as e:
                emit(what="train", batch=b, precision=pr, compile=m, layout=lay, error=str(e).splitlines()[0][:200])
    if a.only in (None, "sample"):
        fresh()
        rt = ddpm.setup_runtime(device, "auto", False)
        model = ddpm.build_diffusion(cfg).to(rt.device).eval()
        bench_sample(model, rt, samplers, n_sample, compile_=False)
        if cuda:
            bench_sample(model, rt, [("dpm++", 25)], n_sample, compile_=True)


if __name__ == "__main__":
    main()
