"""Which training options give better samples for the same compute, measured on the demo faces.

Trains the --demo preset's model for the same number of steps under each variant (seeds fixed),
then reports the sliced Wasserstein distance (ddpm.swd: x1e3, lower is better) of samples from the
default sampler (DPM-Solver++, 25 steps) and from 100 ancestral (ddpm) steps, against new demo
faces the model never saw, beside the real-vs-real floor, and the bound in bits/dim on held-out
faces. Each variant changes one thing from the original's choices; the last row combines every
change that won on the default sampler.

    python benchmarks/quality.py              # the full table: about 40 minutes on a 2-core CPU
    python benchmarks/quality.py --quick      # tiny sizes, a minute: does it run
    python benchmarks/quality.py --steps 768  # as long as the demo's own 10-minute run
    python benchmarks/quality.py --only cosine --combine objective=v norm_groups=8  # some rows

Prints one JSON object per line, then the table in Markdown.
"""
import argparse
import json
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import ddpm  # noqa: E402

ORIGINAL = dict(time_cond="add", norm_groups=32, objective="eps", loss_weight="none", beta_schedule="linear")
VARIANTS = [("original", {}), ("scale-shift", {"time_cond": "scale-shift"}), ("8 groups", {"norm_groups": 8}),
            ("v objective", {"objective": "v"}), ("min-snr", {"loss_weight": "min-snr"}),
            ("cosine", {"beta_schedule": "cosine"})]


def demo_model(**change) -> ddpm.ModelConfig:
    """The --demo preset's model with the original's choices, then `change`."""
    return ddpm.ModelConfig(img_size=32, num_channels=32, channel_multiples=(1, 2, 2, 2),
                            has_attn=(False, False, True, True), num_blocks=1, dropout=0.0,
                            **{**ORIGINAL, **change}).validate()


def evaluate(model, rt, real_a, real_b, n, nll_k, seed) -> dict:
    """SWD of the default sampler and of 100 ddpm steps against real_a, and the bound on real_b."""
    out = {}
    for name, spec in (("swd_default", ddpm.SampleSpec()), ("swd_ddpm100", ddpm.SampleSpec("ddpm", 100))):
        t0 = time.time()
        fake = ddpm.generate(model, rt, range(n), seed, spec, batch_size=128, show_progress=False)
        r = ddpm.swd(fake, real_a, seed)
        out[name], out[name + "_levels"] = round(r["mean"], 2), [round(v, 2) for v in r["per_level"]]
        out[name + "_s"] = round(time.time() - t0, 1)
    out["nll_bpd"] = round(ddpm.bits_per_dim(model, real_b, nll_k, 128, seed)["bpd"], 4)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes: a dry run")
    p.add_argument("--steps", type=int, default=400, help="training steps per variant")
    p.add_argument("--samples", type=int, default=256, help="images per SWD set")
    p.add_argument("--nll-timesteps", type=int, default=50)
    p.add_argument("--only", nargs="*", default=None, help="variant names to run (default: all, then the combination)")
    p.add_argument("--combine", nargs="*", default=None, metavar="FIELD=VALUE",
                   help="also run this combination (for example time_cond=scale-shift norm_groups=8)")
    a = p.parse_args()
    steps, n, n_train = (a.steps, a.samples, 4096) if not a.quick else (20, 32, 256)
    rt = ddpm.setup_runtime("cpu" if not torch.cuda.is_available() else None, "auto", False)
    faces = ddpm.demo_faces(n_train + 3 * n, 32)
    train, real_a, real_b, real_c = faces[:n_train], faces[n_train:n_train + n], faces[-2 * n:-n], faces[-n:]
    floor = ddpm.swd(real_c, real_a, 0)
    print(json.dumps({"what": "floor", "swd": round(floor["mean"], 2), "levels": [round(v, 2) for v in floor["per_level"]],
                      "n": n}), flush=True)
    epochs = -(-steps // (n_train // 32))
    tc = ddpm.TrainConfig(batch_size=32, lr=1e-3, lr_schedule="cosine", warmup_steps=50 if not a.quick else 2,
                          ema_decay=0.999, epochs=epochs, max_steps=steps, sample_every=0, log_every=10 ** 9,
                          preview=ddpm.SampleSpec())
    rows, variants = [], [v for v in VARIANTS if a.only is None or v[0] in a.only]
    fixed = None if a.combine is None else {k: int(v) if v.isdigit() else v for k, v in
                                            (c.split("=", 1) for c in a.combine)}
    for name, change in variants + ([("combined", fixed)] if a.only is None or fixed is not None else []):
        if change is None:  # every change that beat the original on the default sampler
            base = rows[0]["swd_default"]
            change = {k: v for r, (_, c) in zip(rows, variants) if r["swd_default"] < base for k, v in c.items()}
        tmp = Path(tempfile.mkdtemp())
        t0 = time.time()
        trainer = ddpm.train(demo_model(**change), tc, train, tmp / "ckpt", tmp / "out", device=str(rt.device), seed=0)
        row = {"what": "variant", "name": name, "change": change, "steps": trainer.step,
               "train_s": round(time.time() - t0, 1)}
        row.update(evaluate(trainer.sampling_view(), rt.local(), real_a, real_b, n, a.nll_timesteps, 0))
        shutil.rmtree(tmp, ignore_errors=True)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\n{steps} steps per variant, batch 32, the --demo preset's model and schedule; SWD x1e3 of {n} samples "
          f"against {n} new demo faces (real vs real: {floor['mean']:.2f}); bound on {n} other new faces, "
          f"{a.nll_timesteps} timesteps.\n")
    print("| variant | SWD, DPM-Solver++ 25 steps | SWD, ddpm 100 steps | NLL bits/dim | train |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['name']} | {r['swd_default']:.2f} | {r['swd_ddpm100']:.2f} | {r['nll_bpd']:.3f} | "
              f"{r['train_s'] / 60:.1f} min |")


if __name__ == "__main__":
    main()
