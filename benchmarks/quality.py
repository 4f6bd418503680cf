"""Which model recipe gives better samples for the same compute: the quality yardstick.

Trains each recipe for the same number of steps (seeds fixed), then reports the sliced Wasserstein
distance (ddpm.swd: x1e3, lower is better) of samples from the default sampler (DPM-Solver++, 25
steps) against held-out real images, beside the real-vs-real floor, and a colour statistic that SWD
cannot see (SWD normalises each set's patches by the set's own mean and deviation): the largest
difference, in 8-bit levels, between the samples' and the real images' per-channel mean and
standard deviation.

Two data sets:
- the built-in demo faces (default; reproduces the README's first table: the demo model, 400 steps);
- a folder of real pictures, --data DIR: EmojiOne from Debian's ruby-gemojione (1,794 PNGs in
  palette, RGBA, LA and L modes) is the one the README uses. A fixed held-out split (seed 0) gives
  the SWD reference and, from another part of it, the floor.
Two scales for real pictures (--scale):
- S: the --demo preset's model (1.64M parameters), 32x32, 1,500 steps of batch 32, lr 1e-3;
- M: the default UNet's shape (64 channels, 2 blocks, attention at the two lowest resolutions) with
  channel multiples (1, 2, 2, 2) at 32x32 (9.76M parameters), 800 steps of batch 16, lr 5e-4.
Recipes: the original's, today's default, the demo preset's, and the demo recipe with each of its
parts removed in turn. --peer adds lucidrains' denoising-diffusion-pytorch (a benchmark-only
dependency; skipped with one line when it is not installed): its Unet sized to within 25% of the
project's parameter count, its GaussianDiffusion defaults, the same data, batch, steps and rate, EMA
and optimiser as its Trainer sets them, sampled with its DDIM at 25 and 100 steps.

    python benchmarks/quality.py                                   # demo faces, the README's first table
    python benchmarks/quality.py --quick                           # tiny sizes: does it run
    E=/usr/share/rubygems-integration/all/gems/gemojione-3.3.0/assets/png
    python benchmarks/quality.py --data $E --scale S --peer --out s.jsonl      # about 1.5 hours on 2 cores
    python benchmarks/quality.py --data $E --scale M --peer --out m.jsonl      # about 2.5 hours
    python benchmarks/quality.py --data $E --scale S --only "demo recipe" --seeds 1 --out s.jsonl
    python benchmarks/quality.py --table s.jsonl                   # the Markdown table of a results file
    python benchmarks/quality.py --data $E --scale S --speed       # training img/s only, ours and the peer's
    python benchmarks/quality.py --data $E --scale S --edm --out e.jsonl        # the EDM family (below)

--edm measures the EDM family on one trained model of a recipe (--recipe, default the demo recipe):
SWD at --calls model calls (default 10 25 50) of each sampler and grid in EDM_SAMPLERS and of 100
ancestral steps; autoguidance by EMA snapshots of the same run at --guide-fractions of it (what
--guide-snapshot saves) at weights --guidance-weights, sampled with the default sampler; and the
recipe with --objective edm, trained the same way, sampled with each of them at 25 calls.

Where the speckle comes from (the README's "Where the speckle comes from"): the SPECKLE recipes change one
thing at a time from the demo recipe (the loss over noise levels, the learning rate's end and height, Adam's
beta_2, dropout, capacity at the highest resolution, and the batch: "batch /2" sees the same images in batches
of half the size, so twice the steps, with the warm-up and the EMA's decay kept as long in images); --ends
samples each model again with the default sampler stopped at higher noise levels; --posthoc keeps EDM2's
post-hoc EMA and measures the EMA rebuilt at each relative width. Every row gives SWD by pyramid level beside
the mean, the floor's levels in the header.

    python benchmarks/quality.py --scale S --steps 512 --no-nll --only "demo recipe" "demo + constant lr" \
        --ends 0.1 --posthoc 0.03 0.1 --seeds 0 1

Prints one JSON object per line (and appends them to --out), then the table in Markdown.
"""
import argparse
import contextlib
import copy
import functools
import json
import math
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import ddpm  # noqa: E402

PARTS = dict(time_cond="scale-shift", norm_groups=8, objective="v", beta_schedule="cosine")  # the demo recipe
WITHOUT = dict(time_cond="add", norm_groups=32, objective="eps", beta_schedule="linear")    # each part's opposite
RECIPES = {
    "original": dict(WITHOUT),
    "default": dict(WITHOUT, time_cond="scale-shift"),  # ModelConfig's defaults for new models
    "demo recipe": dict(PARTS),
    **{f"demo - {label}": dict(PARTS, **{k: WITHOUT[k]}) for k, label in
       (("time_cond", "scale-shift"), ("norm_groups", "8 groups"), ("objective", "v"), ("beta_schedule", "cosine"))},
}
# where the speckle comes from (--only with these names, on either data): one change at a time from the demo
# recipe: the loss over noise levels, the learning rate's end and height, Adam's beta_2, dropout, capacity at
# the highest resolution, the batch (at scale M from M_HELD: today's default, 32 groups, the rate held)
M_HELD = dict(PARTS, norm_groups=32, lr_schedule="constant")
SPECKLE = {
    "demo + min-snr": dict(PARTS, loss_weight="min-snr"),
    "demo + constant lr": dict(PARTS, lr_schedule="constant"),
    "demo + dropout 0.1": dict(PARTS, dropout=0.1),
    "demo + wide top": dict(PARTS, channel_multiples=(2, 2, 2, 2)),
    "demo + 2 blocks": dict(PARTS, num_blocks=2),
    "demo + constant lr + min-snr": dict(PARTS, lr_schedule="constant", loss_weight="min-snr"),
    "demo + constant lr x2": dict(PARTS, lr_schedule="constant", lr=2e-3),  # twice scale S's rate, held
    "demo + constant lr + beta2 0.99": dict(PARTS, lr_schedule="constant", adam_beta2=0.99),  # EDM2's Adam
    # the same images seen in batches of half (a quarter) the size: twice (four times) the updates
    "demo + constant lr + batch /2": dict(PARTS, lr_schedule="constant", batch_div=2),
    "demo + constant lr + batch /4": dict(PARTS, lr_schedule="constant", batch_div=4),
    # at scale M, today's default (32 groups) with the learning rate held
    "demo - 8 groups + constant lr": M_HELD,
    "demo - 8 groups + constant lr + batch /2": dict(M_HELD, batch_div=2),
    "demo - 8 groups + constant lr + batch /2 + no dropout": dict(M_HELD, batch_div=2, dropout=0.0),
    "demo - 8 groups + constant lr x2 + batch /2": dict(M_HELD, lr=1e-3, batch_div=2),  # twice scale M's rate
}
# the README's first table: one change at a time from the original, on the demo faces
FACE_VARIANTS = {"original": {}, "scale-shift": {"time_cond": "scale-shift"}, "8 groups": {"norm_groups": 8},
                 "v objective": {"objective": "v"}, "min-snr": {"loss_weight": "min-snr"},
                 "cosine": {"beta_schedule": "cosine"}}
SCALES = {
    "S": dict(model=dict(num_channels=32, channel_multiples=(1, 2, 2, 2), has_attn=(False, False, True, True),
                         num_blocks=1), dropout=0.0, batch=32, steps=1500, lr=1e-3, peer_dim=32),
    "M": dict(model=dict(num_channels=64, channel_multiples=(1, 2, 2, 2), has_attn=(False, False, True, True),
                         num_blocks=2), dropout=0.1, batch=16, steps=800, lr=5e-4, peer_dim=72),
}


# --edm: (sampler, grid) pairs, each at every --calls
EDM_SAMPLERS = (("heun", "karras"), ("dpm++", "logsnr"), ("dpm++", "karras"))


def colour_gap(fake: torch.Tensor, real: torch.Tensor) -> dict:
    """ddpm.colour_gap, rounded."""
    return {k: round(v, 2) for k, v in ddpm.colour_gap(fake, real).items()}


def measure(fake: torch.Tensor, real: torch.Tensor, tag: str) -> dict:
    """SWD x1e3 (mean, and each pyramid level finest first: the finest is the speckle's measure) and the
    colour gap of samples against the real images."""
    r = ddpm.swd(fake, real, 0)
    return {f"swd_{tag}": round(r["mean"], 2), f"swd_{tag}_levels": [round(v, 2) for v in r["per_level"]],
            f"colour_{tag}": colour_gap(fake, real)}


def split(data: torch.Tensor, n: int):
    """A fixed held-out split: (train, real_a, real_b), real_a and real_b n images each."""
    perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))
    return data[perm[2 * n:].sort().values], data[perm[:n]], data[perm[n:2 * n]]


def stopped_at(sigma_min: float):
    """A log-SNR grid that stops at noise level sigma_min (its last model call there gives x_0), where
    the default one goes down to t = 0 (sigma 0.006 on the cosine schedule): how much of the speckle
    the last, lowest-noise steps add."""
    def grid(d: ddpm.GaussianDiffusion, n: int, top=None):
        lams = torch.linspace(max(float(-d.log_sigma_f64[-1]), ddpm.LAMBDA_FLOOR), -math.log(sigma_min), n).tolist()
        return [float(d.timesteps - 1)] + [d.t_of_sigma(math.exp(-lam)) for lam in lams[1:]]
    return grid


def ours(name: str, cfg: ddpm.ModelConfig, tc: ddpm.TrainConfig, train: torch.Tensor, real: torch.Tensor,
         n: int, seed: int, rt, ddpm100: bool, held=None, posthoc=(), ends=()) -> dict:
    """Train a recipe with ddpm.train, then SWD and colour of n samples against `real`; with `held`,
    also the bound in bits/dim (50 timesteps) on those images; with `posthoc` (relative widths), the
    run keeps the post-hoc EMA and each width's rebuilt EMA is measured too (swd_ema<width>)."""
    tmp = Path(tempfile.mkdtemp())
    try:
        t0 = time.time()
        tc = replace(tc, posthoc_ema=bool(posthoc), posthoc_snapshots=16)
        trainer = ddpm.train(cfg, tc, train, tmp / "ckpt", tmp / "out", device=str(rt.device), seed=seed)
        row = {"what": "ours", "name": name, "seed": seed, "steps": trainer.pos.step,
               "params": sum(p.numel() for p in trainer.model.parameters()), "train_s": round(time.time() - t0, 1),
               "img_per_s": round(trainer.pos.step * tc.batch_size / (time.time() - t0), 1)}
        model = trainer.sampling_view()
        specs = [("default", ddpm.SampleSpec())] + ([("ddpm100", ddpm.SampleSpec("ddpm", 100))] if ddpm100 else [])
        for tag, spec in specs:
            fake = ddpm.generate(model, rt.local(), range(n), 0, spec, batch_size=128, show_progress=False)
            row.update(measure(fake, real, tag))
        if held is not None:
            row["nll_bpd"] = round(ddpm.bits_per_dim(model, held, 50, 128, 0)["bpd"], 4)
        for sigma_min in ends:  # the default sampler stopped at a higher noise level
            ddpm.GRIDS["stop"] = stopped_at(sigma_min)
            try:
                fake = ddpm.generate(model, rt.local(), range(n), 0, ddpm.SampleSpec(grid="stop"), batch_size=128,
                                     show_progress=False)
            finally:
                del ddpm.GRIDS["stop"]
            row.update(measure(fake, real, f"end{sigma_min:g}"))
        for width in posthoc:
            try:
                rebuilt = ddpm.load_model(tmp / "ckpt", rt.device, ema_length=width)
            except ddpm.DDPMError as e:  # a width the snapshots cannot rebuild: say so, keep the others
                row[f"ema{width:g}_refused"] = str(e)
                continue
            fake = ddpm.generate(rebuilt, rt.local(), range(n), 0, ddpm.SampleSpec(), batch_size=128, show_progress=False)
            row.update(measure(fake, real, f"ema{width:g}"))
        return row
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def edm_family(name: str, cfg: ddpm.ModelConfig, tc: ddpm.TrainConfig, train: torch.Tensor, real: torch.Tensor,
               n: int, seed: int, rt, calls, fractions, weights, emit, samplers=EDM_SAMPLERS, churns=()) -> None:
    """Train one recipe, keeping EMA snapshots at `fractions` of the run (as --guide-snapshot does), then
    emit one row per sampler, grid and number of calls (and for Heun at 25 calls, per S_churn in
    `churns`), per guide and weight (the default sampler)."""
    tmp = Path(tempfile.mkdtemp())
    snap_steps = {max(1, round(f * tc.max_steps)): f for f in fractions}
    guides = {}
    real_step = ddpm.Trainer.train_step

    def train_step(self):  # the EMA weights at the snapshot steps, kept in memory
        real_step(self)
        if self.pos.step in snap_steps:
            guides[snap_steps[self.pos.step]] = copy.deepcopy(self.ema.model).eval()
    ddpm.Trainer.train_step = train_step
    try:
        t0 = time.time()
        trainer = ddpm.train(cfg, tc, train, tmp / "ckpt", tmp / "out", device=str(rt.device), seed=seed)
    finally:
        ddpm.Trainer.train_step = real_step
        shutil.rmtree(tmp, ignore_errors=True)
    base = {"what": "edm", "recipe": name, "seed": seed, "steps": trainer.pos.step, "train_s": round(time.time() - t0, 1)}
    model = trainer.sampling_view()
    net = ddpm.sampling_net(model, rt.local(), False)

    def row(spec: ddpm.SampleSpec, fn=None, **extra):
        t1 = time.time()
        fake = ddpm.generate(model, rt.local(), range(n), 0, spec, batch_size=128, show_progress=False, model_fn=fn)
        r = dict(base, sampler=spec.sampler, grid=spec.grid or spec.row.grid, calls=model.calls(spec), **extra,
                 sample_s=round(time.time() - t1, 1))
        emit(dict(r, **measure(fake, real, "default")))
    for sampler, grid in samplers:
        for k in calls:
            row(ddpm.SampleSpec(sampler, k, grid=grid))
        for churn in churns if sampler == "heun" else ():
            row(ddpm.SampleSpec(sampler, 25, grid=grid, churn=churn), churn=churn)
    if not cfg.objective == "edm" and samplers == EDM_SAMPLERS:
        row(ddpm.SampleSpec("ddpm", 100))
    for f, guide in sorted(guides.items()):
        gnet = ddpm.sampling_net(guide, rt.local(), False)
        for w in weights:
            row(ddpm.SampleSpec(), ddpm.Guidance(net, guide, gnet, w), guide_fraction=f, guidance=w)


def peer(scale: dict, train: torch.Tensor, real: torch.Tensor, n: int, seed: int, steps: int, speed_only=False):
    """lucidrains' denoising-diffusion-pytorch, trained as its Trainer does (Adam betas (0.9, 0.99),
    gradient norm clipped at 1, EMA(beta 0.995, every 10 steps), random flips), same data, batch,
    steps and rate; sampled with its DDIM (eta 0) at 25 and 100 steps from the EMA weights."""
    try:
        from denoising_diffusion_pytorch import GaussianDiffusion, Unet
        from ema_pytorch import EMA
    except ImportError:
        print("peer: denoising-diffusion-pytorch is not installed (pip install denoising-diffusion-pytorch); "
              "skipped", flush=True)
        return None
    torch.manual_seed(seed)
    size = train.shape[-1]
    model = GaussianDiffusion(Unet(dim=scale["peer_dim"], dim_mults=(1, 2, 2, 2)), image_size=size)
    opt = torch.optim.Adam(model.parameters(), lr=scale["lr"], betas=(0.9, 0.99))
    ema = EMA(model, beta=0.995, update_every=10)
    B, g = scale["batch"], torch.Generator().manual_seed(seed)
    data = train.float() / 255  # its Dataset: ToTensor in [0, 1], auto_normalize maps to [-1, 1]
    perm, k, t0, timed = torch.randperm(len(data), generator=g), 0, time.time(), 0
    for step in range(steps):
        if step == 10:
            t0, timed = time.time(), 0
        if k + B > len(data):  # its DataLoader: shuffle, drop_last
            perm, k = torch.randperm(len(data), generator=g), 0
        x = data[perm[k:k + B]]
        k += B
        flip = torch.rand(B, generator=g) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
        loss = model(x)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        ema.update()
        timed += B
    row = {"what": "peer", "name": f"denoising-diffusion-pytorch Unet(dim={scale['peer_dim']}, (1, 2, 2, 2))",
           "seed": seed, "steps": steps, "params": sum(p.numel() for p in model.model.parameters()),
           "img_per_s": round(timed / (time.time() - t0), 1)}
    if speed_only:
        return row
    for k_steps in (25, 100):
        net = ema.ema_model
        net.sampling_timesteps, net.is_ddim_sampling = k_steps, True
        torch.manual_seed(0)
        with torch.inference_mode():
            fake = torch.cat([net.sample(batch_size=min(128, n - b)) for b in range(0, n, 128)])
        row.update(measure((fake.clamp(0, 1) * 255).round().to(torch.uint8), real, f"ddim{k_steps}"))
    return row


def table(rows: list) -> str:
    floor = next((r for r in rows if r["what"] == "floor"), None)
    out = []
    def levels(r: dict, tag: str) -> str:
        return " / ".join(f"{v:.2f}" for v in r.get(f"swd_{tag}_levels", []))
    if floor:
        out.append(f"Real vs real (the floor): SWD {floor['swd']:.2f} (by level, finest first: "
                   f"{' / '.join(f'{v:.2f}' for v in floor.get('levels', []))}); colour gap mean "
                   f"{floor['colour']['mean']:.2f}, std {floor['colour']['std']:.2f} levels; {floor['n']} images each.\n")
    out.append("| recipe | seed | SWD, DPM-Solver++ 25 | by level, finest first | colour gap (mean / std) | SWD, ddpm 100 "
               "| train img/s | params |")
    out.append("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r["what"] == "ours":
            d100 = f"{r['swd_ddpm100']:.2f}" if "swd_ddpm100" in r else "–"
            c = r["colour_default"]
            out.append(f"| {r['name']} | {r['seed']} | {r['swd_default']:.2f} | {levels(r, 'default')} | "
                       f"{c['mean']:.1f} / {c['std']:.1f} | {d100} | {r['img_per_s']:.1f} | {r['params'] / 1e6:.2f}M |")
            for tag in (k[4:] for k in r if k.startswith(("swd_ema", "swd_end")) and not k.endswith("_levels")):
                c = r[f"colour_{tag}"]
                what = f"post-hoc EMA {tag[3:]}" if tag.startswith("ema") else f"sampling stopped at sigma {tag[3:]}"
                out.append(f"| {r['name']}, {what} | {r['seed']} | {r[f'swd_{tag}']:.2f} | "
                           f"{levels(r, tag)} | {c['mean']:.1f} / {c['std']:.1f} | – | – | – |")
        elif r["what"] == "peer" and "swd_ddim25" in r:
            c = r["colour_ddim25"]
            out.append(f"| {r['name']}, its DDIM 25 (100: {r['swd_ddim100']:.2f}) | {r['seed']} | {r['swd_ddim25']:.2f} "
                       f"| {c['mean']:.1f} / {c['std']:.1f} | – | {r['img_per_s']:.1f} | {r['params'] / 1e6:.2f}M |")
    edm = [r for r in rows if r["what"] == "edm"]
    if edm:
        out.append("\n| recipe | seed | sampler / grid | model calls | guide (fraction, weight) | SWD | colour gap "
                   "(mean / std) | sampling s |")
        out.append("|---|---|---|---|---|---|---|---|")
        for r in edm:
            c = r["colour_default"]
            g = f"{r['guide_fraction']:g}, {r['guidance']:g}" if "guidance" in r else "–"
            churn = f", churn {r['churn']:g}" if r.get("churn") else ""
            out.append(f"| {r['recipe']} | {r['seed']} | {r['sampler']} / {r['grid']}{churn} | {r['calls']} | {g} | "
                       f"{r['swd_default']:.2f} | {c['mean']:.1f} / {c['std']:.1f} | {r['sample_s']:.1f} |")
    return "\n".join(out)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="a folder of images (default: the built-in demo faces)")
    p.add_argument("--scale", choices=sorted(SCALES), default="S", help="model size and training length for --data")
    p.add_argument("--img-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=None, help="training steps (default: 400 demo faces, or the scale's)")
    p.add_argument("--samples", type=int, default=256, help="images per SWD set (and each half of the floor)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds")
    p.add_argument("--only", nargs="*", default=None, help="recipe names to run (default: all)")
    p.add_argument("--peer", action="store_true", help="also train lucidrains' denoising-diffusion-pytorch")
    p.add_argument("--ddpm100", action="store_true", help="also SWD of 100 ancestral steps")
    p.add_argument("--no-nll", action="store_true", help="demo faces: leave out the NLL bound (saves a minute a row)")
    p.add_argument("--speed", action="store_true", help="training img/s only (50 steps each), ours and the peer's")
    p.add_argument("--out", default=None, help="append the JSON lines to this file")
    p.add_argument("--table", default=None, metavar="FILE", help="print the table of a results file and exit")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a dry run")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--edm", action="store_true", help="the EDM family on one recipe (see above)")
    p.add_argument("--recipe", default="demo recipe", help="--edm: the recipe (a name in RECIPES)")
    p.add_argument("--calls", type=int, nargs="+", default=[10, 25, 50], help="--edm: model calls per image")
    p.add_argument("--guide-fractions", type=float, nargs="*", default=[0.25, 0.5], help="--edm: guide snapshots")
    p.add_argument("--guidance-weights", type=float, nargs="*", default=[1.5, 2, 2.5], help="--edm: guidance weights")
    p.add_argument("--no-edm-objective", action="store_true", help="--edm: leave out the --objective edm recipe")
    p.add_argument("--samplers", nargs="+", default=None, metavar="SAMPLER/GRID",
                   help="--edm: only these rows of EDM_SAMPLERS (e.g. heun/karras; default: all, and ddpm 100)")
    p.add_argument("--churns", type=float, nargs="*", default=[], help="--edm: Heun at 25 calls with each S_churn")
    p.add_argument("--ends", type=float, nargs="*", default=[], metavar="SIGMA_MIN",
                   help="also sample with the default sampler stopped at these noise levels (instead of t = 0)")
    p.add_argument("--posthoc", type=float, nargs="*", default=[], metavar="SIGMA_REL",
                   help="keep the post-hoc EMA and measure each of these rebuilt EMA lengths too")
    a = p.parse_args()
    if a.table:
        print(table([json.loads(line) for line in Path(a.table).read_text().splitlines() if line.strip()]))
        return
    if a.threads:
        torch.set_num_threads(a.threads)
    rt = ddpm.setup_runtime("cpu" if not torch.cuda.is_available() else None, "auto", False)
    n = a.samples if not a.quick else 16
    if a.data:
        data = ddpm.load_images([a.data], a.img_size, 3)
        scale, recipes = dict(SCALES[a.scale]), {**RECIPES, **SPECKLE}
        train, real_a, real_b = split(data, n)
        held = None
    else:  # as the README's first table was made: 4096 faces to train on, then new ones
        n_train = 4096 if not a.quick else 256
        faces = ddpm.demo_faces(n_train + 3 * n, a.img_size)
        train, real_a, held, real_b = faces[:n_train], faces[n_train:n_train + n], faces[-2 * n:-n], faces[-n:]
        held = None if a.no_nll else held
        scale, recipes = dict(SCALES["S"], steps=400), {k: dict(WITHOUT, **v) for k, v in FACE_VARIANTS.items()}
        if a.only and set(a.only) <= set(RECIPES) | set(SPECKLE):  # the demo preset's recipe and its variants
            recipes = {**RECIPES, **SPECKLE}
        else:
            a.ddpm100 = True
    if a.steps or a.quick:
        scale["steps"] = a.steps or 6
    if a.quick:
        scale = dict(scale, model=dict(scale["model"], num_channels=16), peer_dim=16)
        recipes = {k: dict(v, norm_groups=min(v.get("norm_groups", 8), 8)) for k, v in recipes.items()}
    rows = []

    def emit(row):
        rows.append(row)
        print(json.dumps(row), flush=True)
        if a.out:
            with open(a.out, "a") as f:
                f.write(json.dumps(row) + "\n")
    if a.speed:
        for seed in a.seeds:
            emit(speed_row(scale, recipes["demo recipe" if a.data else "original"], train, a.img_size, seed, rt))
            emit(peer(dict(scale, steps=60), train, real_a, n, seed, 60, speed_only=True))
        return
    floor = ddpm.swd(real_b, real_a, 0)
    emit({"what": "floor", "data": a.data or "demo faces", "scale": a.scale if a.data else "demo", "n": n,
          "train_images": len(train), "swd": round(floor["mean"], 2), "levels": [round(v, 2) for v in floor["per_level"]],
          "colour": colour_gap(real_b, real_a)})
    batch, steps = scale["batch"], scale["steps"]
    epochs = math.ceil(steps / (len(train) // batch))
    tc = ddpm.TrainConfig(batch_size=batch, lr=scale["lr"], lr_schedule="cosine", warmup_steps=min(50, steps // 4),
                          ema_decay=0.999, epochs=epochs, max_steps=steps, sample_every=0, log_every=10 ** 6,
                          dropout=scale["dropout"])
    if a.edm:
        for seed in a.seeds:
            with adam_beta2(recipes[a.recipe].get("adam_beta2")):
                cfg, tc_r = recipe_configs(scale, recipes[a.recipe], a.img_size, tc)
                samplers = tuple(tuple(s.split("/")) for s in a.samplers) if a.samplers else EDM_SAMPLERS
                edm_family(a.recipe, cfg, tc_r, train, real_a, n, seed, rt, a.calls, a.guide_fractions,
                           a.guidance_weights, emit, samplers, a.churns)
                if not a.no_edm_objective:
                    cfg, tc_r = recipe_configs(scale, dict(recipes[a.recipe], objective="edm"), a.img_size, tc)
                    edm_family(f"{a.recipe}, objective edm", cfg, tc_r, train, real_a, n, seed, rt, [25], [], [],
                               emit)
        print()
        print(table(rows))
        return
    for seed in a.seeds:
        for name, recipe in recipes.items():
            if a.only is not None and name not in a.only:
                continue
            cfg, tc_r = recipe_configs(scale, recipe, a.img_size, tc)
            with adam_beta2(recipe.get("adam_beta2")):
                emit(ours(name, cfg, tc_r, train, real_a, n, seed, rt, a.ddpm100, held, a.posthoc, a.ends))
        if a.peer and (a.only is None or "peer" in a.only):
            row = peer(scale, train, real_a, n, seed, steps)
            if row is not None:
                emit(row)
    print()
    print(table(rows))


BENCH_ONLY = {"adam_beta2", "batch_div"}  # recipe keys this script applies itself, not settings of ddpm.py


@contextlib.contextmanager
def adam_beta2(beta2):
    """A recipe's Adam beta_2 (ddpm.py keeps torch's 0.999): torch.optim.Adam with betas (0.9, beta2)."""
    if beta2 is None:
        yield
        return
    real = torch.optim.Adam
    torch.optim.Adam = functools.partial(real, betas=(0.9, beta2))
    try:
        yield
    finally:
        torch.optim.Adam = real


def recipe_configs(scale: dict, recipe: dict, size: int, tc: ddpm.TrainConfig):
    """The ModelConfig and TrainConfig of a recipe (its training settings, such as the loss weight, go
    to the TrainConfig)."""
    train = {k: v for k, v in recipe.items() if k in ddpm.settings_of(ddpm.TrainConfig)}
    model = {**scale["model"], **{k: v for k, v in recipe.items() if k not in train and k not in BENCH_ONLY}}
    k = recipe.get("batch_div")
    if k:  # the scale's batch divided by k: the same images (and epochs) seen in k times the steps, the EMA and
        # warm-up as long
        train.update(batch_size=tc.batch_size // k, max_steps=k * tc.max_steps, warmup_steps=k * tc.warmup_steps,
                     ema_decay=tc.ema_decay ** (1 / k))
    return ddpm.ModelConfig(img_size=size, **model).validate(), replace(tc, **train)


def speed_row(scale: dict, recipe: dict, train: torch.Tensor, size: int, seed: int, rt) -> dict:
    """Our training img/s over 50 steps after 10, the trainer as --train runs it."""
    per_epoch = len(train) // scale["batch"]
    tc = ddpm.TrainConfig(batch_size=scale["batch"], lr=scale["lr"], epochs=math.ceil(60 / per_epoch), max_steps=10,
                          sample_every=0, log_every=10 ** 6, ema_decay=0.999, dropout=scale["dropout"])
    cfg, tc = recipe_configs(scale, recipe, size, tc)
    tmp = Path(tempfile.mkdtemp())
    try:
        trainer = ddpm.train(cfg, tc, train, tmp / "ckpt", tmp / "out", device=str(rt.device), seed=seed)
        trainer.tc = replace(trainer.tc, max_steps=60)
        t0 = time.time()
        trainer.fit(tmp / "ckpt")
        ips = (trainer.pos.step - 10) * scale["batch"] / (time.time() - t0)
        return {"what": "ours-speed", "name": "ddpm.py", "seed": seed, "steps": trainer.pos.step - 10,
                "params": sum(p.numel() for p in trainer.model.parameters()), "img_per_s": round(ips, 1)}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
