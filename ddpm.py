"""ddpm.py: a DDPM trainer and sampler in one readable file.

A hand-written UNet and Gaussian diffusion (Ho et al. 2020; for new models a cosine schedule and v
prediction, the original's linear betas and epsilon prediction or EDM's preconditioning on request),
trained on a folder of images and sampled with DDPM, DDIM, DPM-Solver++(2M) or EDM's Heun, with
autoguidance.

Runbook
-------
CPU, no data needed (a built-in generator of anime-style faces, small preset, about 4 min on 2 cores):
    python ddpm.py --train --demo
    python ddpm.py --loadckpt ckpt --num-samples 16             # newest checkpoint in ckpt/

One GPU, your own folder (recursively read; png/jpg/jpeg/webp/bmp/gif):
    python ddpm.py --train --data-folders data/faces
    python ddpm.py --loadckpt ckpt/ckpt-0.pth --batch-size 64   # output/ddpm-{i}.png, ddpm-all.png

Several GPUs or machines (detected from torchrun's environment; --batch-size is global):
    torchrun --standalone --nproc_per_node 8 ddpm.py --train --data-folders data/faces --batch-size 512

Continue, fine-tune, inspect, export, evaluate:
    python ddpm.py --train --resume                              # the run's own settings and data
    python ddpm.py --train --loadckpt ckpt --lr 1e-5 --data-folders data/faces
    python ddpm.py --info ckpt/ckpt-0.pth
    python ddpm.py --loadckpt ckpt --export model.safetensors
    python ddpm.py --loadckpt ckpt --eval swd                    # also nll, fid, nearest

Edit real images with the same model:
    python ddpm.py --loadckpt ckpt --init-images sketch.png --strength 0.5 --num-samples 4
    python ddpm.py --loadckpt ckpt --init-images face.png --mask mask.png --num-samples 3
    python ddpm.py --loadckpt ckpt --invert a.png b.png
    python ddpm.py --loadckpt ckpt --interpolate a.png b.png

Nothing runs at import: `import ddpm` gives ModelConfig, TrainConfig, SampleSpec, train, generate,
load_model, load_images, UNet and GaussianDiffusion, and the typed jobs of the command line
(parse_command_line, run_job).

Contents. Sections under banners; each name is defined before it is used, except in the two
appendices at the end, which hold plumbing and data that the sections above call.
    Helpers                          errors, logging, seeds, flag parsers, progress bars
    Settings                         each setting declared once: flag, help, range, resume rule (setting)
    Model configuration              ModelConfig and the allowed values of its choices
    Noise schedule                   linear and cosine betas; uniform and log-SNR timestep grids
    UNet blocks                      time embedding, residual, attention, down/up/middle blocks
    UNet                             the network
    Gaussian diffusion and samplers  q, p, the loss, EDM's view; the sampler table (SAMPLERS, GRIDS)
        - the samplers: one step function and one row each
    Data                             decoding image folders, the demo faces' source, batches
        - decoding image files
        - where the images come from
        - batches
    Checkpoints                      reading, validating, loading and exporting
        - reading and finding checkpoints
        - validating what a checkpoint holds
        - post-hoc EMA: any length rebuilt from the snapshots of EDM2's power-function profiles
        - building and loading models
    Runtime: device, precision, processes, compile
        - memory: what a training step and a sampling batch need
    Sampling and pictures            per-image noise, generate, grids, strips, GIFs
        - sampling
        - pictures
    Evaluation                       NLL, FID, SWD, memorisation
        - negative log-likelihood
        - Frechet Inception Distance
        - sliced Wasserstein distance
        - memorisation
    Training
        - the settings               TrainConfig, what --resume keeps, the loss weighting
        - the run's state            EMA, signals, metrics.csv, counters, clocks
        - quality during training    --eval-every: SWD against held-out images, best.pth
        - the pictures of a run      run-before/after.png, previews, final grid, loss.png, quality.png
        - the trainer                Trainer: one step, the loop, checkpoints
    Command line
        - typed jobs: each declares its own options
        - the parser and the checks: from the declarations
        - from the flags to a job
        - train                      --train, and train() for Python: one path
        - sample, edit, invert
        - evaluate
        - inspect and export
        - main
    Appendix: run safety             atomic writes, output folders, the folder guard and lock
        - atomic writes
        - output folders
        - the checkpoint folder
    Appendix: the built-in demo faces
"""
from __future__ import annotations

import os
import signal
import sys


def _abort_while_starting(signum, frame):
    """Ctrl-C before main() runs (the imports and definitions take seconds): one line, exit 130.
    Nothing has been written yet. A handler, not a KeyboardInterrupt: torch's C extension imports
    numpy and clears any error raised meanwhile, which would swallow the interrupt."""
    sys.stderr.write("\nddpm.py: aborted while starting; nothing was written\n")
    sys.stderr.flush()
    os._exit(130)


if __name__ == "__main__":
    signal.signal(signal.SIGINT, _abort_while_starting)

import argparse
import contextlib
import copy
import csv
import enum
import errno
import gc
import hashlib
import io
import json
import math
import random
import re
import shutil
import socket
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

FORMAT = "ddpm.py"
FORMAT_VERSION = 4  # 3: run_id, the full training config, the data record; 4: dropout and the loss weight in "train"
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif"}
CKPT_PATTERN = "ckpt-*.pth"


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------

class DDPMError(Exception):
    """A problem with the user's input: printed as one line, exit status 2, no traceback."""


class TrainingError(Exception):
    """Training cannot go on (e.g. repeated non-finite losses): one line, exit status 1."""


def is_rank0() -> bool:
    """The first process (torchrun's RANK 0, also before the process group starts), or the only one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return os.environ.get("RANK", "0") == "0"


def prints_errors() -> bool:
    """One-line errors come from the first process of each machine only (torchrun's LOCAL_RANK 0):
    an error every rank hits is printed once, one that a single machine hits still shows in its log."""
    return os.environ.get("LOCAL_RANK", "0") == "0"


def log(*msg) -> None:
    """Print on rank 0 only."""
    if is_rank0():
        print(*msg, flush=True)


_warned = set()


def warn_once(msg: str) -> None:
    if msg not in _warned:
        _warned.add(msg)
        if is_rank0():
            print(f"warning: {msg}", file=sys.stderr, flush=True)


def extract(a: torch.Tensor, t: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Gather a[t] for a batch of timesteps t: (B,), reshaped to (B, 1, 1, ...) to broadcast on `shape`."""
    assert t.dim() == 1 and t.shape[0] == shape[0], f"t {tuple(t.shape)} does not match batch {shape[0]}"
    return a.gather(0, t).view(-1, *([1] * (len(shape) - 1)))


def mix_seed(*parts: int) -> int:
    """A 63-bit seed derived from integers, stable across runs, platforms and Python versions."""
    digest = hashlib.sha256(":".join(str(int(p)) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def parse_bool(value: str) -> bool:
    """The original's t/f, plus true/false, yes/no, 1/0."""
    v = value.strip().lower()
    if v in ("t", "true", "y", "yes", "1"):
        return True
    if v in ("f", "false", "n", "no", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected t/f or true/false, got {value!r}")


def parse_duration(value: str) -> float:
    """'2h', '90m', '45s', '1h30m' or plain seconds -> seconds."""
    v = value.strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", v):
        return float(v)
    parts = re.findall(r"(\d+(?:\.\d+)?)([hms])", v)
    if not parts or "".join(n + u for n, u in parts) != v:
        raise argparse.ArgumentTypeError(f"expected a duration such as 2h, 90m, 45s or 1h30m, got {value!r}")
    return sum(float(n) * {"h": 3600, "m": 60, "s": 1}[u] for n, u in parts)


def parse_colour(value: str) -> Tuple[int, int, int]:
    """A colour name or #rrggbb -> (r, g, b)."""
    from PIL import ImageColor

    try:
        return tuple(ImageColor.getrgb(value)[:3])
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a colour; use a name like white or #rrggbb") from None


def parse_fraction(value: str) -> float:
    """'1%' or '0.01' -> 0.01, in [0, 1)."""
    v = value.strip()
    try:
        f = float(v[:-1]) / 100 if v.endswith("%") else float(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction such as 0.01 or 1%, got {value!r}") from None
    if not 0 <= f < 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1) (0% to under 100%), got {value!r}")
    return f


class PinnedStager:
    """Host-to-GPU copies through two reused pinned buffers: the copy is asynchronous
    (non_blocking, no wait for the GPU), and a buffer is refilled only once its previous copy has
    finished. Elsewhere (CPU, MPS) a plain copy."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self._bufs: List[Optional[torch.Tensor]] = [None, None]
        self._done: list = [None, None]
        self._k = 0

    def stage(self, fill: Callable[[torch.Tensor], None], shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        """fill(host) writes a (shape, dtype) host tensor in place; returns it on the device."""
        if not self.cuda:
            host = torch.empty(tuple(shape), dtype=dtype)
            fill(host)
            return host.to(self.device)
        k, self._k = self._k, 1 - self._k
        n = math.prod(shape)
        buf = self._bufs[k]
        if self._done[k] is not None:
            self._done[k].synchronize()  # its last copy has left the buffer
        if buf is None or buf.dtype != dtype or buf.numel() < n:
            buf = self._bufs[k] = torch.empty(n, dtype=dtype, pin_memory=True)
        host = buf[:n].view(tuple(shape))
        fill(host)
        out = host.to(self.device, non_blocking=True)
        self._done[k] = torch.cuda.Event()
        self._done[k].record(torch.cuda.current_stream(self.device))
        return out


# torch's private helpers on the hot path, each behind one function with a public fallback (used where
# torch lacks the private one, or where PRIVATE_TORCH is False: a test compares the two)
PRIVATE_TORCH = True


def lerp_all(dst: List[torch.Tensor], src: List[torch.Tensor], weight: torch.Tensor) -> None:
    """dst[i] += weight * (src[i] - dst[i]) for every pair, in place (the EMA update): one fused kernel
    (torch._foreach_lerp_), or Tensor.lerp_ per pair."""
    if PRIVATE_TORCH and hasattr(torch, "_foreach_lerp_"):
        torch._foreach_lerp_(dst, src, weight)
    else:
        for d, s in zip(dst, src):
            d.lerp_(s, weight)


def all_finite(tensors: List[torch.Tensor]) -> bool:
    """Host sync: whether every tensor is finite (and their norms do not overflow): one fused norm per
    tensor (torch._foreach_norm), or torch.linalg.vector_norm each."""
    norms = (torch._foreach_norm(tensors) if PRIVATE_TORCH and hasattr(torch, "_foreach_norm") else
             [torch.linalg.vector_norm(t) for t in tensors])
    return bool(torch.isfinite(torch.stack(list(norms))).all())


def flag_nonfinite(tensors: List[torch.Tensor], found: torch.Tensor, one: torch.Tensor) -> None:
    """found (a 1-element float tensor on the device) set to 1 where any of the tensors holds inf or NaN,
    without a host sync: the kernel GradScaler uses (torch._amp_foreach_non_finite_check_and_unscale_,
    unscaling by `one`), or a check per tensor."""
    if PRIVATE_TORCH and hasattr(torch, "_amp_foreach_non_finite_check_and_unscale_"):
        torch._amp_foreach_non_finite_check_and_unscale_(tensors, found, one)
    elif tensors:
        bad = torch.stack([~torch.isfinite(t).all() for t in tensors]).any()
        found.copy_(torch.maximum(found, bad.float().view(1)))


def step_unless(opt: torch.optim.Optimizer, bad: torch.Tensor, fused: bool) -> None:
    """opt.step(), skipped where bad (a 0-dim device tensor) is 1: on the device, without a host sync,
    by the flag fused Adam reads as GradScaler's (opt.found_inf); else with a sync, bad.item()."""
    if fused and PRIVATE_TORCH:
        opt.found_inf = bad
        opt.step()
    elif bad.item() == 0:
        opt.step()


def first_line(e: BaseException, limit: int = 160) -> str:
    """The first line of an exception's message (or its type), for one-line errors."""
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:limit]


def is_out_of_memory(e: BaseException) -> bool:
    """Memory ran out: CUDA's OutOfMemoryError, Python's MemoryError, or the CPU allocator's error
    ("DefaultCPUAllocator: can't allocate memory"), which torch raises as a plain RuntimeError."""
    if isinstance(e, (MemoryError, torch.OutOfMemoryError)):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and ("can't allocate memory" in text or "DefaultCPUAllocator" in text)


@contextlib.contextmanager
def memory_or(message: str):
    """Memory running out inside (on the GPU or the CPU) becomes one line: DDPMError(message)."""
    try:
        yield
    except (MemoryError, OverflowError, RuntimeError) as e:
        if isinstance(e, RuntimeError) and not is_out_of_memory(e):
            raise
        raise DDPMError(f"{message} ({first_line(e, 60)})") from None


def available_ram() -> Optional[int]:
    """Bytes of memory free for this process where the system says (POSIX sysconf), else None."""
    if hasattr(os, "sysconf"):
        with contextlib.suppress(ValueError, OSError, AttributeError):
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return None


def format_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def make_progress(transient: bool = False):
    """A rich progress display: spinner, description, bar, count, elapsed and remaining time.
    Silent on ranks other than 0, progress.print included."""
    import rich.progress as rp
    from rich.console import Console

    return rp.Progress(
        rp.SpinnerColumn(),
        rp.TextColumn("[progress.description]{task.description}"),
        rp.BarColumn(),
        rp.MofNCompleteColumn(),
        rp.TimeElapsedColumn(),
        rp.TimeRemainingColumn(),
        rp.TextColumn("{task.fields[info]}"),
        transient=transient,
        disable=not is_rank0(),
        console=None if is_rank0() else Console(quiet=True),
    )


# ----------------------------------------------------------------------------------------------
# Settings
# ----------------------------------------------------------------------------------------------
# Every setting is declared once, as the field of the dataclass that holds it (ModelConfig, SampleSpec,
# DataFlags, TrainConfig and the jobs of the command line), with `setting(...)`: its flag, help and
# --help group, its type and range, the --demo preset's value, the commands (and samplers) it acts
# in, and what --resume does with it. The parser, the range checks, the resume rules, the job builders,
# the demo preset and the README's flag table are all read from these declarations.

RUN = "kept from the run"       # --resume: stored in the checkpoint; the run's value unless typed, a typed change said
MODEL = "the checkpoint's"      # the model's shape and schedule: a typed value must agree with the checkpoint
NOW = "this invocation's"       # where and how long it runs, where it writes: not stored, never carried over
COMMAND_NAMES = ("train", "sample", "edit", "invert", "eval", "info", "export")
EVERY = frozenset(COMMAND_NAMES)
SAMPLING = frozenset({"sample", "edit", "invert", "eval"})   # the commands that sample from --loadckpt
NO_DEMO = object()              # a setting the --demo preset leaves alone
GROUPS = {"data": "data", "model": "model (stored in checkpoints; not needed when sampling)", "diffusion": "diffusion",
          "training": "training", "sampling": "sampling",
          "editing": "editing real images (sampling mode; output/edit-*.png and edit-grid.png)", "run": "run",
          "tools": "tools", "evaluation": "evaluation"}
DECLARED: List["Setting"] = []  # every setting, in the order declared (the parser's order within a --help group)


@dataclass(eq=False)
class Setting:
    """One setting's declaration (see setting)."""

    flag: str                             # --lr
    help: str
    group: str                            # a key of GROUPS
    default: object = None
    kind: Optional[Callable] = None       # what converts the typed text (default: the default's type)
    nargs: Optional[str] = None
    choices: Optional[Sequence] = None
    metavar: object = None
    switch: str = ""                      # on: a flag without value; off: --no-X turns it off; both: --X / --no-X
    check: Optional[Callable[[object], bool]] = None
    rule: str = ""                        # the check in words: "{flag} must be {rule}"
    resume: str = NOW                     # RUN, MODEL or NOW
    demo: object = NO_DEMO                # the --demo preset's value
    commands: frozenset = EVERY           # where it acts; typed elsewhere it is refused
    needs: Optional[Callable] = None      # (flags) -> None where it acts, else the one line that refuses it
    text: Optional[str] = None            # the default as typed, where argparse converts it (a colour name)
    name: str = ""                        # the field that declares it: the parsed flags' attribute
    homed: bool = False                   # named, and given its class's common values (declares)

    def parser_kwargs(self, default) -> dict:
        kw = dict(dest=self.name, help=self.help() if callable(self.help) else self.help)
        if self.switch:
            return {**kw, "action": {"on": "store_true", "off": "store_false",
                                     "both": argparse.BooleanOptionalAction}[self.switch], "default": default}
        kind = self.kind or (type(default) if default is not None and not isinstance(default, (list, tuple)) else
                             type(default[0]) if default else None)
        return {**kw, "default": self.text if self.text is not None else default, "type": kind, "nargs": self.nargs,
                "choices": self.options(), "metavar": self.metavar}

    def options(self) -> Optional[list]:
        """The allowed values (choices may be a function, for tables that grow: SAMPLERS, GRIDS)."""
        return list(self.choices()) if callable(self.choices) else self.choices

    def out_of_range(self, value) -> Optional[str]:
        """The one line for a value out of the setting's range (or not among its choices), else None."""
        if value is None or (self.check is None and self.choices is None):
            return None
        try:
            ok = self.check(value) if self.check is not None else value in self.options()
        except (TypeError, ValueError):
            ok = False
        return None if ok else f"{self.flag} must be {self.rule or 'one of ' + ', '.join(self.options())}, got {value!r}"


def setting(default, flag: str, help: str, group: str = "", **kw):
    """A dataclass field declared as a setting: its default, its flag, its help and --help group, and
    (kw) the rest of Setting: kind, nargs, choices, metavar, switch, check and rule, resume, demo,
    commands, needs. What is not given here, the class's @declares(...) gives."""
    s = Setting(flag, help, group, default, **kw)
    s.given = ({"group"} if group else set()) | set(kw)
    DECLARED.append(s)
    return field(default=default, metadata={"setting": s})


def same(home: type, name: str, default=MISSING):
    """A field that takes the value of a setting declared in another class (home.name)."""
    s = settings_of(home)[name]
    return field(default=s.default if default is MISSING else default, metadata={"setting": s})


def derived(why: str, default=MISSING):
    """A field that no flag sets directly (the job builders fill it in); `why` says where it comes from."""
    return field(default=default, metadata={"derived": why})


def declares(cls=None, **common):
    """Class decorator, above @dataclass: each setting declared in the class is named after its field,
    and takes the class's common values (group, resume, commands) where it does not give its own."""
    def name_them(cls):
        for f in fields(cls):
            s = f.metadata.get("setting")
            if s is not None and not s.homed:  # declared here (a field that takes another's is homed already)
                s.name, s.homed = s.name or f.name, True
                for k, v in common.items():
                    if k not in s.given:
                        setattr(s, k, v)
        return cls
    return name_them(cls) if cls is not None else name_them


def settings_of(cls) -> Dict[str, Setting]:
    """The settings a dataclass's fields declare or take, by field name."""
    return {f.name: f.metadata["setting"] for f in fields(cls) if "setting" in f.metadata}


def check_settings(config) -> None:
    """Every setting field of a dataclass instance (a config built by hand, or read from a checkpoint):
    of the setting's type, and in its range; one line naming the flag otherwise."""
    for name, s in settings_of(type(config)).items():
        v = getattr(config, name)
        if v is None and s.default is None:
            continue
        kind = s.kind if s.kind in (int, float, str) else type(s.default) if s.default is not None else None
        kinds = None if s.nargs else (int, float) if kind is float else (kind,) if kind in (int, str, bool) else None
        if kinds and (not isinstance(v, kinds) or (isinstance(v, bool) and bool not in kinds)):
            what = {int: "an integer", float: "a number", str: "text", bool: "true or false"}[kind]
            raise DDPMError(f"{s.flag} must be {what}, got {v!r}")
        why = s.out_of_range(v)
        if why:
            raise DDPMError(why)


def at_least(lo: float) -> dict:
    return dict(check=lambda v: v >= lo, rule=f"at least {lo:,g}" if lo != 0 else "0 or more")


def within(lo: float, hi: float, rule: str = "") -> dict:
    return dict(check=lambda v: lo <= v <= hi, rule=rule or f"from {lo:,g} to {hi:,g}")


def fraction(rule: str = "a fraction in [0, 1)") -> dict:
    return dict(check=lambda v: 0 <= v < 1, rule=rule)


# ----------------------------------------------------------------------------------------------
# Model configuration
# ----------------------------------------------------------------------------------------------

MODEL_COMMANDS = EVERY - {"info"}  # a typed model flag builds the model, or must agree with the checkpoint's


@declares(resume=MODEL, commands=MODEL_COMMANDS)
@dataclass
class ModelConfig:
    """Everything needed to rebuild the model (its shape, and the schedule and objective its weights
    were trained for); stored in every checkpoint. What only training reads (dropout, the loss
    weighting) is in TrainConfig."""

    img_channels: int = setting(3, "--img-channels", "3 for RGB, 1 for grayscale", "data",
                                check=lambda v: v in (1, 3), rule="1 (grayscale) or 3 (RGB)")
    img_size: int = setting(64, "--img-size", "images are resized (shorter side) and centre-cropped", "data", demo=32,
                            **within(1, 4096))
    num_channels: int = setting(64, "--num-channels", "channels of the first feature map", "model", demo=32,
                                **within(4, 4096))
    channel_multiples: Tuple[int, ...] = setting(
        (1, 2, 4, 8), "--channel-multiples", "per resolution", "model", kind=int, nargs="+", demo=(1, 2, 2, 2),
        check=lambda v: 0 < len(v) <= 10 and 1 <= min(v) <= max(v) <= 64, rule="1 to 10 values from 1 to 64")
    has_attn: Tuple[bool, ...] = setting((False, False, True, True), "--has-attn",
                                         "attention per resolution: t/f (or true/false)", "model", kind=parse_bool,
                                         nargs="+")
    num_blocks: int = setting(2, "--num-blocks", "residual blocks per resolution", "model", demo=1, **within(1, 64))
    timesteps: int = setting(1000, "--timesteps", "T", "diffusion", **within(2, 100_000))
    beta_min: float = setting(0.0001, "--beta-min", "beta_1 of the linear schedule", "diffusion", check=math.isfinite,
                              rule="a finite number")
    beta_max: float = setting(0.02, "--beta-max", "beta_T of the linear schedule", "diffusion", check=math.isfinite,
                              rule="a finite number")
    legacy_attention: bool = derived("the loader sets it for the original script's checkpoints (their cross-batch "
                                     "attention)", False)
    time_cond: str = setting("scale-shift", "--time-cond", "how blocks see t: scale-shift = GroupNorm(h) * (1 + scale) "
                             "+ shift; add = the original's shift before GroupNorm (which cancels it); checkpoints "
                             "without the field load as add", "model", choices=("scale-shift", "add"))
    norm_groups: int = setting(32, "--norm-groups", "GroupNorm groups (channels must be a multiple)", "model", demo=8,
                               **at_least(1))
    objective: str = setting("v", "--objective", "the network predicts the noise eps (the original), v (Salimans & "
                             "Ho 2022), or is EDM's preconditioned denoiser (Karras et al. 2022; trained on log-normal "
                             "noise levels); checkpoints without the field load as eps", "diffusion",
                             choices=("eps", "v", "edm"))
    beta_schedule: str = setting("cosine", "--beta-schedule", "linear (the original) or cosine (Nichol & Dhariwal "
                                 "2021); checkpoints without the field load as linear", "diffusion",
                                 choices=("linear", "cosine"))

    def __post_init__(self):
        self.channel_multiples = tuple(int(m) for m in self.channel_multiples)
        self.has_attn = tuple(bool(a) for a in self.has_attn)

    def validate(self) -> "ModelConfig":
        """Fail with one line on values of the wrong type or range (the declarations) and on combinations
        the UNet cannot build or run."""
        check_settings(self)
        if len(self.has_attn) != len(self.channel_multiples):
            raise DDPMError(f"--has-attn has {len(self.has_attn)} values but --channel-multiples has "
                            f"{len(self.channel_multiples)}; give one t/f per resolution")
        factor = 2 ** (len(self.channel_multiples) - 1)
        if self.img_size < factor or self.img_size % factor:
            raise DDPMError(f"--img-size {self.img_size} cannot be halved {len(self.channel_multiples) - 1} times "
                            f"cleanly; use a multiple of {factor}, or fewer --channel-multiples")
        g = self.norm_groups
        for c in [self.num_channels] + [self.num_channels * m for m in self.channel_multiples]:
            if c % g:
                raise DDPMError(f"GroupNorm({g}) cannot divide {c} channels; --num-channels times each of "
                                f"--channel-multiples must be a multiple of --norm-groups {g}")
        if not 0 < self.beta_min <= self.beta_max < 1:
            raise DDPMError(f"need 0 < --beta-min <= --beta-max < 1, got {self.beta_min} and {self.beta_max}")
        return self

    def to_dict(self) -> dict:
        return {**asdict(self), "channel_multiples": list(self.channel_multiples), "has_attn": list(self.has_attn)}

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        """A config from a checkpoint: fields it lacks (it was written before they existed) take the
        values that reproduce what it was trained as (OLD_CHECKPOINT_DEFAULTS), not today's defaults;
        fields that have since moved to TrainConfig (dropout, the loss weighting) are left out here."""
        known = {f.name for f in fields(cls)}
        for name, kind in (("channel_multiples", int), ("has_attn", bool)):  # before __post_init__ converts them
            v = d.get(name, [])
            if not (isinstance(v, (list, tuple)) and all(isinstance(x, kind) and (kind is bool or not isinstance(x, bool))
                                                         for x in v)):
                raise DDPMError(f"{name} must be a list of {'integers' if kind is int else 'true/false'}, got {v!r}")
        return cls(**{**OLD_CHECKPOINT_DEFAULTS, **{k: v for k, v in d.items() if k in known}})


# what checkpoints written before these fields existed (and the original script's) were trained as
OLD_CHECKPOINT_DEFAULTS = dict(time_cond="add", norm_groups=32, objective="eps", beta_schedule="linear")
MODEL_FLAGS = list(settings_of(ModelConfig))  # the fields a typed model flag must agree with, for a checkpoint


# ----------------------------------------------------------------------------------------------
# Noise schedule
# ----------------------------------------------------------------------------------------------

def linear_beta_schedule(timesteps: int, beta_min: float, beta_max: float) -> torch.Tensor:
    """beta_1..beta_T, linear as in Ho et al. 2020 (Sec. 4), in float64."""
    return torch.linspace(beta_min, beta_max, timesteps, dtype=torch.float64)


def cosine_beta_schedule(timesteps: int, s: float = 0.008) -> torch.Tensor:
    """beta_1..beta_T of Nichol & Dhariwal 2021 (eq. 17), in float64: alpha_bar(t) = f(t) / f(0) with
    f(t) = cos^2((t/T + s) / (1 + s) * pi/2), beta_t = 1 - alpha_bar_t / alpha_bar_{t-1}, clipped at 0.999."""
    t = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
    f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
    ab = f / f[0]
    return (1 - ab[1:] / ab[:-1]).clamp(max=0.999)


def beta_schedule(name: str, timesteps: int, beta_min: float, beta_max: float) -> torch.Tensor:
    return (cosine_beta_schedule(timesteps) if name == "cosine"
            else linear_beta_schedule(timesteps, beta_min, beta_max))


def timestep_grid(timesteps: int, steps: int) -> List[int]:
    """`steps` timesteps from T-1 down to 0, evenly spaced (all of them when steps >= T)."""
    if steps >= timesteps:
        return list(range(timesteps - 1, -1, -1))
    grid = torch.linspace(timesteps - 1, 0, max(steps, 1), dtype=torch.float64).round().long().tolist()
    return list(dict.fromkeys(grid))  # spacing >= 1, so rounding keeps them distinct


# log-SNR below which a grid spends no steps: the signal's scale e^lambda = sqrt(SNR) < 0.0041, half
# an 8-bit level (1/255 on the [-1, 1] scale) of the noise's; the linear schedule's lambda_T is -5.06
LAMBDA_FLOOR = -5.5


def logsnr_grid(alpha_bar: torch.Tensor, steps: int) -> List[int]:
    """`steps` timesteps from T-1 down to 0, evenly spaced in log-SNR lambda_t = log(alpha_bar_t / (1 -
    alpha_bar_t)) / 2 where integer timesteps allow (always at least 1 apart), for DPM-Solver++ and DDIM;
    Lu et al. recommend it at low resolutions. On the uniform grid, the 2M step into t = 0 spans most of
    lambda and extrapolates x_0 by a factor ~3 (+24% std on Gaussian data at 20 steps), and DDIM loses
    half the variance of fine detail at 25 steps. Same length as timestep_grid.
    The spacing starts at LAMBDA_FLOOR where lambda_T lies below it (the cosine schedule's clipped last
    betas reach -9.9): the first step jumps from T-1 to there, instead of spending ten of 25 steps on
    t = 999..990, where the signal is under half an 8-bit level of the noise."""
    T = alpha_bar.shape[0]
    if steps >= T:
        return list(range(T - 1, -1, -1))
    lam = 0.5 * torch.log(alpha_bar / (1 - alpha_bar)).double()  # (T,), decreasing in t
    target = torch.linspace(max(float(lam[-1]), LAMBDA_FLOOR), float(lam[0]), max(steps, 1), dtype=torch.float64)
    grid = (lam[None, :] - target[:, None]).abs().argmin(dim=1).tolist()  # nearest timestep, non-increasing
    grid[0] = T - 1  # sampling starts from pure noise at T-1
    for i in range(len(grid) - 2, -1, -1):  # where lambda is steep (small t), at least 1 apart
        grid[i] = max(grid[i], grid[i + 1] + 1)
    cap = T - 1
    for i in range(len(grid)):  # and at most T-1-i, so exactly `steps` distinct timesteps
        grid[i] = min(grid[i], cap)
        cap = grid[i] - 1
    return grid


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> List[float]:
    """n noise levels from sigma_max down to sigma_min, evenly spaced in sigma^(1/rho) (Karras et al.
    2022, eq. 5): rho = 7 puts most steps at low noise."""
    if n == 1:
        return [sigma_max]
    a, b = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return [(a + i / (n - 1) * (b - a)) ** rho for i in range(n)]


# ----------------------------------------------------------------------------------------------
# UNet blocks
# ----------------------------------------------------------------------------------------------
# Each block takes the ModelConfig (nanoGPT's Block(config)): channel counts and whether to attend
# vary per block and are passed beside it; dropout is a training setting (TrainConfig), passed in.

class TimeEmbedding(nn.Module):
    """Sinusoidal embedding of t followed by a 2-layer MLP (Vaswani et al. 2017; Ho et al. 2020)."""

    def __init__(self, fourier_channels: int, time_channels: int, theta: float = 10000.0):
        super().__init__()
        half = fourier_channels // 2
        freqs = torch.exp(torch.arange(half, dtype=torch.float64) * -(math.log(theta) / (half - 1)))
        self.register_buffer("freqs", freqs.float(), persistent=False)
        self.mlp = nn.Sequential(
            nn.Linear(2 * half, time_channels), nn.SiLU(), nn.Linear(time_channels, time_channels))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """t: (B,) -> (B, time_channels)"""
        emb = t.float()[:, None] * self.freqs[None, :]  # (B, half)
        return self.mlp(torch.cat((emb.sin(), emb.cos()), dim=1))


def time_channels(cfg: ModelConfig) -> int:
    """Width of the time embedding: 4x the first feature map's (Ho et al.)."""
    return cfg.num_channels * 4


class ResidualBlock(nn.Module):
    """GroupNorm-SiLU-Conv, then the time embedding, GroupNorm-SiLU-Dropout-Conv, plus a shortcut.

    time_cond="add" (the original): the embedding is added as a per-channel shift before the second
    GroupNorm, which subtracts each group's mean again: with one channel per group (GroupNorm(32)
    at 32 channels) the block gets no information about t at all, at 64 channels half of it.
    time_cond="scale-shift" (Dhariwal & Nichol 2021, use_scale_shift_norm): the embedding is projected
    to a scale and a shift applied after that GroupNorm, GroupNorm(h) * (1 + scale) + shift.
    """

    def __init__(self, cfg: ModelConfig, in_channels: int, out_channels: int, dropout: float = 0.0):
        super().__init__()
        groups, self.scale_shift = cfg.norm_groups, cfg.time_cond == "scale-shift"
        self.conv1 = nn.Sequential(
            nn.GroupNorm(groups, in_channels), nn.SiLU(), nn.Conv2d(in_channels, out_channels, 3, padding=1))
        self.time_emb = nn.Sequential(nn.SiLU(),
                                      nn.Linear(time_channels(cfg), out_channels * (2 if self.scale_shift else 1)))
        self.conv2 = nn.Sequential(
            nn.GroupNorm(groups, out_channels), nn.SiLU(), nn.Dropout(dropout),
            nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x: (B, in_c, H, W), t: (B, time_c) -> (B, out_c, H, W)"""
        h = self.conv1(x)
        emb = self.time_emb(t)[:, :, None, None]  # (B, out_c or 2 out_c, 1, 1)
        if self.scale_shift:
            scale, shift = emb.chunk(2, dim=1)
            norm, rest = self.conv2[0], self.conv2[1:]
            return rest(norm(h) * (1 + scale) + shift) + self.shortcut(x)
        return self.conv2(h + emb) + self.shortcut(x)


class AttentionBlock(nn.Module):
    """Self-attention over the H*W positions of each image, with a residual connection.

    The weights live in an nn.MultiheadAttention (in_proj_*, out_proj) so that checkpoints of the
    original script load unchanged; the computation is F.scaled_dot_product_attention, which picks
    flash / memory-efficient kernels where available.

    cfg.legacy_attention reproduces the original script exactly, for its old checkpoints: it passed
    (B, HW, C) to a sequence-first MultiheadAttention, so each position attended across the images
    of the batch, and it added the residual to the normalised input.
    """

    def __init__(self, cfg: ModelConfig, num_channels: int, num_heads: int = 1):
        super().__init__()
        self.num_heads = num_heads
        self.legacy = cfg.legacy_attention
        self.norm = nn.GroupNorm(cfg.norm_groups, num_channels)
        self.attn = nn.MultiheadAttention(num_channels, num_heads)

    def _attend(self, h: torch.Tensor) -> torch.Tensor:
        """h: (N, L, C) -> (N, L, C), attention over L for each of the N sequences."""
        N, L, C = h.shape
        qkv = F.linear(h, self.attn.in_proj_weight, self.attn.in_proj_bias)  # (N, L, 3C)
        q, k, v = qkv.view(N, L, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)  # (N, nh, L, d)
        o = F.scaled_dot_product_attention(q, k, v)  # (N, nh, L, d)
        return self.attn.out_proj(o.transpose(1, 2).reshape(N, L, C))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) -> (B, C, H, W)"""
        B, C, H, W = x.shape
        h = self.norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        if self.legacy:
            out = h + self._attend(h.transpose(0, 1)).transpose(0, 1)  # attends over B; residual on norm(x)
            return out.transpose(1, 2).reshape(B, C, H, W)
        return x + self._attend(h).transpose(1, 2).reshape(B, C, H, W)


class DownBlock(nn.Module):
    """ResidualBlock, then attention at resolutions that have it (first half of the UNet)."""

    def __init__(self, cfg: ModelConfig, in_channels: int, out_channels: int, has_attn: bool, dropout: float = 0.0):
        super().__init__()
        self.res = ResidualBlock(cfg, in_channels, out_channels, dropout)
        self.attn = AttentionBlock(cfg, out_channels) if has_attn else nn.Identity()

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x: (B, in_c, H, W) -> (B, out_c, H, W)"""
        return self.attn(self.res(x, t))


class UpBlock(nn.Module):
    """Concatenate the skip connection, ResidualBlock, then attention (second half of the UNet)."""

    def __init__(self, cfg: ModelConfig, in_channels: int, out_channels: int, has_attn: bool, dropout: float = 0.0):
        super().__init__()
        self.res = ResidualBlock(cfg, in_channels + out_channels, out_channels, dropout)
        self.attn = AttentionBlock(cfg, out_channels) if has_attn else nn.Identity()

    def forward(self, x: torch.Tensor, skip: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x: (B, in_c, H, W), skip: (B, out_c, H, W) -> (B, out_c, H, W)"""
        return self.attn(self.res(torch.cat([x, skip], dim=1), t))


class MiddleBlock(nn.Module):
    """ResidualBlock, attention, ResidualBlock at the lowest resolution."""

    def __init__(self, cfg: ModelConfig, num_channels: int, dropout: float = 0.0):
        super().__init__()
        self.res1 = ResidualBlock(cfg, num_channels, num_channels, dropout)
        self.attn = AttentionBlock(cfg, num_channels)
        self.res2 = ResidualBlock(cfg, num_channels, num_channels, dropout)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) -> (B, C, H, W)"""
        return self.res2(self.attn(self.res1(x, t)), t)


class DownSample(nn.Module):
    """3x3 convolution with stride 2: (B, C, H, W) -> (B, C, H/2, W/2)."""

    def __init__(self, num_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(num_channels, num_channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class UpSample(nn.Module):
    """4x4 transposed convolution with stride 2: (B, C, H, W) -> (B, C, 2H, 2W)."""

    def __init__(self, num_channels: int):
        super().__init__()
        self.conv = nn.ConvTranspose2d(num_channels, num_channels, 4, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


# ----------------------------------------------------------------------------------------------
# UNet
# ----------------------------------------------------------------------------------------------

# the ModelConfig fields that shape the network (the rest describe the diffusion around it)
UNET_FIELDS = ("img_channels", "num_channels", "channel_multiples", "has_attn", "num_blocks", "legacy_attention",
               "time_cond", "norm_groups")


class UNet(nn.Module):
    """The network of the diffusion model: eps_theta(x_t, t); v under --objective v; under --objective
    edm, EDM's F(c_in x; c_noise), its time input c_noise = ln(sigma) / 4 (see GaussianDiffusion.denoise).

    Same layout as the original script (module names included, so its state_dicts load): per
    resolution, num_blocks DownBlocks then a DownSample; a MiddleBlock; per resolution,
    num_blocks + 1 UpBlocks then an UpSample. The arguments are the original's, in its order (its
    defaults give 54.56M parameters); UNet.from_config builds one from a ModelConfig.
    """

    def __init__(self, img_channels: int = 3, num_channels: int = 64,
                 channel_multiples: Sequence[int] = (1, 2, 4, 8),
                 has_attn: Sequence[bool] = (False, False, True, True), num_blocks: int = 2,
                 dropout: float = 0.1, legacy_attention: bool = False, time_cond: str = "add", norm_groups: int = 32):
        super().__init__()
        assert len(channel_multiples) == len(has_attn), "one has_attn flag per resolution"
        cfg = ModelConfig(img_channels=img_channels, num_channels=num_channels, channel_multiples=channel_multiples,
                          has_attn=has_attn, num_blocks=num_blocks, legacy_attention=legacy_attention,
                          time_cond=time_cond, norm_groups=norm_groups)
        self.time_emb = TimeEmbedding(num_channels, time_channels(cfg))
        self.in_conv = nn.Conv2d(img_channels, num_channels, 3, padding=1)
        self.down = nn.ModuleList()
        self.up = nn.ModuleList()
        in_c = num_channels
        for i, (mult, attn) in enumerate(zip(cfg.channel_multiples, cfg.has_attn)):
            out_c = num_channels * mult
            self.down.append(DownBlock(cfg, in_c, out_c, attn, dropout))
            for _ in range(num_blocks - 1):
                self.down.append(DownBlock(cfg, out_c, out_c, attn, dropout))
            # The up path is built in the same order and applied reversed (this keeps the
            # original's parameter names): UpSample, num_blocks x UpBlock(out, out), UpBlock(out, in).
            self.up.append(UpBlock(cfg, out_c, in_c, attn, dropout))
            for _ in range(num_blocks):
                self.up.append(UpBlock(cfg, out_c, out_c, attn, dropout))
            if i < len(channel_multiples) - 1:
                self.down.append(DownSample(out_c))
                self.up.append(UpSample(out_c))
            in_c = out_c
        self.middle = MiddleBlock(cfg, in_c, dropout)
        self.out_conv = nn.Sequential(
            nn.GroupNorm(norm_groups, num_channels), nn.SiLU(), nn.Conv2d(num_channels, img_channels, 3, padding=1))

    @classmethod
    def from_config(cls, cfg: ModelConfig, dropout: float = 0.0) -> "UNet":
        return cls(**{name: getattr(cfg, name) for name in UNET_FIELDS}, dropout=dropout)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x: (B, img_c, H, W), t: (B,) -> the prediction (eps or v), (B, img_c, H, W)"""
        temb = self.time_emb(t)
        x = self.in_conv(x)
        skips = [x]
        for m in self.down:
            x = m(x, temb) if isinstance(m, DownBlock) else m(x)
            skips.append(x)
        x = self.middle(x, temb)
        for m in reversed(self.up):
            x = m(x, skips.pop(), temb) if isinstance(m, UpBlock) else m(x)
        assert not skips, "every skip connection is used once"
        return self.out_conv(x)


# ----------------------------------------------------------------------------------------------
# Gaussian diffusion and samplers
# ----------------------------------------------------------------------------------------------

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def applies_to_sampler(flag: str, knob: str, also: str = "") -> Callable:
    """`needs` of a sampler knob: it acts with the samplers whose row (SAMPLERS) says `knob`, or (also)
    with --eval nll."""
    def needs(args) -> Optional[str]:
        rows = [n for n, r in SAMPLERS.items() if getattr(r, knob)]
        if args.sampler in rows or (also and args.eval == also):
            return None
        return f"{flag} goes with --sampler {' or '.join(rows)}" + (f" or --eval {also}" if also else "") + \
            f", not {args.sampler}"
    return needs


PICTURES = EVERY - {"info", "export"}  # the commands that sample: the sampling commands, and training's pictures


@declares(group="sampling", resume=RUN, commands=PICTURES)
@dataclass(frozen=True)
class SampleSpec:
    """How to sample, passed whole to every sampling call (images, previews, pictures, evaluation),
    so no call can honour one of these and drop another."""

    sampler: str = setting("dpm++", "--sampler", lambda: "; ".join(f"{n} = {r.help}" for n, r in SAMPLERS.items()),
                           choices=lambda: list(SAMPLERS))
    steps: Optional[int] = setting(None, "--steps", lambda: "model calls per image (default: " + ", ".join(
        f"{r.default_steps or 'T'} for {n}" for n, r in SAMPLERS.items()) + f"; {INVERT_STEPS} for inversion)",
        kind=int, **at_least(1))
    eta: float = setting(0.0, "--eta", "DDIM noise (0: deterministic, 1: DDPM-like)",
                         needs=applies_to_sampler("--eta", "eta"), **within(0, 1, "in [0, 1]"))
    grid: Optional[str] = setting(None, "--grid", lambda: "the timesteps sampled at: uniform, logsnr (evenly in "
                                  "log-SNR) or karras (EDM's rho = 7 noise levels) (default: the sampler's own: "
                                  + ", ".join(f"{r.grid} for {n}" for n, r in SAMPLERS.items()) + ")", kind=str,
                                  choices=lambda: list(GRIDS))
    churn: float = setting(0.0, "--churn", "heun: EDM's S_churn, fresh noise at each step: each of the N noise levels "
                           "is raised by gamma = min(S_churn / N, sqrt(2) - 1) before its step, so above N (sqrt(2) - 1) "
                           "it changes nothing more (0: deterministic)", needs=applies_to_sampler("--churn", "churn"),
                           check=lambda v: math.isfinite(v) and v >= 0, rule="0 or more")
    variance: str = setting("large", "--ddpm-variance", "the ddpm sampler's sigma^2: large = beta (the original), "
                            "small = the posterior's beta-tilde (better for few respaced steps); also the bound of "
                            "--eval nll", choices=("large", "small"),
                            needs=applies_to_sampler("--ddpm-variance", "variance", also="nll"))
    clip: bool = setting(True, "--clip", "clamp each x_0 estimate to [-1, 1] (Ho et al.'s reference code); --no-clip: "
                         "the original script's unclipped sampler", switch="both")

    @property
    def row(self) -> "Sampler":
        """The sampler's row of SAMPLERS; an unknown name is a one-line error."""
        if self.sampler not in SAMPLERS:
            raise DDPMError(f"--sampler must be one of {', '.join(SAMPLERS)}, got {self.sampler!r}")
        return SAMPLERS[self.sampler]

    def steps_for(self, timesteps: int) -> int:
        return self.steps or self.row.default_steps or timesteps

    @property
    def draws_noise(self) -> bool:
        """Whether sampling draws fresh noise at each step (so the path from x_T is not deterministic)."""
        return self.row.stochastic or (self.row.eta and self.eta > 0) or (self.row.churn and self.churn > 0)

    def to_dict(self) -> dict:
        return asdict(self)


def sqrt_of(v):
    """sqrt of a Python float (math.sqrt, correctly rounded) or of a tensor."""
    return v.sqrt() if isinstance(v, torch.Tensor) else math.sqrt(v)


def q_at(x0, eps, ab):
    """sqrt(alpha_bar) x_0 + sqrt(1 - alpha_bar) eps: a draw of q(x_t | x_0), eq. 4, at alpha_bar = ab
    (a float or a broadcastable tensor); with ab = alpha_bar_t / alpha_bar_s it is q(x_t | x_s)."""
    return sqrt_of(ab) * x0 + sqrt_of(1 - ab) * eps


SIGMA_DATA = 0.5  # EDM's standard deviation of the data (images in [-1, 1])


def edm_preconditioning(sigma):
    """(c_skip, c_out, c_in, c_noise) of EDM (Karras et al. 2022, Table 1) at noise level sigma (a
    float or a tensor): D(x; sigma) = c_skip x + c_out F(c_in x; c_noise), c_skip = sd^2 / (sigma^2 +
    sd^2), c_out = sigma sd / sqrt(sigma^2 + sd^2), c_in = 1 / sqrt(sigma^2 + sd^2), c_noise =
    ln(sigma) / 4, sd = SIGMA_DATA."""
    s2, sd2 = sigma * sigma, SIGMA_DATA * SIGMA_DATA
    log = torch.log if isinstance(sigma, torch.Tensor) else math.log
    return sd2 / (s2 + sd2), sigma * SIGMA_DATA / sqrt_of(s2 + sd2), 1 / sqrt_of(s2 + sd2), log(sigma) / 4


def ddpm_var(ab_t, ab_s, variance: str = "large"):
    """sigma^2 of the ancestral step from t down to s < t (Ho et al. Sec. 3.2, on the respaced chain):
    large = beta = 1 - alpha_bar_t / alpha_bar_s, small = beta-tilde, the posterior's variance
    beta (1 - alpha_bar_s) / (1 - alpha_bar_t) (eq. 7). Floats or tensors."""
    return (1 - ab_t / ab_s) * ((1 - ab_s) / (1 - ab_t) if variance == "small" else 1.0)


class GaussianDiffusion(nn.Module):
    """Forward process q, reverse process p and the loss: the simple loss of Ho et al. 2020 (eps, or v
    under the v objective), or under the edm objective EDM's preconditioned denoiser and its loss
    (Karras et al. 2022), its noise levels sigma seen as timesteps of the schedule.

    Buffers are named after the paper's symbols, computed in float64 and stored as float32, and
    not saved in the state_dict (which therefore holds only `eps_model.*`, as the original's did).
    `eps_model` is the network whatever it predicts (eps, v or EDM's F): the name is the original's
    state_dict key. `config` is the ModelConfig it was built from and `source` the
    checkpoint it was loaded from (build_diffusion and load_model set them; None when built by
    hand). The schedule and what the network predicts come from `config` where it is given.
    """

    def __init__(self, eps_model: nn.Module, timesteps: int = 1000, beta_min: float = 0.0001,
                 beta_max: float = 0.02, config: Optional[ModelConfig] = None, source: Optional["ModelSource"] = None):
        super().__init__()
        self.eps_model = eps_model
        self.timesteps = timesteps
        self.config = config
        self.source = source
        c = config or ModelConfig(**OLD_CHECKPOINT_DEFAULTS)
        self.objective = c.objective
        beta = beta_schedule(c.beta_schedule, timesteps, beta_min, beta_max)
        alpha = 1.0 - beta
        alpha_bar = torch.cumprod(alpha, dim=0)
        alpha_bar_prev = torch.cat([alpha_bar.new_ones(1), alpha_bar[:-1]])
        # exact values for the samplers and the bound (plain attributes, float64, on the CPU); log sigma_t,
        # sigma = sqrt((1 - alpha_bar) / alpha_bar), increasing in t: the noise level in EDM's terms
        self.alpha_bar_f64, self.alpha_bar_prev_f64 = alpha_bar, alpha_bar_prev
        self.log_sigma_f64 = 0.5 * torch.log((1 - alpha_bar) / alpha_bar)
        buffers = {
            "beta": beta,
            "alpha_bar": alpha_bar,
            "sqrt_alpha_bar": alpha_bar.sqrt(),                     # mean coefficient of q(x_t | x_0), eq. 4
            "sqrt_one_minus_alpha_bar": (1 - alpha_bar).sqrt(),     # std of q(x_t | x_0), eq. 4
            "p_sigma": beta.sqrt(),                                 # sigma_t^2 = beta_t (Sec. 3.2)
            # posterior q(x_{t-1} | x_t, x_0), eq. 6-7
            "posterior_variance": ddpm_var(alpha_bar, alpha_bar_prev, "small"),
            "posterior_mean_coef1": beta * alpha_bar_prev.sqrt() / (1 - alpha_bar),
            "posterior_mean_coef2": (1 - alpha_bar_prev) * alpha.sqrt() / (1 - alpha_bar),
        }
        for name, value in buffers.items():
            self.register_buffer(name, value.float(), persistent=False)

    def ab(self, t: float) -> float:
        """alpha_bar_t in float64 precision; 1 at t = -1 (the data itself). A timestep between two
        integers (the Karras grid, a guide's own timestep) has the noise level interpolated in log
        sigma between its neighbours, as k-diffusion wraps DDPM models: alpha_bar = 1 / (1 + sigma^2)."""
        if t < 0:
            return 1.0
        if float(t).is_integer():
            return float(self.alpha_bar_f64[int(t)])
        return 1.0 / (1.0 + self.sigma(t) ** 2)

    def sigma(self, t: float) -> float:
        """The noise level sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t), linear in log sigma between
        integer timesteps."""
        lo = min(int(math.floor(t)), self.timesteps - 1)
        hi, w = min(lo + 1, self.timesteps - 1), t - lo
        return math.exp((1 - w) * float(self.log_sigma_f64[lo]) + w * float(self.log_sigma_f64[hi]))

    def t_of_sigma(self, sigma: float) -> float:
        """The (fractional) timestep of noise level sigma, between 0 and T-1: the inverse of sigma()."""
        ls, log_s = self.log_sigma_f64, math.log(sigma)
        if log_s <= float(ls[0]):
            return 0.0
        if log_s >= float(ls[-1]):
            return float(self.timesteps - 1)
        hi = int(torch.searchsorted(ls, torch.tensor(log_s, dtype=torch.float64)))
        lo = hi - 1
        return lo + (log_s - float(ls[lo])) / (float(ls[hi]) - float(ls[lo]))

    # -- forward process ------------------------------------------------------------------------
    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, eps: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x_t ~ q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I), eq. 4. x0: (B, C, H, W), t: (B,)"""
        if eps is None:
            eps = torch.randn_like(x0)
        return extract(self.sqrt_alpha_bar, t, x0.shape) * x0 + extract(self.sqrt_one_minus_alpha_bar, t, x0.shape) * eps

    def q_posterior(self, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Mean and variance of q(x_{t-1} | x_t, x_0), eq. 6-7."""
        mean = extract(self.posterior_mean_coef1, t, xt.shape) * x0 + extract(self.posterior_mean_coef2, t, xt.shape) * xt
        return mean, extract(self.posterior_variance, t, xt.shape)

    # -- the model's estimate: the one entry every sampler, the bound and the guide use --------------
    def denoise(self, xt: torch.Tensor, t, ab_t=None, model_fn: Optional[ModelFn] = None
                ) -> Tuple[torch.Tensor, torch.Tensor]:
        """The model's estimate of (x_0, eps) at x_t, in float32 (or xt's dtype): the network called as
        the objective wants, model_fn(x, t) (default: eps_model), and its output read as x_0 and eps.
        t: a timestep (integer or not) or a (B,) tensor of them; ab_t: alpha_bar_t, a float or a
        broadcastable tensor (default: of the integer timesteps t).
          eps objective: out = eps, x_0 = (x_t - sqrt(1 - alpha_bar) eps) / sqrt(alpha_bar), inverting eq. 4;
          v (Salimans & Ho 2022): out = v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x_0, so x_0 =
            sqrt(alpha_bar) x_t - sqrt(1 - alpha_bar) v and eps = sqrt(1 - alpha_bar) x_t + sqrt(alpha_bar) v,
            without dividing by sqrt(alpha_bar) (small at large t);
          edm (Karras et al. 2022, Table 1): out = F(c_in x; c_noise) at x = x_t / sqrt(alpha_bar), and
            x_0 = D = c_skip x + c_out F."""
        ab_t = extract(self.alpha_bar, t, xt.shape).to(xt.dtype) if ab_t is None else ab_t
        model_fn = model_fn or (lambda x, tt: self.eps_model(x, tt).float())
        if self.objective == "edm":
            c_skip, c_out, c_in, c_noise = edm_preconditioning(sqrt_of((1 - ab_t) / ab_t))
            x = xt / sqrt_of(ab_t)
            noise = c_noise.flatten() if isinstance(c_noise, torch.Tensor) else c_noise
            x0 = c_skip * x + c_out * model_fn(c_in * x, self._time_input(noise, xt)).to(xt.dtype)
            return x0, (xt - sqrt_of(ab_t) * x0) / sqrt_of(1 - ab_t)
        out = model_fn(xt, self._time_input(t, xt)).to(xt.dtype)
        if self.objective == "v":
            return sqrt_of(ab_t) * xt - sqrt_of(1 - ab_t) * out, sqrt_of(1 - ab_t) * xt + sqrt_of(ab_t) * out
        return (xt - sqrt_of(1 - ab_t) * out) / sqrt_of(ab_t), out

    @staticmethod
    def _time_input(t, x: torch.Tensor) -> torch.Tensor:
        """The network's time input for a batch: a (B,) tensor as given, or a number repeated (long for
        an integer timestep, float otherwise)."""
        if isinstance(t, torch.Tensor):
            return t.to(x.device).expand(x.shape[0]) if t.dim() == 0 else t.to(x.device)
        whole = isinstance(t, int)
        return torch.full((x.shape[0],), t, device=x.device, dtype=torch.long if whole else torch.float32)

    @staticmethod
    def ancestral_mean(xt, eps, ab_t, ab_s):
        """Mean of p(x_s | x_t) for s < t, eq. 11 on the respaced chain: with beta = 1 - alpha_bar_t /
        alpha_bar_s it is (x_t - beta / sqrt(1 - alpha_bar_t) eps) / sqrt(1 - beta); for s = t - 1,
        1/sqrt(alpha_t) (x_t - beta_t/sqrt(1-alpha_bar_t) eps). ab_t, ab_s: floats or broadcastable tensors."""
        beta = 1 - ab_t / ab_s
        return (xt - beta / sqrt_of(1 - ab_t) * eps) / sqrt_of(1 - beta)

    def schedule_at(self, t: torch.Tensor, shape: Sequence[int]) -> Tuple[torch.Tensor, torch.Tensor]:
        """(alpha_bar_t, alpha_bar_{t-1}) for a batch of timesteps t: (B,), shaped to broadcast on
        `shape`, in float64 (their ratio is 1 - beta_t, which float32 would round), except on MPS."""
        dtype = torch.float32 if t.device.type == "mps" else torch.float64
        view = (-1,) + (1,) * (len(shape) - 1)
        return tuple(a[t.cpu()].view(view).to(t.device, dtype) for a in (self.alpha_bar_f64, self.alpha_bar_prev_f64))

    def p_mean(self, xt: torch.Tensor, t: torch.Tensor, eps_theta: torch.Tensor) -> torch.Tensor:
        """Mean of p(x_{t-1} | x_t) for a batch of timesteps t: (B,)."""
        ab_t, ab_s = self.schedule_at(t, xt.shape)
        return self.ancestral_mean(xt, eps_theta, ab_t, ab_s).to(xt.dtype)

    def p_sample(self, xt: torch.Tensor, t: torch.Tensor, eps: Optional[torch.Tensor] = None) -> torch.Tensor:
        """One ancestral step x_t -> x_{t-1} (Algorithm 2), sigma_t^2 = beta_t; no noise where t == 0."""
        if eps is None:
            eps = torch.randn_like(xt)
        eps_theta = self.denoise(xt, t)[1]
        sigma = extract(self.p_sigma, t, xt.shape) * (t > 0).float().view(-1, *([1] * (xt.dim() - 1)))
        return self.p_mean(xt, t, eps_theta) + sigma * eps

    # -- loss -----------------------------------------------------------------------------------
    def forward(self, x0: torch.Tensor, t: Optional[torch.Tensor] = None, noise: Optional[torch.Tensor] = None,
                weight: Optional[torch.Tensor] = None, per_image: bool = False):
        """L_simple = E ||eps - eps_theta(x_t, t)||^2 (eq. 14), in float32. x0: (B, C, H, W) in [-1, 1].
        v objective: the target is v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x_0. edm objective, t the
        noise levels sigma (see training_noise_levels): EDM's loss (Karras et al. 2022, eq. 8 with Table 1),
        lambda(sigma) ||D(x_0 + sigma n; sigma) - x_0||^2 with D = c_skip x + c_out F(c_in x; c_noise) and
        lambda = 1 / c_out^2: the plain MSE of F to (x_0 - c_skip x) / c_out. weight: (B,), each image's
        weight in the mean (the trainer's loss weighting, e.g. Min-SNR); None: all equal.
        per_image: also each image's unweighted loss, (B,) (for the loss by noise level)."""
        if t is None:
            t = self.training_noise_levels(x0.shape[0], x0.device)
        if noise is None:
            noise = torch.randn_like(x0)
        x0, noise = x0.float(), noise.float()
        if self.objective == "edm":
            s = t.float().view(-1, *([1] * (x0.dim() - 1)))
            c_skip, c_out, c_in, c_noise = edm_preconditioning(s)
            x = x0 + s * noise
            out, target = self.eps_model(c_in * x, c_noise.flatten()).float(), (x0 - c_skip * x) / c_out
        else:
            out = self.eps_model(self.q_sample(x0, t, eps=noise), t).float()
            target = noise if self.objective == "eps" else (extract(self.sqrt_alpha_bar, t, x0.shape) * noise
                                                             - extract(self.sqrt_one_minus_alpha_bar, t, x0.shape) * x0)
        per = (out - target).pow(2).flatten(1).mean(1)
        loss = per.mean() if weight is None else (weight * per).mean()
        return (loss, per.detach()) if per_image else loss

    def noise_level(self, t: torch.Tensor) -> torch.Tensor:
        """sigma = sqrt((1 - alpha_bar) / alpha_bar) of what training_noise_levels drew: (B,) timesteps, or
        for the edm objective the sigmas themselves."""
        if self.objective == "edm":
            return t.float()
        ab = self.alpha_bar.gather(0, t)
        return ((1 - ab) / ab).sqrt()

    def training_noise_levels(self, n: int, device, generator: Optional[torch.Tensor] = None,
                              p_mean: float = -1.2, p_std: float = 1.2) -> torch.Tensor:
        """What the loss draws for each image: a timestep, uniform in 0..T-1 (Ho et al.); for the edm
        objective a noise level sigma, log-normal with ln sigma ~ N(p_mean, p_std^2) (Karras et al. 2022,
        Table 1; -1.2 and 1.2 for 64x64 images)."""
        if self.objective == "edm":
            u = torch.randn((n,), device=device, generator=generator)
            return torch.exp(p_mean + p_std * u)
        return torch.randint(0, self.timesteps, (n,), device=device, generator=generator)

    def loss_weights(self, t: torch.Tensor, kind: str = "none", gamma: float = 5.0) -> Optional[torch.Tensor]:
        """Each image's weight in the loss (forward's `weight`), (B,), or None for the plain mean (kind
        "none", and the edm objective, whose loss has its own weight). Min-SNR-gamma (Hang et al. 2023,
        kind "min-snr"): min(SNR, gamma) / SNR for eps, min(SNR, gamma) / (SNR + 1) for v, with SNR =
        alpha_bar_t / (1 - alpha_bar_t) for a batch of timesteps t: (B,)."""
        if kind == "none" or self.objective == "edm":
            return None
        ab = self.alpha_bar.gather(0, t)
        snr = ab / (1 - ab)
        return snr.clamp(max=gamma) / (snr if self.objective == "eps" else snr + 1)

    # -- sampling -------------------------------------------------------------------------------
    def grid(self, spec: SampleSpec, start: Optional[float] = None) -> List[float]:
        """The timesteps `spec` samples at, from T-1 (or from `start`, an edit's first timestep) down to
        0, on spec's grid (GRIDS; by default the sampler's): as many as spec's model calls allow (a
        sampler with two calls per step takes about half as many)."""
        calls, per = spec.steps_for(self.timesteps), spec.row.calls
        # a solver in sigma (Heun) oversteps from higher up at few calls: its grid starts at its row's level
        grid = GRIDS[spec.grid or spec.row.grid](self, calls if per == 1 else calls // per + 1, spec.row.start)
        return grid if start is None else [t for t in grid if t <= start]

    def euler_first(self, spec: SampleSpec) -> bool:
        """A sampler with two model calls per step asked for an even number of calls takes its first step
        with one (Euler's, at the highest noise level, where a step's error is smallest), so that
        --steps is what it makes."""
        return spec.row.calls == 2 and spec.steps_for(self.timesteps) % 2 == 0

    def calls(self, spec: SampleSpec, start: Optional[float] = None) -> int:
        """The model calls per image that sampling with `spec` makes (what --steps asks for, where the
        grid allows it): one per grid step, or for a sampler with two calls per step two for each step
        but the last into x_0, which takes one (and the first, see euler_first)."""
        n, per = len(self.grid(spec, start)), spec.row.calls
        return n if per == 1 or n == 1 else per * (n - 1) + 1 - self.euler_first(spec)

    def predict(self, x: torch.Tensor, t: float, spec: SampleSpec, model_fn: ModelFn) -> Tuple[torch.Tensor, torch.Tensor]:
        """(x_0, eps) of the model at (x, t), t an integer timestep or between two. With a Guidance as
        model_fn (autoguidance), x_0 = x_0 of the guide + w (x_0 of the model - x_0 of the guide), the
        guide evaluated at the same noise level. spec.clip clamps x_0 to [-1, 1] and uses the matching eps."""
        ab_t = self.ab(t)
        x0, eps = self.denoise(x, t, ab_t, model_fn)
        if isinstance(model_fn, Guidance) and model_fn.runs_guide:
            g = model_fn.guide
            tg = t if g.same_schedule(self) else g.t_of_sigma(math.sqrt((1 - ab_t) / ab_t))
            x0 = model_fn.combine(x0, g.denoise(x, tg, ab_t, model_fn.guide_net)[0])
            eps = (x - math.sqrt(ab_t) * x0) / math.sqrt(1 - ab_t)
        if spec.clip:
            x0 = x0.clamp(-1.0, 1.0)
            eps = (x - math.sqrt(ab_t) * x0) / math.sqrt(1 - ab_t)
        return x0, eps

    def same_schedule(self, other: "GaussianDiffusion") -> bool:
        return self.timesteps == other.timesteps and torch.equal(self.alpha_bar_f64, other.alpha_bar_f64)

    def step(self, x: torch.Tensor, t: int, s: int, spec: SampleSpec, model_fn: ModelFn,
             noise_fn: Callable[[], torch.Tensor], hist: dict) -> Tuple[torch.Tensor, torch.Tensor]:
        """One step of spec's sampler from timestep t down to s; s = -1 is the end (alpha_bar = 1),
        where every sampler's mean is the x_0 estimate. Returns (x_s, the x_0 estimate)."""
        if s < 0 and not (spec.row.churn and spec.churn > 0):  # churn adds noise at the last level too
            x0 = self.predict(x, t, spec, model_fn)[0]
            return x0, x0
        return spec.row.step(self, x, t, s, spec, model_fn, noise_fn, hist)

    @torch.no_grad()
    def sample(self, x: torch.Tensor, spec: SampleSpec = SampleSpec(),
               noise_fn: Optional[Callable[[], torch.Tensor]] = None, model_fn: Optional[ModelFn] = None,
               callback: Optional[Callable[[int, torch.Tensor, torch.Tensor], None]] = None,
               start: Optional[int] = None, known: Optional[torch.Tensor] = None,
               mask: Optional[torch.Tensor] = None, jumps: int = 1) -> torch.Tensor:
        """Denoise x = x_T: (B, C, H, W) to x_0 with spec.steps_for(T) model calls, with spec's sampler
        (SAMPLERS: ddpm, ddim, dpm++ ...).

        noise_fn() returns fresh N(0, I) noise shaped like x (default torch.randn_like).
        model_fn(x, t) returns the network's output in float32 (default self.eps_model).
        callback(i, x, x0_pred) is called after each step.
        spec.clip clamps each x_0 estimate to the data range [-1, 1] (and uses the matching eps); it
        keeps young, imperfect models from saturating.
        No noise is added at the last step, which returns the model's x_0 estimate.
        Editing: start = a grid timestep: x is x_start and only the grid from there down is run
        (SDEdit); known (B, C, H, W) in [-1, 1] with mask (B, 1, H, W), 1 = regenerate: inpainting
        (RePaint), with `jumps` resampling jumps per step (1 = none).
        """
        noise_fn = noise_fn or (lambda: torch.randn_like(x))
        grid = self.grid(spec, start)
        x, hist, x_s = x.float(), {}, None  # hist: what a multistep sampler keeps between steps
        for i, t in enumerate(grid):
            s = grid[i + 1] if i + 1 < len(grid) else -1
            for r in range(jumps if mask is not None and s >= 0 else 1):
                if r:  # RePaint's resampling jump: back up the chain, x_t ~ q(x_t | x_s)
                    x = q_at(x_s, noise_fn(), self.ab(t) / self.ab(s))
                x_s, x0 = self.step(x, t, s, spec, model_fn, noise_fn, hist)
                if mask is not None:  # RePaint (Lugmayr et al. 2022, eq. 8): the sampled pixels where mask = 1, the
                    # known image noised to timestep s by q(x_s | x_0) where mask = 0; at the end, the image itself
                    x_s = mask * x_s + (1 - mask) * (known if s < 0 else q_at(known, noise_fn(), self.ab(s)))
            x = x_s
            if callback is not None:
                callback(i, x, x0)
        return x

    @torch.no_grad()
    def invert(self, x: torch.Tensor, spec: SampleSpec, model_fn: Optional[ModelFn] = None) -> torch.Tensor:
        """Deterministic DDIM inversion (eta = 0) of images x: (B, C, H, W) in [-1, 1] to x_T: each DDIM
        step of spec's grid run backwards, x_t = sqrt(alpha_bar_t) x_0(x_s) + sqrt(1 - alpha_bar_t)
        eps(x_s), with the model evaluated at the lower timestep s (the usual approximation; exact as
        the steps get small). sample(x_T, spec with ddim, eta 0) reconstructs x."""
        grid = self.grid(replace(spec, sampler=INVERTIBLE, eta=0.0))
        x = x.float()
        for s, t in zip(grid[::-1][:-1], grid[::-1][1:]):  # s < t, from 0 up to T-1
            x0, eps = self.predict(x, s, spec, model_fn)
            x = q_at(x0, eps, self.ab(t))
        return x


# -- the samplers: one step function and one row each ------------------------------------------

def ddpm_step(d: GaussianDiffusion, x, t: int, s: int, spec: SampleSpec, model_fn: ModelFn, noise_fn, hist: dict):
    """Ancestral sampling (Ho et al. Alg. 2) on the respaced chain, sigma^2 as spec.variance says."""
    ab_t, ab_s = d.ab(t), d.ab(s)
    x0, eps = d.predict(x, t, spec, model_fn)
    return d.ancestral_mean(x, eps, ab_t, ab_s) + math.sqrt(ddpm_var(ab_t, ab_s, spec.variance)) * noise_fn(), x0


def ddim_step(d: GaussianDiffusion, x, t: int, s: int, spec: SampleSpec, model_fn: ModelFn, noise_fn, hist: dict):
    """DDIM (Song et al. 2020, eq. 12): eta = 0 is deterministic, eta = 1 has the ancestral step's noise."""
    ab_t, ab_s = d.ab(t), d.ab(s)
    x0, eps = d.predict(x, t, spec, model_fn)
    sigma = spec.eta * math.sqrt(ddpm_var(ab_t, ab_s, "small"))
    x = math.sqrt(ab_s) * x0 + math.sqrt(max(1 - ab_s - sigma ** 2, 0.0)) * eps
    return (x + sigma * noise_fn() if sigma > 0 else x), x0


def dpmpp_step(d: GaussianDiffusion, x, t: int, s: int, spec: SampleSpec, model_fn: ModelFn, noise_fn, hist: dict):
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2, data prediction) in lambda = log(alpha / sigma): second
    order from the previous step's x_0, which `hist` keeps ("x0", and its step size "h")."""
    ab_t, ab_s = d.ab(t), d.ab(s)
    x0, eps = d.predict(x, t, spec, model_fn)
    h = 0.5 * math.log(ab_s / (1 - ab_s)) - 0.5 * math.log(ab_t / (1 - ab_t))
    x0_prev, h_prev = hist.get("x0"), hist.get("h")
    D = x0 if x0_prev is None else (1 + h / (2 * h_prev)) * x0 - (h / (2 * h_prev)) * x0_prev  # 1/(2r), r = h_prev/h
    hist.update(x0=x0, h=h)
    return math.sqrt((1 - ab_s) / (1 - ab_t)) * x - math.sqrt(ab_s) * math.expm1(-h) * D, x0


def heun_step(d: GaussianDiffusion, x, t: float, s: float, spec: SampleSpec, model_fn: ModelFn, noise_fn, hist: dict):
    """EDM's second-order Heun step (Karras et al. 2022, Alg. 1; with spec.churn, Alg. 2 with S_tmin = 0,
    S_tmax = inf, S_noise = 1) from noise level sigma_t down to sigma_s, on x = x_t / sqrt(alpha_bar_t)
    = x_0 + sigma n, with the model as the denoiser D(x; sigma) = its x_0 estimate at x_t (the VP model
    seen from EDM: x_t = x / sqrt(1 + sigma^2)). Two model calls; the step into x_0 (s = -1) is
    Euler's (one call, D itself), as in Alg. 2, and so is the first where d.euler_first says so."""
    ab_t = d.ab(t)
    sig_t = math.sqrt((1 - ab_t) / ab_t)
    xe, t_hat, sig_hat = x / math.sqrt(ab_t), t, sig_t
    if spec.churn > 0:  # Alg. 2 lines 4-6: gamma = min(S_churn / N, sqrt(2) - 1), N the number of noise levels
        n = hist.setdefault("levels", len(d.grid(spec)))
        sig_hat = sig_t * (1 + min(spec.churn / n, math.sqrt(2) - 1))
        t_hat = d.t_of_sigma(sig_hat)
        sig_hat = math.sqrt((1 - d.ab(t_hat)) / d.ab(t_hat))  # the level t_hat stands for (clipped at T-1)
        xe = xe + math.sqrt(max(sig_hat ** 2 - sig_t ** 2, 0.0)) * noise_fn()
    x0 = d.predict(xe * math.sqrt(d.ab(t_hat)), t_hat, spec, model_fn)[0]
    if s < 0:
        return x0, x0
    euler = d.euler_first(spec) and not hist.get("stepped")
    hist["stepped"] = True
    ab_s = d.ab(s)
    sig_s = math.sqrt((1 - ab_s) / ab_s)
    slope = (xe - x0) / sig_hat
    xe_s = xe + (sig_s - sig_hat) * slope
    if not euler:
        x0_s = d.predict(xe_s * math.sqrt(ab_s), s, spec, model_fn)[0]
        xe_s = xe + (sig_s - sig_hat) * 0.5 * (slope + (xe_s - x0_s) / sig_s)
    return xe_s * math.sqrt(ab_s), x0


@dataclass(frozen=True)
class Sampler:
    """A row of SAMPLERS: the step function, its timestep grid (GRIDS), whether it draws noise at
    every step (then it has no deterministic path: inversion refuses it, interpolation takes DDIM
    instead), whether --eta or --churn applies, its default number of model calls (None: all T),
    its help, and its model calls per step (so that --steps counts calls)."""

    step: Callable[..., Tuple[torch.Tensor, torch.Tensor]]
    grid: str
    stochastic: bool
    eta: bool
    default_steps: Optional[int]
    help: str
    calls: int = 1
    churn: bool = False
    variance: bool = False  # whether --ddpm-variance (the ancestral step's sigma^2) applies
    start: Optional[float] = None  # a solver in sigma: on every grid, the highest noise level sigma it starts at


def karras_grid(d: GaussianDiffusion, n: int, top: Optional[float] = None) -> List[float]:
    """n timesteps (fractional) at the noise levels of Karras et al. (rho = 7) between the model's
    sigma at t = 0 and at T-1, the top capped where log-SNR is LAMBDA_FLOOR (as the log-SNR grid is)
    and at `top`: sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t), the timestep of a level
    interpolated in log sigma."""
    top = min(d.sigma(d.timesteps - 1), math.exp(-LAMBDA_FLOOR), top or math.inf)
    return [d.t_of_sigma(sg) for sg in karras_sigmas(d.sigma(0), top, n)]


def uniform_grid(d: GaussianDiffusion, n: int, top: Optional[float] = None) -> List[float]:
    """timestep_grid: n timesteps evenly spaced from T-1 down to 0; from the (fractional) timestep of
    noise level `top` where that is lower."""
    if top is None or top >= d.sigma(d.timesteps - 1):
        return timestep_grid(d.timesteps, n)
    return torch.linspace(d.t_of_sigma(top), 0, max(n, 1), dtype=torch.float64).tolist()


def logsnr_grid_of(d: GaussianDiffusion, n: int, top: Optional[float] = None) -> List[float]:
    """logsnr_grid: n timesteps evenly spaced in log-SNR; from noise level `top` where that is lower
    (fractional timesteps, evenly in lambda = -log sigma from there to t = 0)."""
    if top is None or top >= min(d.sigma(d.timesteps - 1), math.exp(-LAMBDA_FLOOR)):
        return logsnr_grid(d.alpha_bar_f64, n)
    lams = torch.linspace(-math.log(top), -math.log(d.sigma(0)), max(n, 1), dtype=torch.float64).tolist()
    return [d.t_of_sigma(math.exp(-lam)) for lam in lams]


# Heun's first level, EDM's sigma_max: from the top of the cosine schedule's Karras grid (sigma 245, log-SNR
# -5.5) its first steps overshoot at few calls: 19% of the pixels saturated at 10 calls on a lightly trained
# 16 px model, 11% from 80, where DPM-Solver++ leaves 4% (benchmarks/heun_start.py); 25 calls are sound from
# either start, and DPM-Solver++ keeps the grids' own start
HEUN_START = 80.0
# grid name -> (model, number of timesteps, the highest noise level to start at or None) -> timesteps
GRIDS: Dict[str, Callable[[GaussianDiffusion, int, Optional[float]], List[float]]] = {
    "uniform": uniform_grid,
    "logsnr": logsnr_grid_of,
    "karras": karras_grid,
}
SAMPLERS: Dict[str, Sampler] = {
    "ddpm": Sampler(ddpm_step, "uniform", True, False, None, "ancestral (Ho et al.; the original's 1000 steps)",
                    variance=True),
    "ddim": Sampler(ddim_step, "logsnr", False, True, 25, "DDIM (Song et al.; --eta for noise)"),
    "dpm++": Sampler(dpmpp_step, "logsnr", False, False, 25, "DPM-Solver++(2M) (Lu et al.)"),
    "heun": Sampler(heun_step, "karras", False, False, 25, "EDM's Heun, two model calls per step, from sigma 80 "
                    "(Karras et al.; --churn for noise; sound from about 14 calls, below that use dpm++)", calls=2,
                    churn=True, start=HEUN_START),
}


@dataclass
class Guidance:
    """Autoguidance (Karras et al. 2024): sampling with D = D_guide + w (D_model - D_guide), where the
    guide is a weaker model of the same data (an early checkpoint of the same run serves). Passed as
    the model_fn of sampling; called plainly it is the main network."""

    net: ModelFn                       # the main model's network
    guide: GaussianDiffusion
    guide_net: ModelFn
    weight: float

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.net(x, t)

    def combine(self, x0: torch.Tensor, x0_guide: torch.Tensor) -> torch.Tensor:
        """The guided denoiser's x_0 from the model's and the guide's at the same x_t (Karras et al. 2024,
        eq. 2): D_guide + w (D_model - D_guide)."""
        return x0_guide + self.weight * (x0 - x0_guide)

    @property
    def runs_guide(self) -> bool:
        """False at weight 1, where D = D_model exactly and the guide is not evaluated."""
        return self.weight != 1


INVERT_STEPS = 100  # DDIM inversion's error is first order in the step: 25 steps reconstruct to ~25 dB, 100 to ~38
INVERTIBLE = "ddim"  # the sampler whose deterministic path (eta 0) inversion runs backwards


def inversion_spec(spec: SampleSpec, steps: Optional[int]) -> SampleSpec:
    """The deterministic path of --invert and of --interpolate between images: DDIM, eta 0, with
    `steps` (typed --steps) or INVERT_STEPS."""
    return replace(spec, sampler=INVERTIBLE, eta=0.0, steps=steps or INVERT_STEPS)


def deterministic(spec: SampleSpec) -> SampleSpec:
    """spec, with a sampler that draws noise replaced by DDIM, and eta and churn 0: the path of
    interpolations."""
    return replace(spec, sampler=INVERTIBLE if spec.row.stochastic else spec.sampler, eta=0.0, churn=0.0)


def signal_left(cfg: ModelConfig) -> Optional[str]:
    """A warning where the schedule leaves signal at t = T (x_T is then not pure noise, and sampling
    from pure noise starts off the training distribution): the original's linear range at small T."""
    ab_T = float(torch.cumprod(1 - beta_schedule(cfg.beta_schedule, cfg.timesteps, cfg.beta_min, cfg.beta_max), 0)[-1])
    if ab_T <= 1e-3:
        return None
    return (f"--timesteps {cfg.timesteps} with this schedule leaves alpha_bar_T = {ab_T:.3g} of the signal at t = T; "
            f"scale --beta-max by 1000/T (--beta-max {min(0.999, cfg.beta_max * 1000 / cfg.timesteps):g}) or use "
            f"--beta-schedule cosine")


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------

# -- decoding image files -------------------------------------------------------------------------

SKIP_REASONS = {
    "not_image": "not an image file",
    "unreadable": "unreadable or not an image",
    "corrupt": "truncated or corrupt",
    "permission": "unreadable (permission)",
    "too_large": "over the decompression-bomb limit",
}


def _flatten_alpha(img, background: Tuple[int, int, int]):
    """Composite an image with transparency onto a solid background colour (RGB); others as they are."""
    from PIL import Image

    if img.mode in ("RGBA", "LA", "PA", "P") or (img.mode in ("RGB", "L") and "transparency" in img.info):
        img = img.convert("RGBA")
        base = Image.new("RGBA", img.size, tuple(background) + (255,))
        return Image.alpha_composite(base, img).convert("RGB")
    return img


def _decode_image(path: Path, img_size: int, mode: str, background: Tuple[int, int, int]):
    """Decode one file to a (C, size, size) uint8 tensor; returns (tensor or None, skip reason, upscaled)."""
    import numpy as np
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            # The limit is checked here, not with warnings.catch_warnings (process-wide state that the
            # decoding threads raced on); between 1x and 2x the limit PIL itself only warns.
            if Image.MAX_IMAGE_PIXELS and img.width * img.height > Image.MAX_IMAGE_PIXELS:
                return None, "too_large", False
            img.load()
            img = ImageOps.exif_transpose(img)
            if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
                # 16/32-bit grayscale and float (0 to 1): the full range to 8 bits (convert("L") would clip)
                arr = np.asarray(img, dtype=np.float64)
                top = 1.0 if img.mode == "F" else 65535.0 if img.mode != "I" else max(65535.0, float(arr.max()))
                img = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
            img = _flatten_alpha(img, background)
            img = img.convert(mode)  # CMYK, YCbCr, 1, P ... -> RGB or L
            upscaled = min(img.size) < img_size
            img = ImageOps.fit(img, (img_size, img_size), Image.BICUBIC)  # resize shorter side, centre-crop
    except Image.DecompressionBombError:
        return None, "too_large", False
    except PermissionError:
        return None, "permission", False
    except UnidentifiedImageError:
        return None, "unreadable", False
    except (OSError, SyntaxError, ValueError):  # PIL reports truncated data as OSError
        return None, "corrupt", False
    arr = np.asarray(img, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous(), "", upscaled  # (C, H, W)


def find_image_files(folders: Sequence, flag: str = "--data-folders") -> Tuple[List[Path], int]:
    """All files under the folders, recursively, sorted: (image files, count of other files).
    Sub-folders that are links are followed; one that leads back to a folder already read is not
    read again (no loops), and a file found twice (a folder given twice, or inside another one
    given, or linked) is read once, with a note."""
    images, others, files_seen, twice = [], 0, set(), 0
    for folder in map(Path, folders):
        if not folder.is_dir():
            raise DDPMError(f"data folder {folder} does not exist or is not a folder; check {flag}")
        found, mine, dirs_seen = 0, [], set()
        for root, subdirs, files in os.walk(folder, followlinks=True):
            st = os.stat(root)
            if (st.st_dev, st.st_ino) in dirs_seen:
                subdirs[:] = []
                continue
            dirs_seen.add((st.st_dev, st.st_ino))
            for name in files:
                p = Path(root) / name
                with contextlib.suppress(OSError):
                    fst = p.stat()
                    if not p.is_file():
                        continue
                    is_image = p.suffix.lower() in IMAGE_EXTENSIONS and not name.startswith("._")
                    found += is_image
                    if (fst.st_dev, fst.st_ino) in files_seen:
                        twice += 1
                        continue
                    files_seen.add((fst.st_dev, fst.st_ino))
                    if is_image:
                        mine.append(p)
                    else:
                        others += 1
        if not found:
            raise DDPMError(f"data folder {folder} holds no image files (.png .jpg .jpeg .webp .bmp .gif); "
                            f"check {flag}")
        images += sorted(mine)
    if twice:
        log(f"note: {twice} files were found twice ({flag} names a folder twice, one inside another, or a link); "
            f"each is read once")
    return images, others


def shared_images(folders: Sequence, others: Sequence, flag: str, other_flag: str) -> Tuple[int, int]:
    """(how many of the image files under `folders` are also under `others`, how many there are): the
    same file, by device and inode, so links and folders given twice count too."""
    def keys(fs, fl) -> set:
        out = set()
        for path in find_image_files(fs, fl)[0]:
            with contextlib.suppress(OSError):
                st = path.stat()
                out.add((st.st_dev, st.st_ino))
        return out
    mine = keys(folders, flag)
    return len(mine & keys(others, other_flag)), len(mine)


def load_images(folders: Sequence, img_size: int = 64, img_channels: int = 3,
                background: Tuple[int, int, int] = (255, 255, 255), workers: Optional[int] = None,
                quiet: bool = False, flag: str = "--data-folders") -> torch.Tensor:
    """Decode every image under `folders` into one (N, C, img_size, img_size) torch.uint8 tensor.

    Shorter side resized (antialiased) then centre-cropped; EXIF orientation applied; transparency
    composited onto `background`; 16-bit images scaled; files that cannot be decoded are skipped
    and counted. Prints one summary line.
    """
    if img_channels not in (1, 3):
        raise DDPMError(f"--img-channels must be 1 or 3, got {img_channels}")
    paths, others = find_image_files(folders, flag)
    mode = "L" if img_channels == 1 else "RGB"
    workers = workers or min(8, os.cpu_count() or 1)
    from PIL import Image

    # PIL's warning between 1x and 2x its pixel limit is silenced (_decode_image skips those files and
    # counts them); set here, in this thread only, because catch_warnings is not thread-safe
    with warnings.catch_warnings(), ThreadPoolExecutor(workers) as pool:  # PIL releases the GIL while decoding
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        results = list(pool.map(lambda p: _decode_image(p, img_size, mode, tuple(background)), paths))
    images = [r[0] for r in results if r[0] is not None]
    skipped = {k: others if k == "not_image" else sum(r[1] == k for r in results) for k in SKIP_REASONS}
    upscaled = sum(r[2] for r in results)
    names = ", ".join(str(f) for f in folders)
    if not images:
        raise DDPMError(f"no readable images in {names}; put .png/.jpg/.jpeg/.webp/.bmp/.gif files there "
                        f"or check {flag}")
    data = torch.stack(images)
    if not quiet:
        why = ", ".join(f"{n} {SKIP_REASONS[k]}" for k, n in skipped.items() if n)
        log(f"data: {len(images)} images from {names} ({img_size}x{img_size} {mode}, "
            f"{data.numel() / 2**20:.1f} MiB as uint8); skipped {sum(skipped.values())}"
            + (f" ({why})" if why else "")
            + (f"; warning: {upscaled} smaller than {img_size}px were upscaled" if upscaled else ""))
    return data


def load_image_files(paths: Sequence, img_size: int, img_channels: int, background: Tuple[int, int, int],
                     flag: str) -> torch.Tensor:
    """Named image files as (N, C, S, S) uint8, decoded exactly like training data (shorter side
    resized, centre-cropped, EXIF, transparency onto `background`); a file that is missing or cannot
    be decoded is a one-line error naming it and `flag`."""
    mode = "L" if img_channels == 1 else "RGB"
    out = []
    for path in map(Path, paths):
        if not path.is_file():
            raise DDPMError(f"{flag} {path} does not exist or is not a file")
        img, reason, _ = _decode_image(path, img_size, mode, tuple(background))
        if img is None:
            raise DDPMError(f"{flag} {path} cannot be used: {SKIP_REASONS[reason]}")
        out.append(img)
    return torch.stack(out)


def _oriented_size(path: Path, flag: str) -> Tuple[int, int]:
    """The (width, height) an image file has once its EXIF orientation is applied."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as img:
            return ImageOps.exif_transpose(img).size
    except (OSError, SyntaxError, ValueError):
        raise DDPMError(f"{flag} {path} cannot be used: {SKIP_REASONS['unreadable']}") from None


def load_masks(masks: Sequence, images: Sequence, img_size: int) -> torch.Tensor:
    """--mask files as (N, 1, S, S) uint8, decoded like their images, each checked against the image(s)
    it applies to (one mask for all, or one each): the same size (a mask of another size would be
    cropped differently and miss its region), black and white (red on white would read as all
    "keep"), and opaque (what a transparent pixel means is not defined). One line otherwise."""
    from PIL import Image
    import numpy as np

    for k, mpath in enumerate(map(Path, masks)):
        if not mpath.is_file():
            raise DDPMError(f"--mask {mpath} does not exist or is not a file")
        size = _oriented_size(mpath, "--mask")
        with Image.open(mpath) as m:
            if m.mode in ("RGBA", "LA", "PA", "P") or "transparency" in m.info:
                rgba = m.convert("RGBA")
                if rgba.getchannel("A").getextrema()[0] < 255:
                    raise DDPMError(f"--mask {mpath} has transparent pixels; use an opaque black-and-white image "
                                    f"(white = redraw, black = keep)")
            arr = np.asarray(m.convert("RGB"), dtype=np.int16)
        if int((arr.max(2) - arr.min(2)).max()) > 48:
            raise DDPMError(f"--mask {mpath} is in colour; use black and white (white = redraw, black = keep)")
        grey = float(((arr[:, :, 0] > 31) & (arr[:, :, 0] < 224)).mean())
        if grey > 0.01:
            log(f"note: {100 * grey:.0f}% of the pixels of --mask {mpath} are grey (neither black nor white); after "
                f"resizing to the model's size, those lighter than mid-grey are redrawn and the darker ones kept")
        for ipath in (images if len(masks) == 1 else [images[k]]):
            isize = _oriented_size(Path(ipath), "--init-images")
            if isize != size:
                raise DDPMError(f"--mask {mpath} is {size[0]}x{size[1]} but its image {ipath} is {isize[0]}x{isize[1]}; "
                                f"draw the mask at the image's size")
    return load_image_files(masks, img_size, 1, (0, 0, 0), "--mask")


# -- where the images come from -------------------------------------------------------------------

def split_holdout(data: torch.Tensor, fraction: float, seed: int) -> Tuple[torch.Tensor, torch.Tensor, dict]:
    """Deterministic held-out split of data: (N, ...): a permutation seeded by (seed, 7); its first
    round(fraction * N) images (at least 1 when fraction > 0) are held out, both parts keep file order.
    Returns (train, held, record); the record is stored in checkpoints under "holdout"."""
    n = len(data)
    k = max(1, int(math.floor(fraction * n + 0.5))) if fraction > 0 else 0
    if k >= n and k:
        raise DDPMError(f"--holdout {fraction:g} of {n} images leaves none to train on; use a smaller fraction")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(mix_seed(seed, 7)))
    held, kept = perm[:k].sort().values, perm[k:].sort().values
    return (data[kept] if k else data), data[held], {"fraction": float(fraction), "seed": int(seed), "n": k, "total": n}


MAX_DEMO_IMAGES = 1_000_000  # about 8 minutes of drawing on one core, 12 GB at 64x64


@dataclass(frozen=True)
class DataSource:
    """Where the training images come from: image folders, or (without folders) the built-in demo
    faces. Recorded in checkpoints, so --resume, --eval and --forward-steps find the data again."""

    folders: Tuple[str, ...] = ()
    demo_images: int = 0                              # > 0 and no folders: that many demo faces
    background: Tuple[int, int, int] = (255, 255, 255)
    flag: str = field(default="--data-folders", compare=False)  # the flag that named the folders, for errors

    images: Optional[torch.Tensor] = field(default=None, compare=False)  # given in memory (ddpm.train)

    def describe(self) -> str:
        if self.images is not None:
            return f"{len(self.images)} images given in memory"
        on = "" if tuple(self.background) == (255, 255, 255) else f" on background {tuple(self.background)}"
        return (" ".join(self.folders) if self.folders else f"{self.demo_images} built-in demo faces") + on

    def resolved(self) -> List[str]:
        return [str(Path(f).resolve()) for f in self.folders]

    def same_as(self, other: "DataSource") -> bool:
        if tuple(self.background) != tuple(other.background):
            return False
        if self.folders or other.folders:
            return self.resolved() == other.resolved()
        return self.demo_images == other.demo_images

    def load(self, cfg: "ModelConfig", quiet: bool = False) -> torch.Tensor:
        """(N, C, S, S) uint8 images at the model's size and channels."""
        if self.images is not None:
            shape = (cfg.img_channels, cfg.img_size, cfg.img_size)
            if self.images.dtype != torch.uint8 or self.images.dim() != 4 or tuple(self.images.shape[1:]) != shape:
                raise DDPMError(f"train(): data must be (N, {', '.join(map(str, shape))}) uint8 images, got "
                                f"{tuple(self.images.shape)} {self.images.dtype}")
            return self.images
        if self.folders:
            return load_images(self.folders, cfg.img_size, cfg.img_channels, self.background, quiet=quiet, flag=self.flag)
        if self.demo_images < 1:
            raise DDPMError("--train needs --data-folders DIR [DIR ...] (or --demo for the built-in faces)")
        need, free = 2 * self.demo_images * 3 * cfg.img_size ** 2, available_ram()
        if free is not None and need > free:
            raise DDPMError(f"--demo-images {self.demo_images:,} at {cfg.img_size}x{cfg.img_size} need about "
                            f"{need / 2**30:,.1f} GiB of memory, more than the {free / 2**30:,.1f} GiB free; use fewer")
        t0 = time.time()
        data = demo_faces(self.demo_images, cfg.img_size, seed=0)
        if cfg.img_channels == 1:
            data = (data.float() * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True).round().to(torch.uint8)
        if not quiet:
            log(f"data: {len(data)} built-in demo faces ({cfg.img_size}x{cfg.img_size}, made in {time.time() - t0:.1f} s)")
        return data

    def new_faces(self, cfg: "ModelConfig", count: int) -> torch.Tensor:
        """`count` demo faces past the ones this source trains on (face i depends on i alone, so they are
        new): held-out images for a demo run."""
        return replace(self, demo_images=self.demo_images + count).load(cfg, quiet=True)[self.demo_images:]

    def record(self, n_images: int) -> dict:
        return {"folders": list(self.folders), "resolved": self.resolved(), "demo_images": self.demo_images,
                "images": int(n_images), "background": list(self.background)}

    @classmethod
    def from_record(cls, rec: dict, background: Tuple[int, int, int] = (255, 255, 255)) -> "DataSource":
        """The source a checkpoint recorded, with its folders as absolute paths (independent of the
        working directory)."""
        return cls(tuple(rec.get("resolved") or rec.get("folders") or ()), int(rec.get("demo_images") or 0),
                   tuple(rec.get("background") or background))


DATA_COMMANDS = frozenset({"train", "sample", "eval"})  # the commands that read training images


def reads_data(flag: str) -> Callable:
    """`needs` of a data flag: training reads the data, evaluation and --forward-steps read it again."""
    return lambda args: None if args.train or args.eval or args.forward or not args.loadckpt else \
        f"{flag} names training images: it goes with --train, --eval or --forward-steps"


@declares(group="data", resume=RUN, commands=DATA_COMMANDS)
@dataclass(frozen=True)
class DataFlags:
    """The data flags: training's images, and for the commands that read images besides training
    (evaluation, --forward-steps) the data that overrides what the checkpoint recorded."""

    folders: Tuple[str, ...] = setting((), "--data-folders", "folders of training images, read recursively", kind=str,
                                       nargs="*", name="data_folders", needs=reads_data("--data-folders"))
    demo: bool = setting(False, "--demo", "train on built-in procedural anime faces with a CPU preset", switch="on",
                         needs=reads_data("--demo"))
    demo_images: int = setting(4096, "--demo-images", "how many demo faces to generate",
                               needs=lambda args: None if args.demo or args.resume else
                               "--demo-images goes with --demo (the built-in faces)",
                               **within(1, MAX_DEMO_IMAGES, f"from 1 to {MAX_DEMO_IMAGES:,}"))
    background: Tuple[int, int, int] = setting((255, 255, 255), "--background",
                                               "colour under transparent pixels (name, #rrggbb)", kind=parse_colour,
                                               text="white", commands=EVERY - {"info", "export"})
    eval_folders: Tuple[str, ...] = setting(
        (), "--eval-folders", "held-out images (nll, nearest) or FID reference (default: the checkpoint's training "
        "data)", "evaluation", kind=str, nargs="+", metavar="DIR", commands={"train", "eval"},
        needs=lambda args: None if args.eval or args.eval_every or args.resume else
        "--eval-folders names held-out images: it goes with --eval, or --train with --eval-every N")


# -- batches --------------------------------------------------------------------------------------

def to_model_range(x: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1]."""
    return x.float().div_(127.5).sub_(1.0)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """float [-1, 1] -> uint8 [0, 255], rounded."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round_().to(torch.uint8)


class Batches:
    """The training set as one uint8 tensor, and the order in which training reads it.

    The data stays in ordinary CPU memory until `place` puts it on the GPU (the trainer decides,
    once the model and optimizer are allocated); when it stays on the CPU, each batch is gathered
    into a reused pinned buffer and copied asynchronously. The order of each epoch and the flips
    follow from (seed, epoch) alone, so a resumed run sees the same batches. Each step takes the
    global batch `perm[k*B:(k+1)*B]`; process r keeps its contiguous share, so N processes see
    together what one process would.
    """

    def __init__(self, data: torch.Tensor, device: torch.device, seed: int):
        self.n = data.shape[0]
        self.seed = seed
        self.device = device
        self.data = data
        self.on_device = data.device == device
        self.stager = PinnedStager(device)
        self._epoch, self._perm, self._flip = None, None, None

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()

    def place(self, on_device: bool) -> None:
        """Keep the data on the training device (True) or in CPU memory (False)."""
        self.data = self.data.to(self.device if on_device else "cpu")
        self.on_device = on_device
        self._epoch = None

    def epoch_order(self, epoch: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """(perm where the data lives, flips on the device) of `epoch`."""
        if self._epoch != epoch:
            g = torch.Generator().manual_seed(mix_seed(self.seed, epoch, 1))
            # drawn on the CPU (the same order on every device), moved once per epoch
            self._perm = torch.randperm(self.n, generator=g).to(self.data.device)
            self._flip = (torch.rand(self.n, generator=g) < 0.5).to(self.device)
            self._epoch = epoch
        return self._perm, self._flip

    def get(self, epoch: int, start: int, count: int) -> torch.Tensor:
        """Images perm[start:start+count] of `epoch`, as float in [-1, 1] on the device, randomly flipped."""
        perm, flip = self.epoch_order(epoch)
        idx, fl = perm[start:start + count], flip[start:start + count]
        if self.on_device:
            x = self.data[idx]  # (count, C, H, W) uint8, gathered where the data lives
        else:  # gathered on the CPU straight into pinned memory, copied without waiting
            x = self.stager.stage(lambda out: torch.index_select(self.data, 0, idx, out=out),
                                  (count, *self.data.shape[1:]), self.data.dtype)
        x = torch.where(fl.view(-1, 1, 1, 1), x.flip(3), x)
        return to_model_range(x)


# ----------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------

# -- reading and finding checkpoints --------------------------------------------------------------

def save_checkpoint(path: Path, state: dict) -> None:
    """Atomically torch.save a checkpoint dict (see atomic_write)."""
    atomic_write(Path(path), lambda f: torch.save(state, f))


def save_or_explain(path: Path, state: dict, aborted: bool = False) -> None:
    """save_checkpoint during training; a write that fails (a full disk) is one line saying that the
    files already there are kept and how to go on. aborted: a second Ctrl-C came (torch.save reports
    it as a failed write), which stays an abort."""
    try:
        save_checkpoint(path, state)
    except (OSError, RuntimeError) as e:
        if aborted:
            raise KeyboardInterrupt from None
        raise DDPMError(f"could not write {path} ({first_line(e)}); the files already in {path.parent} are kept; "
                        f"free some disk space and continue with --resume") from None


def read_checkpoint(path) -> dict:
    """Load a .pth checkpoint as data only (weights_only=True), or a .safetensors export.

    Pickled code is refused without running it; unreadable files get a one-line DDPMError.
    """
    import pickle

    path = Path(path)
    if not path.is_file():
        if path.exists():
            raise DDPMError(f"checkpoint {path} is not a regular file; name a checkpoint file or its folder")
        raise DDPMError(f"checkpoint {path} does not exist; check the path")
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as e:
        raise DDPMError(f"checkpoint {path} cannot be read ({e.strerror or e}); check its permissions") from None
    if path.suffix == ".safetensors" or (len(head) >= 9 and head[8:9] == b"{"):
        return _read_safetensors(path)
    if not (head.startswith(b"PK\x03\x04") or head.startswith(b"\x80")):  # torch.save's zip, or a legacy pickle
        raise DDPMError(f"{path}: not a PyTorch checkpoint (the file starts like {_file_kind(head)}); name a "
                        f"checkpoint written by ddpm.py or torch.save")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError,
            AttributeError) as e:
        if isinstance(e, pickle.UnpicklingError) and re.search(r"weights[ _]only", str(e), re.I):
            raise DDPMError(f"{path}: refused: the file holds Python objects besides tensors (possibly code), "
                            f"which are never run; re-save it as a plain state_dict from a trusted source") from None
        raise DDPMError(f"{path}: not a readable checkpoint ({first_line(e)}); the file may be truncated or "
                        f"corrupt") from None
    if not isinstance(ckpt, dict):
        raise DDPMError(f"{path}: holds a {type(ckpt).__name__}, not a checkpoint dict")
    return ckpt


def _file_kind(head: bytes) -> str:
    """A few words on what a file's first bytes look like, for error messages."""
    for magic, kind in ((b"\x89PNG", "a PNG image"), (b"\xff\xd8", "a JPEG image"), (b"GIF8", "a GIF image"),
                        (b"RIFF", "a RIFF file (WebP, WAV)"), (b"%PDF", "a PDF"), (b"\x1f\x8b", "a gzip archive")):
        if head.startswith(magic):
            return kind
    if not head:
        return "an empty file"
    if all(32 <= b < 127 or b in (9, 10, 13) for b in head):
        return "text"
    return "unknown binary data"


def _read_safetensors(path: Path) -> dict:
    try:
        from safetensors import safe_open
    except ImportError:
        raise DDPMError(f"{path} is a safetensors file; run `pip install safetensors` to read it") from None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            weights = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # the library raises its own error types for bad headers
        raise DDPMError(f"{path}: not a readable safetensors file ({first_line(e, 120)})") from None
    if meta.get("format") != FORMAT or "config" not in meta:
        raise DDPMError(f"{path}: safetensors file without a ddpm.py config in its metadata")
    try:
        config = json.loads(meta["config"])
        version, step = int(meta.get("version", FORMAT_VERSION)), int(meta.get("step", 0))
    except ValueError as e:
        raise DDPMError(f"{path}: the metadata is damaged ({str(e)[:80]}); export the checkpoint again") from None
    if version > FORMAT_VERSION:
        raise DDPMError(f"{path}: written by a newer ddpm.py (format {version}, this one reads up to "
                        f"{FORMAT_VERSION}); update ddpm.py")
    return {"format": FORMAT, "version": version, "config": config, "model": weights, "ema": None,
            "step": step, "exported": meta.get("weights", "ema")}


def is_legacy_state_dict(ckpt: dict) -> bool:
    """A bare state_dict of the original script's GaussianDiffusion (no config inside)."""
    return bool(ckpt) and "format" not in ckpt and all(
        isinstance(k, str) and k.startswith("eps_model.") and isinstance(v, torch.Tensor) for k, v in ckpt.items())


def peek_checkpoint(path: Path) -> dict:
    """A checkpoint read memory-mapped (cheap: the tensors are not read), or {} where the file is not a
    readable ddpm.py checkpoint (or not a regular file: a FIFO or a device would block the read)."""
    if not Path(path).is_file():
        return {}
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return {}
    return ckpt if isinstance(ckpt, dict) and not is_legacy_state_dict(ckpt) else {}


def checkpoint_meta(path: Path) -> Tuple[int, Optional[str]]:
    """(step, run id) recorded in a checkpoint (peek_checkpoint); (-1, None) where there is none.
    Checkpoints from before run ids are told apart by their seed."""
    ckpt = peek_checkpoint(path) or {}
    step = ckpt.get("step", -1)
    return (step, run_id_of(ckpt)) if is_count(step) else (-1, None)


def run_id_of(ckpt: dict) -> Optional[str]:
    """The run a checkpoint belongs to: its run_id, or for older files the seed they were trained with."""
    if isinstance(ckpt.get("run_id"), str) and ckpt["run_id"]:
        return ckpt["run_id"]
    return f"seed-{ckpt['seed']}" if isinstance(ckpt.get("seed"), int) else None


def checkpoint_files(folder: Path) -> List[Path]:
    """The rotating checkpoints ckpt-*.pth of a folder that are regular files (a FIFO or a folder of
    that name is never opened)."""
    return [p for p in sorted(Path(folder).glob(CKPT_PATTERN)) if p.is_file()]


def newest_checkpoint(folder: Path) -> Optional[Path]:
    """The checkpoint in `folder` with the highest recorded step, within one run: where a folder
    holds several runs (copied in, or written before run ids), the run of the newest file."""
    found = []
    for p in checkpoint_files(folder):
        step, run = checkpoint_meta(p)
        with contextlib.suppress(OSError):
            found.append((p, step, run, p.stat().st_mtime))
    if not found:
        return None
    runs = {r for _, st, r, _ in found if st >= 0}
    if len(runs) > 1:
        run = max((f for f in found if f[1] >= 0), key=lambda f: f[3])[2]
        warn_once(f"{folder} holds checkpoints of {len(runs)} runs; using run {run} (the newest file)")
        found = [f for f in found if f[2] == run]
    return max(found, key=lambda f: f[1])[0]


def resolve_checkpoint(path) -> Path:
    """A checkpoint file, or a folder meaning its newest checkpoint by step."""
    path = Path(path)
    if path.is_dir():
        found = newest_checkpoint(path)
        if found is None:
            raise DDPMError(f"no {CKPT_PATTERN} checkpoint in {path}; train first or name a file")
        return found
    return path


# -- validating what a checkpoint holds -----------------------------------------------------------

def config_from_checkpoint(ckpt: dict, path: Path, explicit: Dict[str, object], fallback: ModelConfig) -> ModelConfig:
    """The model config of a checkpoint. `explicit` holds the model flags the user typed: they must
    agree with a self-describing checkpoint; for a legacy file they (and the defaults) define it."""
    if is_legacy_state_dict(ckpt):
        cfg = ModelConfig.from_dict({**fallback.to_dict(), **OLD_CHECKPOINT_DEFAULTS, **explicit, "legacy_attention": True})
        log(f"note: {path} is a checkpoint of the original script (a bare state_dict without config); "
            f"using the model flags and the original's cross-batch attention (legacy mode)")
        return cfg.validate()
    if ckpt.get("format") != FORMAT or "config" not in ckpt or "model" not in ckpt:
        raise DDPMError(f"{path}: not a ddpm.py checkpoint (no config/model inside)")
    if not isinstance(ckpt["model"], dict) or not all(isinstance(v, torch.Tensor) for v in ckpt["model"].values()):
        raise DDPMError(f"{path}: the checkpoint's weights are not a dict of tensors; the file was edited or is damaged")
    if int(ckpt.get("version", 1)) > FORMAT_VERSION:
        raise DDPMError(f"{path}: written by a newer ddpm.py (format {ckpt.get('version')}, this one reads up to "
                        f"{FORMAT_VERSION}); update ddpm.py")
    try:
        if not isinstance(ckpt["config"], dict):
            raise DDPMError(f"it is a {type(ckpt['config']).__name__}, not a dict")
        cfg = ModelConfig.from_dict(ckpt["config"]).validate()
    except (DDPMError, TypeError, ValueError) as e:
        raise DDPMError(f"{path}: the stored model config is invalid ({e}); the file was edited or is damaged") from None
    diff = [f"{k} (checkpoint {getattr(cfg, k)!r}, flag {v!r})" for k, v in explicit.items()
            if k in MODEL_FLAGS and as_tuple(getattr(cfg, k)) != as_tuple(v)]
    if diff:
        raise DDPMError(f"{path}: checkpoint config disagrees with the model flags: {'; '.join(diff)}; "
                        f"drop those flags (the checkpoint knows its model) or use another checkpoint")
    return cfg


def is_count(v, lo: int = 0) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= lo


def check_run_state(ckpt: dict, path: Path, cfg: ModelConfig, resume: bool) -> None:
    """The training state a fine-tune (counters, EMA) or a resume (all of it) takes from a checkpoint,
    checked before any work as the model config is: one line naming the file and the field."""
    def bad(field: str, why: str) -> DDPMError:
        return DDPMError(f"{path}: the stored {field} {why}; the file was edited or is damaged")
    for name in ("step", "epoch", "images_seen") + (("epoch_step", "end_epoch") if resume else ()):
        if (name in ckpt or resume) and not is_count(ckpt.get(name)):
            raise bad(name, f"must be an integer of 0 or more, got {ckpt.get(name)!r}")
    if resume and not is_count(ckpt.get("seed"), lo=-(2 ** 63)):
        raise bad("seed", f"must be an integer, got {ckpt.get('seed')!r}")
    with torch.device("meta"):
        own = build_diffusion(cfg).state_dict()
    stored = ckpt.get("posthoc") or {}
    if not isinstance(stored, dict) or (stored and not (
            isinstance(stored.get("widths"), list) and isinstance(stored.get("ema"), list)
            and len(stored["widths"]) == len(stored["ema"]))):
        raise bad("post-hoc EMA", "is not a record of widths and their averages")
    for name, avg in [("EMA", ckpt.get("ema"))] + [("post-hoc EMA", a) for a in stored.get("ema", [])]:
        if avg is not None:
            if not isinstance(avg, dict) or not all(isinstance(v, torch.Tensor) for v in avg.values()):
                raise bad(f"{name} weights", "are not a dict of tensors")
            check_weights(own, avg, path, f"the stored {name} does not fit the model: the file was edited or is damaged")
            check_finite(avg, path)
    if not resume:
        return
    ll = ckpt.get("last_loss")
    if ll is not None and not (isinstance(ll, (int, float)) and math.isfinite(ll)):
        raise bad("last loss", f"must be a finite number, got {ll!r}")
    if ckpt.get("train") is not None and not isinstance(ckpt["train"], dict):
        raise bad("training settings", "are not a dict")
    _check_optimizer(ckpt.get("optimizer"), [tuple(v.shape) for v in own.values()], bad)
    _check_rng(ckpt.get("rng"), bad)
    _check_data_record(ckpt.get("data"), ckpt.get("holdout"), bad)
    if ckpt.get("scaler") is not None and not isinstance(ckpt["scaler"], dict):
        raise bad("GradScaler state", "is not a dict")


def _check_optimizer(opt, shapes: List[tuple], bad) -> None:
    """Adam's state_dict: one group over the model's parameters in order, moments of their shapes."""
    if not isinstance(opt, dict) or not isinstance(opt.get("state"), dict) or not isinstance(opt.get("param_groups"), list):
        raise bad("optimizer state", "is not an optimizer state_dict")
    params = [i for g in opt["param_groups"] if isinstance(g, dict) for i in (g.get("params") or [])]
    if len(opt["param_groups"]) != 1 or params != list(range(len(shapes))):
        raise bad("optimizer state", f"covers {len(params)} parameters in {len(opt['param_groups'])} groups, the model "
                  f"has {len(shapes)} in one")
    for i, st in opt["state"].items():
        if not (is_count(i) and i < len(shapes) and isinstance(st, dict)):
            raise bad("optimizer state", f"has an entry for parameter {i!r}")
        for k in ("exp_avg", "exp_avg_sq"):
            v = st.get(k)
            if not isinstance(v, torch.Tensor) or tuple(v.shape) != shapes[i] or not torch.isfinite(v).all():
                raise bad("optimizer state", f"holds a {k} for parameter {i} that is not a finite tensor of shape "
                          f"{shapes[i]}")


def _check_rng(rng, bad) -> None:
    """The generator states: the noise generator's, and per process the CPU (and CUDA) ones."""
    if not isinstance(rng, dict):
        raise bad("RNG state", "is missing")
    cpu = torch.get_rng_state()
    states = [rng.get("noise")] if rng.get("noise") is not None else []
    torch_states = rng.get("torch")
    if not isinstance(torch_states, list) or not torch_states:
        raise bad("RNG state", "has no CPU generator states")
    for st in states + torch_states:
        if not isinstance(st, torch.Tensor) or st.dtype != torch.uint8 or st.dim() != 1:
            raise bad("RNG state", "holds a generator state that is not a byte tensor")
    for st in torch_states:
        if st.numel() != cpu.numel():
            raise bad("RNG state", f"holds a CPU generator state of {st.numel()} bytes, not {cpu.numel()}")
    if not all(c is None or isinstance(c, torch.Tensor) for c in rng.get("cuda") or []):
        raise bad("RNG state", "holds a CUDA generator state that is not a tensor")


def _check_data_record(data, holdout, bad) -> None:
    """Where the run's images came from (DataSource.record) and its held-out split."""
    if data is not None:
        if not isinstance(data, dict):
            raise bad("data record", "is not a dict")
        for k in ("folders", "resolved", "eval_folders"):
            if not isinstance(data.get(k, []), list) or not all(isinstance(f, str) for f in data.get(k, [])):
                raise bad("data record", f"has {k} that are not a list of paths")
        n = data.get("demo_images") or 0
        if not is_count(n) or n > MAX_DEMO_IMAGES:
            raise bad("data record", f"asks for {n!r} demo images (at most {MAX_DEMO_IMAGES:,})")
        if not is_count(data.get("images", 0)):
            raise bad("data record", f"has an image count of {data.get('images')!r}")
        bg = data.get("background", [255, 255, 255])
        if not (isinstance(bg, list) and len(bg) == 3 and all(is_count(c) and c <= 255 for c in bg)):
            raise bad("data record", f"has a background colour of {bg!r}")
    if holdout is not None:
        if not isinstance(holdout, dict):
            raise bad("holdout record", "is not a dict")
        f = holdout.get("fraction", 0.0)
        if not (isinstance(f, (int, float)) and 0 <= f < 1 and is_count(holdout.get("seed", 0), lo=-(2 ** 63))
                and is_count(holdout.get("n", 0)) and is_count(holdout.get("total", 0))):
            raise bad("holdout record", f"is not a valid split ({holdout!r:.80})")


def as_tuple(v):
    return tuple(v) if isinstance(v, (list, tuple)) else v


# -- post-hoc EMA: any length rebuilt from the snapshots of EDM2's power-function profiles -------

POSTHOC_WIDTHS = (0.05, 0.10)  # the relative widths sigma_rel of the two profiles --posthoc-ema tracks
POSTHOC_DIR = "posthoc"        # their snapshots, ckpt/posthoc/phema-STEP.pth
POSTHOC_FIT = 0.05             # the largest relative L2 error of a rebuilt profile (--ema-length refuses beyond)


def power_gamma(sigma_rel: float) -> float:
    """The exponent gamma of EDM2's power-function EMA profile of relative width sigma_rel (Karras et al.
    2024, Sec. 3 and Appendix C): the average weighs theta(tau) by tau^gamma over [0, t], whose standard
    deviation over t is sigma_rel = sqrt(gamma + 1) / ((gamma + 2) sqrt(gamma + 3)), decreasing in gamma;
    solved by bisection."""
    def width(g: float) -> float:
        return math.sqrt(g + 1) / ((g + 2) * math.sqrt(g + 3))
    widest = (math.sqrt(5) - 3) / 2  # where width is largest, 0.30: the narrower profiles lie above it
    if not 0 < sigma_rel < width(widest):
        raise DDPMError(f"--ema-length must be in (0, {width(widest):.3f}), got {sigma_rel}")
    lo, hi = widest, 1e7
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if width(mid) > sigma_rel else (lo, mid)
    return (lo + hi) / 2


def profile_dot(t1: float, g1: float, t2: float, g2: float) -> float:
    """The L2 inner product over tau of two power-function profiles p(tau) = (g + 1) tau^g / t^(g + 1)
    on [0, t] (EDM2's p_dot_p), in log space so that large exponents do not overflow."""
    m = min(t1, t2)
    return math.exp(math.log(g1 + 1) + math.log(g2 + 1) - (g1 + 1) * math.log(t1) - (g2 + 1) * math.log(t2)
                    + (g1 + g2 + 1) * math.log(m) - math.log(g1 + g2 + 1))


def posthoc_fit(sources: Sequence[Tuple[float, float]], target: Tuple[float, float]) -> Tuple[List[float], float]:
    """The coefficients x of the average of snapshots (t_i, gamma_i) closest in L2 to the profile
    `target` (t, gamma) (EDM2's solve_posthoc_coefficients: the normal equations A x = b of the profiles'
    inner products), and the fit's relative error ||sum_i x_i p_i - p|| / ||p||. Times in steps."""
    scale = target[0]  # times relative to the target's: the same solution, no overflow
    src = [(t / scale, g) for t, g in sources]
    tgt = (1.0, target[1])
    A = torch.tensor([[profile_dot(*a, *b) for b in src] for a in src], dtype=torch.float64)
    b = torch.tensor([profile_dot(*a, *tgt) for a in src], dtype=torch.float64)
    x = torch.linalg.lstsq(A, b[:, None], rcond=1e-12).solution[:, 0]
    pp = profile_dot(*tgt, *tgt)
    err2 = max(pp - 2 * float(x @ b) + float(x @ A @ x), 0.0)
    return x.tolist(), math.sqrt(err2 / pp)


def posthoc_snapshots(folder: Path, run: Optional[str], step: int) -> List[Tuple[Path, int, List[float]]]:
    """The snapshots (path, step, widths) of run `run` in folder/posthoc/ up to `step`, by step."""
    out = []
    for path in sorted((Path(folder) / POSTHOC_DIR).glob("phema-*.pth")):
        meta = peek_checkpoint(path)
        s, widths = meta.get("step"), meta.get("widths")
        if meta.get("kind") == "posthoc-ema" and run_id_of(meta) == run and is_count(s, lo=1) and s <= step \
                and isinstance(widths, list) and all(isinstance(w, float) for w in widths):
            out.append((path, s, widths))
    return out


def posthoc_state(path: Path, ckpt: dict, sigma_rel: float) -> Tuple[dict, str]:
    """--ema-length: the EMA weights of relative width sigma_rel at the checkpoint's step, rebuilt by
    least squares from the run's post-hoc snapshots (posthoc_fit), with what it is for the start-up
    line. One line where there are none, or the fit is off by more than POSTHOC_FIT (the width is
    outside what the snapshots can rebuild; the line says which widths they can)."""
    step, run = ckpt.get("step"), run_id_of(ckpt)
    snaps = posthoc_snapshots(path.parent, run, step if is_count(step) else 0)
    if not snaps:
        raise DDPMError(f"--ema-length: {path.parent / POSTHOC_DIR} holds no post-hoc snapshots of this run up to step "
                        f"{step}; train with --posthoc-ema to keep them")
    sources = [(s, power_gamma(w)) for _, s, widths in snaps for w in widths]

    def fit(width: float) -> Tuple[List[float], float]:
        return posthoc_fit(sources, (float(step), power_gamma(width)))
    x, err = fit(sigma_rel)
    if err > POSTHOC_FIT:
        ok = [w for w in (0.01 * k for k in range(1, 29)) if fit(w)[1] <= POSTHOC_FIT]
        can = f"{min(ok):.2f} to {max(ok):.2f}" if ok else "none"
        raise DDPMError(f"--ema-length {sigma_rel:g}: the {len(snaps)} post-hoc snapshots of this run up to step {step} "
                        f"rebuild it only to {100 * err:.0f}% (widths they rebuild within {100 * POSTHOC_FIT:.0f}%: "
                        f"{can}); choose one of those")
    state: Dict[str, torch.Tensor] = {}
    k = 0
    for snap_path, _, widths in snaps:
        for avg in read_checkpoint(snap_path)["ema"][:len(widths)]:
            for name, v in avg.items():
                state[name] = state.get(name, 0) + x[k] * v.double()
            k += 1
    return ({n: v.float() for n, v in state.items()},
            f"post-hoc EMA of relative width {sigma_rel:g} at step {step}, from {len(snaps)} snapshot{'s' * (len(snaps) != 1)} "
            f"(fit within {100 * err:.1f}%)")


# -- building and loading models ------------------------------------------------------------------

@dataclass(frozen=True)
class ModelSource:
    """Where a loaded model's weights came from."""

    path: str
    ema: bool                      # the EMA weights (or an export of them)
    step: Optional[int]            # None for the original script's files
    posthoc: str = ""              # --ema-length: what the rebuilt post-hoc EMA is

    def describe(self) -> str:
        return (f"{self.path} (step {self.step if self.step is not None else 'unknown'}, "
                f"{self.posthoc or ('EMA' if self.ema else 'raw') + ' weights'})")


def build_diffusion(cfg: ModelConfig, source: Optional[ModelSource] = None, dropout: float = 0.0) -> GaussianDiffusion:
    """The model `cfg` describes (dropout: a training setting; sampling runs in eval mode)."""
    return GaussianDiffusion(UNet.from_config(cfg, dropout), cfg.timesteps, cfg.beta_min, cfg.beta_max, config=cfg,
                             source=source)


def load_weights(module: nn.Module, state: dict, path: Path, fix: str) -> None:
    """load_state_dict with a one-line error that names the file, the first mismatch and `fix`."""
    check_weights(module.state_dict(), state, path, fix)
    module.load_state_dict(state)


def check_weights(own: dict, state: dict, path: Path, fix: str) -> None:
    """One line naming the first key or shape where `state` does not fit a model's state_dict `own`."""
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or shapes:
        what = (f"shape of {shapes[0]}: file {tuple(state[shapes[0]].shape)} vs model {tuple(own[shapes[0]].shape)}"
                if shapes else f"{len(missing)} missing keys (e.g. {missing[:1]}), {len(unexpected)} unexpected "
                f"(e.g. {unexpected[:1]})")
        raise DDPMError(f"{path}: weights do not fit the model ({what}); {fix}")


def weights_fix(ckpt: dict) -> str:
    """What to do when a checkpoint's weights do not fit the model its config describes."""
    if is_legacy_state_dict(ckpt):
        return "give the model flags it was trained with"
    return "the stored config does not match the weights: the file was edited or is damaged"


def check_finite(state: dict, path: Path) -> None:
    """Refuse weights holding NaN or infinity (a diverged run), with one line."""
    bad = next((k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
    if bad is not None:
        raise DDPMError(f"{path}: the weights hold NaN or infinite values ({bad}): the run diverged; use an "
                        f"earlier checkpoint, or train again with a lower --lr")


def load_model(path, device="cpu", use_ema: bool = True, _ckpt: Optional[dict] = None,
               ema_length: Optional[float] = None, **overrides) -> GaussianDiffusion:
    """A GaussianDiffusion in eval mode, built from a checkpoint alone (EMA weights when present; with
    ema_length, the post-hoc EMA of that relative width rebuilt from the run's snapshots).

    `overrides` are model config values (e.g. num_channels=64); for a self-describing checkpoint
    they must agree with it, for a file of the original script they describe its model.
    `_ckpt` is the checkpoint already read from `path`, if the caller has it.
    """
    path = resolve_checkpoint(path)
    ckpt = _ckpt if _ckpt is not None else read_checkpoint(path)
    cfg = config_from_checkpoint(ckpt, path, overrides, ModelConfig())
    legacy = is_legacy_state_dict(ckpt)
    ema = not legacy and use_ema and ckpt.get("ema") is not None
    state = ckpt if legacy else ckpt["ema"] if ema else ckpt["model"]
    posthoc = ""
    if ema_length is not None:
        state, posthoc = posthoc_state(path, ckpt, ema_length)
    source = ModelSource(str(path), ema or ckpt.get("exported") == "ema",  # an export holds one set: say which
                         None if legacy else ckpt.get("step"), posthoc)
    model = build_diffusion(cfg, source)
    load_weights(model, state, path, weights_fix(ckpt))
    check_finite(state, path)
    return model.to(device).eval()


def export_safetensors(model: GaussianDiffusion, cfg: ModelConfig, out: Path, weights: str, step: int) -> None:
    """Write the model weights as safetensors with the config as JSON metadata."""
    try:
        from safetensors.torch import save as st_save
    except ImportError:
        raise DDPMError("--export needs the safetensors package; run `pip install safetensors`") from None
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {"format": FORMAT, "version": str(FORMAT_VERSION), "config": json.dumps(cfg.to_dict()),
            "weights": weights, "step": str(step)}
    write_output(Path(out), st_save(state, metadata=meta))


# ----------------------------------------------------------------------------------------------
# Runtime: device, precision, processes, compile
# ----------------------------------------------------------------------------------------------

@dataclass
class Runtime:
    device: torch.device
    precision: str            # fp32 | bf16 | fp16
    rank: int = 0
    world: int = 1
    compile: bool = False
    group: bool = False       # a torch.distributed process group is running (torchrun, even with 1 process)
    compile_mode: str = "default"        # COMPILE_MODES: default, or reduce-overhead (CUDA graphs)
    channels_last: Optional[bool] = None  # the training layout; None: channels_last under compile on CUDA

    @property
    def distributed(self) -> bool:
        return self.world > 1 or self.group

    @property
    def amp_dtype(self) -> Optional[torch.dtype]:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)

    def local(self) -> "Runtime":
        """The same device and precision for this process alone, uncompiled (pictures drawn by rank 0)."""
        return Runtime(self.device, self.precision)

    @property
    def graphs(self) -> bool:
        """Training runs as CUDA graphs: compiled in reduce-overhead mode on a GPU, never under torchrun."""
        return (self.compile and self.compile_mode == "reduce-overhead" and self.device.type == "cuda"
                and not self.distributed)

    def autocast(self):
        """Autocast context for the model call; a no-op in fp32."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)


COMPILE_MODES = ("default", "reduce-overhead")


def setup_runtime(device: Optional[str], precision: str = "auto", compile_flag: Optional[bool] = None,
                  training: bool = False, compile_mode: str = "default") -> Runtime:
    """Decide device, precision, processes and compile in one place, after argument parsing, and
    say so once. A torchrun launch (WORLD_SIZE > 1) starts the process group: nccl on CUDA, gloo
    otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    why = "--device"
    if device is None:
        if torch.cuda.is_available():
            device, why = "cuda", "auto: CUDA available"
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            device, why = "mps", "auto: Apple GPU available"
        else:
            device, why = "cpu", "auto: no GPU found"
    dev = torch.device(device)
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise DDPMError("--device mps was asked for but no Apple GPU is available here; use --device cpu")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DDPMError("--device cuda was asked for but CUDA is not available; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DDPMError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                            f"numbered from 0")
        if dev.index is None:
            dev = torch.device("cuda", local_rank if world > 1 else torch.cuda.current_device())
        torch.cuda.set_device(dev)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    precision, pwhy = auto_precision(dev) if precision == "auto" else (precision, "--precision")
    if dev.type == "cpu" and precision != "fp32":
        warn_once(f"--precision {precision} on the CPU: autocast runs the convolutions and matrix products in "
                  f"{precision}, which most CPUs compute no faster than fp32, and less precisely; fp32 is the CPU's default")
    if (world > 1 or os.environ.get("TORCHELASTIC_RUN_ID")) and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")  # torchrun: one code path for any N
    if compile_flag is None:
        compile_flag = training and dev.type == "cuda"
    rt = Runtime(dev, precision, rank, world, compile=resolve_compile(compile_flag, dev), group=dist.is_initialized(),
                 compile_mode=compile_mode)
    if rt.compile and compile_mode == "reduce-overhead" and rt.distributed:
        log("note: --compile-mode reduce-overhead (CUDA graphs) is not used under torchrun: DistributedDataParallel's "
            "gradient hooks run between the backward pass's kernels and cannot be captured; compiling in the default "
            "mode")
        rt.compile_mode = "default"
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else dev.type
    log(f"device: {dev} ({name}; {why}) | precision: {precision} ({pwhy}) | compile: "
        + (f"on ({rt.compile_mode})" if rt.compile else "off")
        + (f" | processes: {world} ({dist.get_backend()})" if rt.group else ""))
    return rt


def auto_precision(dev: torch.device) -> Tuple[str, str]:
    """--precision auto: bf16 where the GPU computes it natively (compute capability 8.0 and up:
    A100, RTX 30xx and later), fp16 with a GradScaler on older GPUs (T4, V100, RTX 20xx, GTX 16xx,
    where torch.cuda.is_bf16_supported() also counts slow emulation), fp32 elsewhere."""
    if dev.type != "cuda":
        return "fp32", f"auto: fp32 on {dev.type}"
    major, minor = torch.cuda.get_device_capability(dev)
    if major >= 8:
        return "bf16", f"auto: native bf16 (compute capability {major}.{minor})"
    return "fp16", f"auto: compute capability {major}.{minor} has no native bf16; fp16 + GradScaler"


def compile_available(device: torch.device) -> Tuple[bool, str]:
    """Whether torch.compile can generate code here (Triton on GPUs; on Windows it is often missing)."""
    if not hasattr(torch, "compile"):
        return False, "this torch has no torch.compile"
    if device.type == "cuda":
        try:
            from torch.utils._triton import has_triton
            if not has_triton():
                return False, "Triton is not installed (common on Windows)"
        except ImportError:
            return False, "Triton is not available"
    return True, ""


def resolve_compile(wanted: bool, device: torch.device) -> bool:
    """Whether torch.compile will really run: asked for and possible; otherwise eager, with one warning."""
    if not wanted:
        return False
    ok, why = compile_available(device)
    if not ok:
        warn_once(f"torch.compile unavailable ({why}); running in eager mode")
    return ok


def broadcast_int(value: int, rt: Runtime) -> int:
    """Rank 0's value, on every rank."""
    if not rt.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return int(box[0])


def any_rank(flag: bool, rt: Runtime) -> bool:
    """True on every rank if it is true on any rank."""
    if not rt.distributed:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=rt.device if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def barrier(rt: Runtime) -> None:
    if rt.distributed:
        dist.barrier()


# -- memory: what a training step and a sampling batch need ------------------------------------

def activation_bytes(model: GaussianDiffusion, rt: Runtime, cfg: ModelConfig) -> Tuple[int, int]:
    """(bytes per image, fixed bytes) that one training step keeps for its backward pass, measured
    on the device with the run's precision: the tensors autograd saves in the forward pass of 1 and
    of 2 images (weights and their casts excluded per image, counted once as fixed)."""
    own = {p.untyped_storage().data_ptr() for p in model.parameters()}
    sizes = []
    for n in (1, 2):
        seen: Dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            st = t.untyped_storage()
            if st.data_ptr() not in own:
                seen[st.data_ptr()] = st.nbytes()
            return t
        x = torch.zeros(n, cfg.img_channels, cfg.img_size, cfg.img_size, device=rt.device)
        t = torch.full((n,), cfg.timesteps // 2, device=rt.device, dtype=torch.long)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), rt.autocast():
            loss = model(x, t, torch.zeros_like(x))
        del loss
        sizes.append(sum(seen.values()))
    per_image = max(1, sizes[1] - sizes[0])
    return per_image, max(0, sizes[0] - per_image)


def cuda_free_bytes(dev: torch.device) -> int:
    """Memory this process may still take on the GPU: the device's free memory, and no more than
    torch.cuda.set_per_process_memory_fraction allows beside what the allocator already holds."""
    free, total = torch.cuda.mem_get_info(dev)
    held, used = torch.cuda.memory_reserved(dev), torch.cuda.memory_allocated(dev)
    fraction = torch.cuda.get_per_process_memory_fraction(dev) if hasattr(
        torch.cuda, "get_per_process_memory_fraction") else 1.0
    return max(0, min(free + held - used, int(fraction * total) - used))


# Peak activation memory of a step over the bytes autograd saves in its forward pass: the backward
# pass's temporaries. Measured on an H200 (default model, batch 64 as 2 x 32, eager): bf16 1.3x,
# fp16 with GradScaler 1.55x.
ACTIVATION_PEAK = 1.6


@dataclass
class MemoryPlan:
    micro: int          # images per forward/backward on each process
    accum: int          # micro-batches per update
    data_on_device: bool
    note: str           # for the start-up line


def plan_memory(free: int, state: int, per_image: int, fixed: int, share: int, accum: int,
                auto_accum: bool, data_bytes: int) -> MemoryPlan:
    """Pick the micro-batch and the data's place from measured numbers (all in bytes).

    free: what the process may still allocate; state: what training adds before the first step
    (gradients and Adam's two moments); per_image / fixed: activation_bytes. A step needs
    state + fixed + ACTIVATION_PEAK * micro * per_image, and 10% of `free` is kept back for the
    allocator's fragmentation. The micro-batch is halved (accumulation doubled, same update) until
    that fits, unless --grad-accum was typed. The data goes on the GPU only if it fits in what is left."""
    budget = 0.9 * free - state - fixed
    micro = share // accum
    while auto_accum and micro % 2 == 0 and micro > 1 and ACTIVATION_PEAK * micro * per_image > budget:
        micro, accum = micro // 2, accum * 2
    left = budget - ACTIVATION_PEAK * micro * per_image
    on_device = data_bytes <= left
    gib = 2 ** 30
    note = (f"GPU memory: {free / gib:.1f} GiB free, a step needs about "
            f"{(state + fixed + ACTIVATION_PEAK * micro * per_image) / gib:.1f} GiB at micro-batch {micro}; data "
            + ("on the GPU" if on_device else "in CPU memory, copied per batch"))
    return MemoryPlan(micro, accum, on_device, note)


def check_sampling_memory(cfg: ModelConfig, batch: int, n: int, dev: torch.device) -> None:
    """Refuse, with an estimate, sampling that cannot fit: for a batch, about a dozen feature maps of
    the top resolution alive at once (input, skip connections, the residual blocks' inner maps); for
    all n images, their uint8 pixels kept in CPU memory until written."""
    need = batch * cfg.img_size ** 2 * max(cfg.num_channels, cfg.img_channels) * 4 * 12
    keep = n * (cfg.img_channels * cfg.img_size ** 2 + 64)
    ram = available_ram()  # where the system says
    free = cuda_free_bytes(dev) if dev.type == "cuda" else ram if dev.type == "cpu" else None
    if ram is not None and keep > ram:
        raise DDPMError(f"--num-samples {n} at {cfg.img_size}x{cfg.img_size} needs about {keep / 2**30:,.1f} GiB of "
                        f"memory for the images, more than the {ram / 2**30:,.1f} GiB free; make fewer per run "
                        f"(--num-samples), with other --seed values")
    if free is not None and need > free:
        fit = max(1, int(batch * free / need))
        raise DDPMError(f"--batch-size {batch} at {cfg.img_size}x{cfg.img_size} needs about {need / 2**30:,.1f} GiB "
                        f"to sample, more than the {free / 2**30:,.1f} GiB free on {dev.type}; use --batch-size "
                        f"{fit} or fewer")


# ----------------------------------------------------------------------------------------------
# Sampling and pictures
# ----------------------------------------------------------------------------------------------

# -- sampling -------------------------------------------------------------------------------------

class ImageNoise:
    """Per-image noise: image i draws all its noise (x_T, then each step's) from its own generator
    seeded by (seed, i), so it is the same image at any batch size and on any number of processes.
    Drawn on the CPU, so the noise is also the same on every device.

    From the second call on (a sampler that wants noise at every step), the next call's noise is
    drawn ahead into a pinned buffer and copied without waiting, while the GPU runs the model: the
    same draws in the same order, so the same images."""

    def __init__(self, seed: int, indices: Sequence[int], shape: Sequence[int], device: torch.device):
        self.gens = [torch.Generator().manual_seed(mix_seed(seed, int(i))) for i in indices]
        self.shape, self.device = tuple(shape), device
        self.stager = PinnedStager(device)
        self._ahead: Optional[torch.Tensor] = None
        self._calls = 0

    def _draw(self) -> torch.Tensor:
        def fill(out: torch.Tensor) -> None:
            for g, o in zip(self.gens, out):
                torch.randn(self.shape, generator=g, out=o)
        return self.stager.stage(fill, (len(self.gens), *self.shape), torch.float32)

    def __call__(self) -> torch.Tensor:
        """(n, C, H, W) standard normal noise on the device."""
        out = self._ahead if self._ahead is not None else self._draw()
        self._calls += 1
        self._ahead = self._draw() if self._calls >= 2 else None
        return out


@dataclass
class SamplingNet:
    """The network as samplers call it: net(x, t) -> its output in float32, under the run's autocast
    (bf16 on GPUs). compiled: torch.compile'd, so a batch of another shape would compile again."""

    fn: ModelFn
    compiled: bool = False

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.fn(x, t)


def sampling_net(model: GaussianDiffusion, rt: Runtime, compile_: bool = False) -> SamplingNet:
    """model's network for sampling, optionally compiled (on CUDA with CUDA graphs through
    mode="reduce-overhead" for the fixed batch shape, and channels_last only then, on a copy of the
    network: the caller's model is left as it is)."""
    net = model.eps_model
    compiled = resolve_compile(compile_, rt.device)
    graphs = channels_last = compiled and rt.device.type == "cuda"
    if channels_last:
        net = copy.deepcopy(net).to(memory_format=torch.channels_last)
    if compiled:
        net = torch.compile(net, mode="reduce-overhead" if graphs else None)

    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if graphs:  # a new step: the previous replay's outputs have been consumed
            torch.compiler.cudagraph_mark_step_begin()
        with rt.autocast():
            out = net(x, t)
        return out.to(torch.float32, copy=True) if graphs else out.float()  # a graph's output is reused
    return SamplingNet(fn, compiled)


@dataclass
class Edit:
    """Start from images instead of pure noise, one per index given to generate: SDEdit (Meng et al.
    2021) with `strength`, and inpainting (RePaint, Lugmayr et al. 2022) where `masks` is 1."""

    images: torch.Tensor                   # (N, C, H, W) uint8, loaded like training data
    strength: float = 1.0                  # 1: from pure noise, exactly as plain sampling
    masks: Optional[torch.Tensor] = None   # (N, 1, H, W) float: 1 = regenerate, 0 = keep
    jumps: int = 1                         # RePaint's resampling jumps per step (1 = none)

    def take(self, rows: Sequence[int]) -> "Edit":
        rows = list(rows)
        return replace(self, images=self.images[rows], masks=None if self.masks is None else self.masks[rows])

    def start(self, model: GaussianDiffusion, spec: SampleSpec) -> Optional[int]:
        """The grid timestep to start from: the first at or below strength * (T - 1); None at strength 1."""
        if self.strength >= 1:
            return None
        grid = model.grid(spec)
        return next((t for t in grid if t <= self.strength * (model.timesteps - 1)), grid[-1])


def _sample_chunk(model: GaussianDiffusion, spec: SampleSpec, fn: ModelFn, noise: "ImageNoise",
                  edit: Optional[Edit], device: torch.device, cb) -> torch.Tensor:
    """One batch: x_T is each image's first noise draw; an edit noises its images to the start
    timestep with that same draw (so strength 1 is plain sampling) and keeps its known pixels."""
    x = noise()
    if edit is None:
        return model.sample(x, spec, noise_fn=noise, model_fn=fn, callback=cb)
    known = to_model_range(edit.images).to(device)
    start = edit.start(model, spec)
    if start is not None:
        x = q_at(known, x, model.ab(start))
    mask = edit.masks.to(device) if edit.masks is not None else None
    return model.sample(x, spec, noise_fn=noise, model_fn=fn, callback=cb, start=start, known=known, mask=mask,
                        jumps=edit.jumps)


def generate(model: GaussianDiffusion, rt: Runtime, indices: Sequence[int], seed: int,
             spec: SampleSpec = SampleSpec(), batch_size: int = 64, compile_: bool = False,
             callback: Optional[Callable[[int, torch.Tensor, torch.Tensor], None]] = None,
             model_fn: Optional[ModelFn] = None, show_progress: bool = True,
             edit: Optional[Edit] = None) -> Optional[torch.Tensor]:
    """Images `indices` of `seed`, sampled as `spec` says (from `edit`'s images where given, one per
    index), as a (N, C, H, W) uint8 CPU tensor in the order of `indices` (on rank 0; other ranks
    return None). Under torchrun the indices are split across processes. callback(i, x, x0) sees
    each step of each batch. model_fn: the network to call (default: sampling_net of the model)."""
    cfg = model.config
    if cfg.legacy_attention and len(indices) > 1:
        warn_once("legacy-mode models attend across the batch: an image depends on its batch-mates, "
                  "so per-image seeds reproduce only at the same --batch-size")
    indices = list(indices)
    mine = list(range(len(indices)))[rt.rank::rt.world]  # positions in `indices`
    start = edit.start(model, spec) if edit is not None else None
    n_steps = len(model.grid(spec, start))
    fn = model_fn or sampling_net(model, rt, compile_)
    compiled = isinstance(fn, SamplingNet) and fn.compiled
    out = []
    with torch.inference_mode(), make_progress(transient=True) as progress:
        task = progress.add_task(f"Sampling ({spec.sampler}, {n_steps} steps)", total=len(mine) * n_steps, info="",
                                 visible=show_progress)
        for b in range(0, len(mine), batch_size):
            rows = mine[b:b + batch_size]
            chunk, n = [indices[r] for r in rows], len(rows)
            if b and n < batch_size and compiled and not cfg.legacy_attention:
                # a compiled model would recompile and record a new CUDA graph for a smaller last
                # chunk: pad it with more images (independent of the others) and drop them
                chunk = chunk + [max(indices) + 1 + k for k in range(batch_size - n)]
                rows = rows + [rows[-1]] * (batch_size - n)
            noise = ImageNoise(seed, chunk, (cfg.img_channels, cfg.img_size, cfg.img_size), rt.device)

            def step_cb(i, x, x0, n=n):
                progress.advance(task, n)
                if callback is not None:
                    callback(i, x[:n], x0[:n])
            x = _sample_chunk(model, spec, fn, noise, edit.take(rows) if edit is not None else None, rt.device, step_cb)
            out.append(to_uint8(x[:n]).cpu())
    return gather_images(out, len(indices), cfg, rt)


def gather_images(parts: List[torch.Tensor], total: int, cfg: ModelConfig, rt: Runtime) -> Optional[torch.Tensor]:
    """This process's batches of images, and under torchrun every process's, back in order on rank 0
    (process r made positions r, r + world, ...); None on the other ranks."""
    mine = torch.cat(parts) if parts else torch.zeros(0, cfg.img_channels, cfg.img_size, cfg.img_size, dtype=torch.uint8)
    if not rt.distributed:
        return mine
    every = [None] * rt.world
    dist.all_gather_object(every, mine)
    if not is_rank0():
        return None
    imgs = torch.empty(total, *mine.shape[1:], dtype=torch.uint8)
    for r, part in enumerate(every):
        imgs[r::rt.world] = part
    return imgs


# -- pictures -------------------------------------------------------------------------------------

def pil_image(img: torch.Tensor):
    """A (C, H, W) uint8 image as a PIL image (L for one channel)."""
    from PIL import Image

    arr = img.permute(1, 2, 0).numpy()
    return Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr)


def save_png(img: torch.Tensor, path: Path) -> None:
    """Write a (C, H, W) uint8 image as a new PNG file (see write_output)."""
    buf = io.BytesIO()
    pil_image(img).save(buf, format="PNG")
    write_output(path, buf.getvalue())


def image_grid(imgs: torch.Tensor, nrow: int = 8) -> torch.Tensor:
    """The original's ddpm-all.png layout: torchvision's make_grid (padding 2) of images in [-1, 1],
    padded with 0 (mid-grey); one channel kept for grayscale. uint8 in, (C, H', W') uint8 out."""
    from torchvision.utils import make_grid

    grid = make_grid(to_model_range(imgs), nrow=nrow, padding=2, pad_value=0.0)
    return to_uint8(grid[:imgs.shape[1]])


def strip(columns: List[torch.Tensor]) -> torch.Tensor:
    """The original's step strips: each (n, C, H, W) uint8 tensor becomes a column of n images."""
    return torch.cat([torch.cat(list(c), dim=1) for c in columns], dim=2)


def slerp(z0: torch.Tensor, z1: torch.Tensor, alpha: float) -> torch.Tensor:
    """Spherical interpolation between two noise tensors (Shoemake 1985)."""
    a, b = z0.flatten().double(), z1.flatten().double()
    omega = torch.arccos(torch.clamp(torch.dot(a / a.norm(), b / b.norm()), -1, 1))
    if omega.abs() < 1e-6:
        return (1 - alpha) * z0 + alpha * z1
    so = torch.sin(omega)
    return ((torch.sin((1 - alpha) * omega) / so) * z0.double() + (torch.sin(alpha * omega) / so) * z1.double()).float()


def snapshot_steps(n_steps: int, count: int = 10) -> set:
    """Which sampler steps to keep for strips and animations: about `count`, always the last."""
    return {round(i * (n_steps - 1) / max(count - 1, 1)) for i in range(count)} | {n_steps - 1}


def snapshots(model: GaussianDiffusion, rt: Runtime, indices: Sequence[int], seed: int, spec: SampleSpec, count: int,
              model_fn: Optional[ModelFn]) -> List[torch.Tensor]:
    """Images `indices` (uint8, on the CPU) at about `count` steps of their reverse process, ending at x_0."""
    keep, out = snapshot_steps(len(model.grid(spec)), count), []
    generate(model, rt, list(indices), seed, spec, batch_size=len(indices), model_fn=model_fn,
             callback=lambda i, x, x0: out.append(to_uint8(x).cpu()) if i in keep else None)
    return out


def reverse_strip(model: GaussianDiffusion, rt: Runtime, seed: int, n: int, spec: SampleSpec,
                  model_fn: Optional[ModelFn] = None) -> torch.Tensor:
    """Rows: n images; columns: x_T, then snapshots of the reverse process, ending at x_0."""
    cfg = model.config
    first = ImageNoise(seed, range(n), (cfg.img_channels, cfg.img_size, cfg.img_size), torch.device("cpu"))()
    return strip([to_uint8(first)] + snapshots(model, rt, range(n), seed, spec, 10, model_fn))


def denoise_frames(model: GaussianDiffusion, rt: Runtime, indices: Sequence[int], seed: int,
                   spec: SampleSpec, model_fn: Optional[ModelFn] = None) -> List[torch.Tensor]:
    """About 30 grids (4 per row) of images `indices` as they are denoised, for denoise.gif."""
    return [image_grid(x, nrow=4) for x in snapshots(model, rt, indices, seed, spec, 30, model_fn)]


def interpolation_strip(model: GaussianDiffusion, rt: Runtime, za: torch.Tensor, zb: torch.Tensor, spec: SampleSpec,
                        k: int = 8, model_fn: Optional[ModelFn] = None) -> torch.Tensor:
    """k images along the spherical path between two x_T (C, H, W): the noise of two seeds, or two
    real images inverted by GaussianDiffusion.invert; each denoised along the same deterministic path
    (see deterministic: a sampler that draws noise is replaced by DDIM, eta 0)."""
    x = torch.stack([slerp(za.cpu(), zb.cpu(), j / (k - 1)) for j in range(k)]).to(rt.device)
    with torch.inference_mode():
        out = model.sample(x, deterministic(spec), model_fn=model_fn or sampling_net(model, rt))
    return strip([to_uint8(out).cpu()[j:j + 1] for j in range(k)])


def seed_noise(model: GaussianDiffusion, seed: int) -> torch.Tensor:
    """x_T of image 0 of `seed`: (C, H, W) on the CPU."""
    cfg = model.config
    return ImageNoise(seed, [0], (cfg.img_channels, cfg.img_size, cfg.img_size), torch.device("cpu"))()[0]


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Peak signal-to-noise ratio of two uint8 images, in dB (inf where they are equal)."""
    mse = (a.double() - b.double()).pow(2).mean().item()
    return 10 * math.log10(255.0 ** 2 / mse) if mse > 0 else math.inf


def forward_strip(model: GaussianDiffusion, x0: torch.Tensor, seed: int) -> torch.Tensor:
    """Rows: training images; columns: x_0, then x_t ~ q(x_t | x_0) at ten evenly spaced t, ending at T-1
    (t = 99, 199, ..., 999 for T = 1000, as the original). Computed on the CPU from the model's schedule
    (the model itself is not moved)."""
    g = torch.Generator().manual_seed(mix_seed(seed, 4))
    x0 = to_model_range(x0)
    cols = [to_uint8(x0)]
    for t in sorted({round((k + 1) * model.timesteps / 10) - 1 for k in range(10)}):
        cols.append(to_uint8(q_at(x0, torch.randn(x0.shape, generator=g), model.ab(t))))
    return strip(cols)


def save_gif(frames: List[torch.Tensor], path: Path, ms: int = 80) -> None:
    """An animated GIF from (C, H, W) uint8 frames, written with PIL; the last frame is held."""
    pics = [pil_image(f) for f in frames]
    buf = io.BytesIO()
    pics[0].save(buf, format="GIF", save_all=True, append_images=pics[1:] + [pics[-1]] * 10, duration=ms, loop=0)
    write_output(path, buf.getvalue())


def upscale(img: torch.Tensor, factor: int) -> torch.Tensor:
    """Nearest-neighbour enlargement of a (C, H, W) image, so small samples are visible."""
    return img.repeat_interleave(factor, 1).repeat_interleave(factor, 2) if factor > 1 else img


def save_picture(grid: torch.Tensor, cfg: ModelConfig, path: Path) -> None:
    """Save a picture of the model's images (a grid, a strip), doubled in size where they are 32 px
    or smaller, so that they can be seen."""
    save_png(upscale(grid, 2 if cfg.img_size <= 32 else 1), path)


def read_metric_rows(metrics_csv: Path, column: str, bad: Optional[list] = None) -> List[Tuple[int, int, float]]:
    """(step, images seen, value) of the rows of metrics.csv whose `column` is a finite number (a
    skipped step has no loss; only evaluation rows have an SWD). `bad`, where given, collects the
    steps whose `column` holds something that is not a finite number."""
    out = []
    with contextlib.suppress(OSError, UnicodeDecodeError, csv.Error):
        with open(metrics_csv, newline="", encoding="utf-8") as f:
            for r in csv.DictReader(f):
                with contextlib.suppress(TypeError, ValueError):
                    step, images = int(r.get("step")), int(r.get("images_seen") or 0)
                    text = r.get(column) or ""
                    try:
                        value = float(text) if text else math.nan
                    except ValueError:
                        value = math.inf  # not a number at all
                    if math.isfinite(value):
                        out.append((step, images, value))
                    elif text and bad is not None:
                        bad.append(step)
    return out


def plot_png(series: Dict[str, Tuple[Sequence[float], Sequence[float]]], out: Path, xlabel: str, ylabel: str,
             log_y: bool = False, floors: Optional[Dict[str, float]] = None) -> bool:
    """Line plots written as a PNG with matplotlib: series label -> (xs, ys), each with a dashed
    horizontal line at floors[label] where given (in the series' colour); False, with a note, where
    matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log(f"note: {out.name} skipped (pip install matplotlib to draw it); the numbers are in metrics.csv")
        return False
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    for label, (xs, ys) in series.items():
        line, = ax.plot(xs, ys, lw=1, marker="o" if len(xs) < 40 else None, ms=3, label=label)
        if floors and floors.get(label) is not None:
            ax.axhline(floors[label], color=line.get_color(), ls="--", lw=0.8)
    if len(series) > 1 or floors:
        ax.legend(loc="best", fontsize=7, title="dashed: real vs real" if floors else None, title_fontsize=7)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if log_y:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    write_output(out, buf.getvalue())
    return True


def probe_floors(rec) -> Dict[str, float]:
    """The real-vs-real floors of --eval-every's record in a checkpoint (QualityProbe.record) by
    quality.png's series: "mean", and "32px" ... where the record has the levels."""
    if not isinstance(rec, dict) or not isinstance(rec.get("floor"), (int, float)):
        return {}
    levels = rec.get("floor_levels") if isinstance(rec.get("floor_levels"), dict) else {}
    return {"mean": float(rec["floor"]), **{f"{k}px": float(v) for k, v in levels.items()
                                             if isinstance(v, (int, float))}}


def swd_level_rows(metrics_csv: Path) -> Dict[str, Tuple[List[int], List[float]]]:
    """Per pyramid level ("32px", ...), the images seen and SWD of metrics.csv's swd_levels column."""
    out: Dict[str, Tuple[List[int], List[float]]] = {}
    with contextlib.suppress(OSError, UnicodeDecodeError, csv.Error):
        with open(metrics_csv, newline="", encoding="utf-8") as f:
            for r in csv.DictReader(f):
                with contextlib.suppress(TypeError, ValueError):
                    images = int(r.get("images_seen") or 0)
                    for part in (r.get("swd_levels") or "").split():
                        size, value = part.split(":")
                        if math.isfinite(float(value)):
                            xs, ys = out.setdefault(f"{int(size)}px", ([], []))
                            xs.append(images)
                            ys.append(float(value))
    return out


def write_curve(metrics_csv: Path, out: Path, column: str, floors: Optional[Dict[str, float]] = None,
                objective: str = "v") -> str:
    """loss.png (column "loss": the logged loss against the step) or quality.png ("swd": the SWD of
    --eval-every against the images seen, its mean and each pyramid level, with their real-vs-real
    floors: floors["mean"], floors["32px"], ...) from metrics.csv. Returns what happened, for the
    caller's line: "" when written, else why not."""
    bad: List[int] = []
    rows = read_metric_rows(metrics_csv, column, bad)
    skipped = f"; {len(bad)} rows hold no number there (e.g. step {bad[0]})" if bad else ""
    if len(rows) < 2:
        return f"{out.name} not drawn: metrics.csv has {len(rows)} row{'s' if len(rows) != 1 else ''} with a {column} " \
               f"(2 are needed){skipped}"
    if column == "loss":
        what = {"eps": "eps", "v": "v", "edm": "EDM's F"}.get(objective, "output")
        drawn = plot_png({"loss": ([r[0] for r in rows], [r[2] for r in rows])}, out, "step",
                         f"loss (MSE of the predicted {what})", True)
    else:
        series = {"mean": ([r[1] for r in rows], [r[2] for r in rows]), **swd_level_rows(metrics_csv)}
        drawn = plot_png(series, out, "images seen", "SWD x1e3 (lower is better)", floors=floors)
    return skipped[2:] if drawn and skipped else ""  # not drawn: plot_png has said why


# ----------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------

FID_WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"  # pytorch-fid's port of the TF Inception used for FID


def training_source(ckpt: dict, flags: DataFlags = DataFlags()) -> DataSource:
    """Where a checkpoint's training images came from; data folders in `flags` override the record."""
    bg = flags.background
    if flags.folders:
        return DataSource(tuple(flags.folders), 0, bg)
    if ckpt.get("data"):
        return DataSource.from_record(ckpt["data"], bg)
    train = ckpt.get("train") or {}  # checkpoints from before the data record
    if flags.demo or train.get("demo"):
        return DataSource((), int((ckpt.get("holdout") or {}).get("total") or flags.demo_images), bg)
    if train.get("data_folders"):
        return DataSource(tuple(train["data_folders"]), 0, bg)
    raise DDPMError("the checkpoint does not record its training data (an export, or a file of the original "
                    "script); give --data-folders DIR")


def two_real_sets(images: torch.Tensor, n: int, seed: int, salt: int, what: str, flag: str, asks: str
                  ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Two disjoint sets of n real images each, drawn from `images` by (seed, salt): the set samples are
    compared with, and the floor's (another n real ones against the same n). Where there are fewer than
    2n, each set takes half of them (said in one line); fewer than 4 is an error."""
    if len(images) < 2 * n:
        if len(images) < 4:
            raise DDPMError(f"{flag} needs at least 4 real images, {what} holds {len(images)}")
        log(f"note: {what} holds {len(images)} images; {flag} compares {len(images) // 2} samples with "
            f"{len(images) // 2} of them ({asks} {n} asks for {2 * n})")
        n = len(images) // 2
    perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(mix_seed(seed, salt)))
    return images[perm[:n]], images[perm[n:2 * n]]


def eval_datasets(ckpt: dict, cfg: ModelConfig, flags: DataFlags = DataFlags(), new_faces: int = 256
                  ) -> Tuple[torch.Tensor, Optional[torch.Tensor], str]:
    """(the training images the model saw, held-out images or None, what the held-out set is).
    Held out: --eval-folders, else the checkpoint's --holdout split rebuilt from its record, else for
    the demo `new_faces` faces past the ones it trained on (face i depends on i alone, so they are new)."""
    src = training_source(ckpt, flags)
    data = src.load(cfg)
    rec, held, what = ckpt.get("holdout") or {}, None, ""
    if not src.folders and not rec.get("n") and not flags.eval_folders:
        n = src.demo_images
        held = src.new_faces(cfg, new_faces)
        what = f"{new_faces} new demo faces (indices {n} to {n + new_faces - 1}, never trained on)"
    if rec.get("n"):
        if rec.get("total") == len(data):
            data, held, _ = split_holdout(data, rec["fraction"], rec["seed"])
            what = f"the checkpoint's held-out split (--holdout {rec['fraction']:g})"
        elif not flags.eval_folders:
            raise DDPMError(f"the training data now holds {len(data)} images, {rec.get('total')} at training time, "
                            f"so the held-out split cannot be rebuilt; give --eval-folders DIR")
    if flags.eval_folders:
        held = load_images(flags.eval_folders, cfg.img_size, cfg.img_channels, flags.background, flag="--eval-folders")
        what = "--eval-folders " + " ".join(flags.eval_folders) + trained_on(flags.eval_folders, src)
    return data, held, what


def trained_on(eval_folders: Sequence[str], src: DataSource) -> str:
    """For what --eval says it compares with: a note where --eval-folders holds training images too."""
    k, n = shared_images(eval_folders, src.folders, "--eval-folders", src.flag) if src.folders else (0, 0)
    if k:
        warn_once(f"{k} of the {n} images of --eval-folders are training images of the model ({src.describe()}): "
                  f"not held out")
        return f" ({k} of them training images)"
    return ""


# -- negative log-likelihood -------------------------------------------------------------------

def normal_kl(mean1: torch.Tensor, var1: torch.Tensor, mean2: torch.Tensor, var2: torch.Tensor) -> torch.Tensor:
    """KL(N(mean1, var1) || N(mean2, var2)) elementwise, in nats."""
    return 0.5 * (torch.log(var2 / var1) + (var1 + (mean1 - mean2) ** 2) / var2 - 1)


def discretized_gaussian_log_likelihood(x0: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """log p(x_0 | x_1) of Ho et al. 2020 eq. 13, elementwise: N(mean, std^2) integrated over the bin
    [x_0 - 1/255, x_0 + 1/255] of the 256 levels of [-1, 1], the end bins reaching -inf / +inf."""
    lo = torch.where(x0 < -0.999, torch.full_like(x0, -math.inf), (x0 - 1 / 255 - mean) / std)
    hi = torch.where(x0 > 0.999, torch.full_like(x0, math.inf), (x0 + 1 / 255 - mean) / std)
    flip = lo > 0  # Phi(hi) - Phi(lo) = Phi(-lo) - Phi(-hi): keep both ends in the lower tail, for precision
    a, b = torch.where(flip, -hi, lo), torch.where(flip, -lo, hi)
    la, lb = torch.special.log_ndtr(a), torch.special.log_ndtr(b)
    return lb + torch.log1p(-torch.exp(la - lb))


@torch.no_grad()
def bits_per_dim(model: GaussianDiffusion, data: torch.Tensor, timesteps: Optional[int] = None,
                 batch_size: int = 64, seed: int = 0, model_fn: Optional[ModelFn] = None,
                 variance: str = "large") -> dict:
    """The variational bound of Ho et al. 2020 (eq. 5) on uint8 images data: (N, C, H, W), in bits/dim.

    Per image, in nats: L = L_T + sum_{t=2..T} L_{t-1} + L_0 with
      L_T     = KL(q(x_T | x_0) || N(0, I)), eq. 4, exact;
      L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)), q from eq. 6-7, p's mean from eps_theta
                (eq. 11) and p's variance sigma_t^2 = beta_t, as the ancestral sampler uses;
      L_0     = -log p(x_0 | x_1), the discretised Gaussian decoder (eq. 13), also with sigma_1^2 = beta_1.
    x_t ~ q(x_t | x_0) is drawn once per image and timestep (Monte Carlo over x_t). Convention: x_0 =
    uint8 / 127.5 - 1; the decoder is a distribution over the 256 levels, so the result is the bits/dim
    of the 8-bit images, nats / (C*H*W ln 2), as in Ho et al. Table 2.
    timesteps=K < T: t = 1 always, t = 2..T cut into K-1 nearly equal strata, one uniform t per stratum
    and image weighted by the stratum's size: an unbiased estimate of the full sum with K model calls.
    model_fn(x_t, t) -> the network's output (eps or v, as the model's objective; default: the model in
    float32). variance="small" uses the posterior's beta-tilde for p instead (for the decoder at t = 1,
    where it is 0, that of t = 2, as Nichol & Dhariwal clip it). The bound is computed in float64.
    Returns {bpd, ci (95% half-width over images), per_image (N,), prior, kl, decoder (mean bits/dim
    of each part), K, T, n}.
    """
    T = model.timesteps
    K = T if not timesteps or timesteps >= T else int(timesteps)
    if K < 2:
        raise DDPMError(f"--nll-timesteps must be at least 2 (t=1 for the decoder, one more for the KL terms), got {K}")
    if data.dtype != torch.uint8 or data.dim() != 4 or not len(data):
        raise DDPMError("bits/dim needs a non-empty uint8 batch of images (N, C, H, W)")
    dev = model.alpha_bar.device
    cdev = torch.device("cpu") if dev.type == "mps" else dev  # the float64 arithmetic (MPS has none)
    fn = model_fn or (lambda x, tt: model.eps_model(x, tt).float())
    sched = model if cdev == dev else copy.deepcopy(model).to(cdev)
    edges = torch.floor(torch.linspace(1, T, K, dtype=torch.float64) + 0.5).long().tolist()  # strata of t-1
    ab_T = float(model.alpha_bar_f64[-1])
    g = torch.Generator(cdev).manual_seed(mix_seed(seed, 8))  # drawn where the bound is computed
    parts = []
    with make_progress(transient=True) as progress:
        task = progress.add_task(f"NLL ({K} of {T} timesteps)", total=len(data) * K, info="")
        for xb in data.split(batch_size):
            x0 = (xb.double() / 127.5 - 1).to(cdev)  # (B, C, H, W) in [-1, 1], as to_model_range in float64
            B = len(x0)
            prior = normal_kl(math.sqrt(ab_T) * x0, torch.full_like(x0, 1 - ab_T), torch.zeros_like(x0),
                              torch.ones_like(x0)).sum((1, 2, 3))
            kl, dec = x0.new_zeros(B), None
            for k in range(K):
                lo, hi = (0, 1) if k == 0 else (edges[k - 1], edges[k])
                t = (lo + torch.rand(B, generator=g, dtype=torch.float64, device=cdev) * (hi - lo)).long()  # (B,)
                xt = sched.q_sample(x0, t, torch.randn(x0.shape, generator=g, dtype=torch.float64, device=cdev))
                # p(x_{t-1} | x_t), in float64: its mean from the model's eps (the network on the model's device),
                # its variance beta_t, or beta-tilde_t (at t = 1, where that is 0, the one of t = 2)
                eps = sched.denoise(xt, t, model_fn=lambda x, tt: fn(x.float().to(dev), tt.to(dev)).to(cdev))[1]
                mean_p = sched.p_mean(xt, t, eps)
                var_p = ddpm_var(*sched.schedule_at(t.clamp(min=1) if variance == "small" else t, xt.shape),
                                 variance).double()
                if k == 0:
                    dec = -discretized_gaussian_log_likelihood(x0, mean_p, var_p.sqrt()).sum((1, 2, 3))
                else:
                    mean_q, var_q = sched.q_posterior(x0, xt, t)
                    kl += (hi - lo) * normal_kl(mean_q, var_q.double(), mean_p, var_p).sum((1, 2, 3))
                progress.advance(task, B)
            parts.append(torch.stack([prior, kl, dec], 1).cpu())  # (B, 3) nats
    return {**_bpd_summary(torch.cat(parts) / (data[0].numel() * math.log(2))), "K": K, "T": T}


def _bpd_summary(bpd: torch.Tensor) -> dict:
    """bpd: (N, 3) bits/dim of (prior, KL terms, decoder) per image -> the figures bits_per_dim returns."""
    per = bpd.sum(1)
    n = len(per)
    ci = 1.96 * float(per.std()) / math.sqrt(n) if n > 1 else float("nan")
    return {"bpd": float(per.mean()), "ci": ci, "per_image": per, "prior": float(bpd[:, 0].mean()),
            "kl": float(bpd[:, 1].mean()), "decoder": float(bpd[:, 2].mean()), "n": n}


# -- Frechet Inception Distance ----------------------------------------------------------------

@dataclass
class Features:
    """An image feature extractor for FID: fn maps (B, 3, H, W) in [0, 1] to (B, D) float64 on the CPU;
    tag says which features they are (part of the real statistics' cache key)."""

    fn: Callable[[torch.Tensor], torch.Tensor]
    tag: str = "custom features"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


def inception_features(weights: Optional[str], device: torch.device) -> Features:
    """pytorch-fid's InceptionV3 pool3 features (2048-d) with the pt_inception-2015-12-05 weights (the
    TF Inception of Heusel et al. 2017 behind published FIDs), from torch.hub's cache or --fid-weights
    (checked by its sha256 prefix); never downloads. Returns its Features: (B, 3, H, W) in [0, 1] -> (B, 2048)."""
    try:
        from pytorch_fid.inception import FID_WEIGHTS_URL, InceptionV3
    except ImportError:
        raise DDPMError("--eval fid needs the standard Inception features of pytorch-fid; run "
                        "`pip install pytorch-fid`") from None
    expected = Path(torch.hub.get_dir()) / "checkpoints" / FID_WEIGHTS_NAME
    src = Path(weights) if weights else expected
    if weights and src.is_dir():
        raise DDPMError(f"--fid-weights {src} is a folder; name the file {FID_WEIGHTS_NAME} itself")
    if not src.is_file():
        what = f"--fid-weights {src} does not exist" if weights else "the FID Inception weights are not on disk"
        raise DDPMError(f"{what} (nothing is downloaded): get {FID_WEIGHTS_URL} and put it at {expected}, "
                        f"or name the file with --fid-weights PATH")
    h = hashlib.sha256()
    with open(src, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    if not h.hexdigest().startswith("6726825d"):
        raise DDPMError(f"{src} is not {FID_WEIGHTS_NAME} (sha256 {h.hexdigest()[:8]}..., expected 6726825d...); "
                        f"FID is only comparable with exactly those weights")
    old = torch.hub.get_dir()
    with tempfile.TemporaryDirectory() as tmp:
        if src.resolve() != expected.resolve():  # let pytorch-fid find the file under its expected name
            link = Path(tmp) / "checkpoints" / FID_WEIGHTS_NAME
            link.parent.mkdir()
            try:
                link.symlink_to(src.resolve())
            except OSError:  # Windows without symlink rights
                shutil.copyfile(src, link)
            torch.hub.set_dir(tmp)
        try:
            net = InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval().to(device)
        finally:
            torch.hub.set_dir(old)

    @torch.inference_mode()
    def fn(x: torch.Tensor) -> torch.Tensor:
        return net(x.to(device))[0].flatten(1).double().cpu()  # (B, 2048)
    return Features(fn, "Inception-v3 pool3 2048-d, pt_inception-2015-12-05 (pytorch-fid)")


def fid_input(imgs: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) uint8 -> (B, 3, H, W) float in [0, 1], grayscale repeated, as pytorch-fid reads images."""
    x = imgs.float() / 255
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


def activation_stats(batches: Iterable[torch.Tensor], feature_fn: Callable) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """Mean (D,) and unbiased covariance (D, D), float64, of feature_fn over uint8 batches (B, C, H, W)."""
    s, ss, n = 0.0, 0.0, 0
    for imgs in batches:
        f = feature_fn(fid_input(imgs)).double().cpu()  # (B, D)
        s, ss, n = s + f.sum(0), ss + f.T @ f, n + len(f)
    if n < 2:
        raise DDPMError("FID needs at least 2 images on each side")
    mu = s / n
    return mu, (ss - n * torch.outer(mu, mu)) / (n - 1), n


def frechet_distance(mu1: torch.Tensor, sigma1: torch.Tensor, mu2: torch.Tensor, sigma2: torch.Tensor) -> float:
    """d^2 = |mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) (Heusel et al. 2017, eq. 6), in float64.
    Tr (S1 S2)^(1/2) = sum of sqrt(eigenvalues of S1^(1/2) S2 S1^(1/2)), a symmetric PSD matrix with
    the eigenvalues of S1 S2: the same value as pytorch-fid's sqrtm, without complex round-off."""
    mu1, mu2, s1, s2 = (torch.as_tensor(v, dtype=torch.float64) for v in (mu1, mu2, sigma1, sigma2))
    w, v = torch.linalg.eigh(s1)
    r = (v * w.clamp(min=0).sqrt()) @ v.T  # S1^(1/2)
    m = r @ s2 @ r
    tr_sqrt = torch.linalg.eigvalsh((m + m.T) / 2).clamp(min=0).sqrt().sum()
    return float((mu1 - mu2).square().sum() + s1.trace() + s2.trace() - 2 * tr_sqrt)


def fid_cache_key(src: DataSource, cfg: ModelConfig, tag: str) -> str:
    """A hash of the real images' identity (files with sizes and times, or the demo count), size, features."""
    if not src.folders:
        what = ["demo", src.demo_images]
    else:
        what = [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in find_image_files(src.folders, src.flag)[0]]
    blob = json.dumps([what, cfg.img_size, cfg.img_channels, list(src.background), tag]).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def real_statistics(src: DataSource, cfg: ModelConfig, features: Features, cache: Path,
                    batch_size: int) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """(mean, covariance, n) of the real images' features, read from `cache` when it is there and
    readable, else computed and cached (atomically; a cache that cannot be written is only a warning)."""
    with contextlib.suppress(Exception):  # missing or unreadable: recompute
        st = torch.load(cache, map_location="cpu", weights_only=True)
        log(f"fid: real statistics of {int(st['n'])} images from {cache} (cached)")
        return st["mu"], st["sigma"], int(st["n"])
    mu, sigma, n = activation_stats(src.load(cfg).split(batch_size), features)
    if os.path.lexists(cache):  # there, but unreadable: left as it is
        warn_once(f"{cache} could not be read; the FID statistics were computed again and not cached")
        return mu, sigma, n
    try:
        atomic_write(cache, lambda f: torch.save({"mu": mu, "sigma": sigma, "n": n, "source": src.describe(),
                                                 "features": features.tag}, f), replace_existing=False)
        log(f"fid: real statistics of {n} images saved to {cache}")
    except OSError as e:
        warn_once(f"could not cache the FID statistics in {cache} ({e})")
    return mu, sigma, n


# -- sliced Wasserstein distance --------------------------------------------------------------

_BLUR = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0], dtype=torch.float64)
_BLUR = torch.outer(_BLUR, _BLUR) / 256  # the 5x5 binomial filter of Burt & Adelson's pyramids


def _blur(x: torch.Tensor, gain: float = 1.0) -> torch.Tensor:
    """(N, C, H, W) -> the same, convolved per channel with the 5x5 binomial filter, mirrored edges."""
    c = x.shape[1]
    k = (_BLUR * gain).to(x.dtype).expand(c, 1, 5, 5)
    return F.conv2d(F.pad(x, (2, 2, 2, 2), mode="reflect"), k, groups=c)


def laplacian_pyramid(x: torch.Tensor, levels: int) -> List[torch.Tensor]:
    """Burt & Adelson's Laplacian pyramid, finest first: each level is the image minus its blurred,
    halved and re-doubled copy; the last is the coarsest blurred image itself."""
    out = []
    for _ in range(levels - 1):
        down = _blur(x)[:, :, ::2, ::2]
        up = torch.zeros_like(x)
        up[:, :, ::2, ::2] = down
        out.append(x - _blur(up, 4.0))
        x = down
    return out + [x]


def swd_descriptors(imgs: torch.Tensor, levels: int, per_image: int = 128, seed: int = 0, size: int = 7,
                    fixed: bool = False) -> List[torch.Tensor]:
    """Per pyramid level, (N * per_image, C*size*size) float32: 7x7 neighbourhoods at random places,
    normalised per channel over the whole set (Karras et al. 2018). Each image's places are drawn from
    a hash of its pixels (so the set of descriptors does not depend on the order of the images), or
    with `fixed` the same places in every image, drawn from the seed alone (so that a set measured
    again after a small change is read at the same places: --eval-every's probe)."""
    x = imgs.double() / 127.5 - 1
    keys = [mix_seed(seed, 12) if fixed else
            mix_seed(seed, int.from_bytes(hashlib.sha256(im.numpy().tobytes()).digest()[:8], "little")) for im in imgs]
    out = []
    for level in laplacian_pyramid(x, levels):
        n, c, h, w = level.shape
        k = min(size, h, w)
        pos = torch.stack([torch.randint(0, max(1, h - k + 1), (per_image, 2), generator=torch.Generator().manual_seed(key))
                           for key in keys])  # (N, per_image, 2)
        ys = pos[..., 0, None, None] + torch.arange(k)[:, None]   # (N, P, k, 1)
        xs = pos[..., 1, None, None] + torch.arange(k)[None, :]   # (N, P, 1, k)
        patches = level[torch.arange(n)[:, None, None, None], :, ys, xs]  # (N, P, k, k, C)
        d = patches.permute(0, 1, 4, 2, 3).reshape(n * per_image, c, k * k)
        d = (d - d.mean((0, 2), keepdim=True)) / d.std((0, 2), keepdim=True).clamp(min=1e-8)
        out.append(d.reshape(n * per_image, -1).float())
    return out


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, dirs: torch.Tensor) -> float:
    """The mean over unit directions (columns of dirs, (D, K)) of the 1-D Wasserstein-1 distance
    between the projections of two equally large sets of points a, b: (M, D)."""
    pa, pb = ((dirs.T @ x.T).sort(1).values for x in (a, b))  # (K, M): each direction's sorted projections
    return float((pa - pb).abs().mean())


def swd(fake: torch.Tensor, real: torch.Tensor, seed: int = 0, repeats: int = 4, dirs_per_repeat: int = 128,
        fixed: bool = False) -> dict:
    """Sliced Wasserstein distance between two equally large sets of uint8 images (N, C, H, W), per
    level of the Laplacian pyramid from full size down to 16 px (one level below 32 px), x 1e3, and
    their mean: Karras et al. 2018's multi-scale statistical similarity, with no pretrained network.
    fixed: patches at the same places in every image (see swd_descriptors)."""
    if len(fake) != len(real) or len(fake) < 2:
        raise DDPMError(f"SWD needs two equally large sets of 2 or more images, got {len(fake)} and {len(real)}")
    size = fake.shape[-1]
    levels = max(1, int(math.log2(size)) - 3)
    g = torch.Generator().manual_seed(mix_seed(seed, 9))
    per_level, sizes = [], [size >> i for i in range(levels)]
    for da, db in zip(swd_descriptors(fake, levels, seed=seed, fixed=fixed),
                      swd_descriptors(real, levels, seed=seed, fixed=fixed)):
        dirs = [torch.randn(da.shape[1], dirs_per_repeat, generator=g) for _ in range(repeats)]
        per_level.append(1e3 * sum(sliced_wasserstein(da, db, d / d.norm(dim=0, keepdim=True)) for d in dirs) / repeats)
    return {"sizes": sizes, "per_level": per_level, "mean": sum(per_level) / len(per_level)}


def colour_gap(fake: torch.Tensor, real: torch.Tensor) -> dict:
    """What SWD cannot see (it normalises each set's patches by the set's own mean and deviation): a
    global colour or brightness shift. The largest difference over the channels between two uint8
    sets (N, C, H, W) of the per-channel mean, and of the per-channel standard deviation, in 8-bit levels."""
    f, r = fake.double(), real.double()
    dm = (f.mean((0, 2, 3)) - r.mean((0, 2, 3))).abs().max()
    ds = (f.std((0, 2, 3)) - r.std((0, 2, 3))).abs().max()
    return {"mean": float(dm), "std": float(ds)}


# -- memorisation ------------------------------------------------------------------------------

def pixel_features(imgs: torch.Tensor, size: int = 16) -> torch.Tensor:
    """(N, C, H, W) uint8 -> (N, C*s*s): area-downsampled to s = min(size, H), in [-1, 1], divided by
    sqrt(C*s*s) so that the L2 distance between two rows is their RMS pixel difference."""
    s = min(size, imgs.shape[-1])
    out = [F.interpolate(to_model_range(c), size=(s, s), mode="area").flatten(1) for c in imgs.split(1024)]
    return torch.cat(out) / math.sqrt(imgs.shape[1] * s * s)


def nearest_neighbours(query: torch.Tensor, bank: torch.Tensor, k: int = 3) -> Tuple[torch.Tensor, torch.Tensor]:
    """The k nearest rows of bank (N, D) to each row of query (M, D) in L2: distances, indices (M, k)."""
    k = min(k, len(bank))
    out = [torch.cdist(q.double(), bank.double()).topk(k, largest=False) for q in query.split(256)]
    return torch.cat([o.values for o in out]), torch.cat([o.indices for o in out])


def copy_check(samples: torch.Tensor, train: torch.Tensor, real: torch.Tensor, real_bank: torch.Tensor,
               abs_threshold: float, k: int = 3) -> dict:
    """Features (rows) of samples vs the training set, with real held-out images vs real_bank as the
    yardstick: a sample nearer to its nearest training image than the 5% quantile of the real images'
    nearest distances (or than abs_threshold) is a possible copy (about 5% expected by chance).
    Returns {dist, idx (M, k), real (R,), threshold, copies, q_samples, q_real ([min, 5%, 50%, 95%])}."""
    d, idx = nearest_neighbours(samples, train, k)
    d_real = nearest_neighbours(real, real_bank, 1)[0][:, 0]
    thr = max(float(torch.quantile(d_real, 0.05)), abs_threshold)

    def q(v):
        return [float(v.min())] + torch.quantile(v, torch.tensor([0.05, 0.5, 0.95], dtype=v.dtype)).tolist()
    return {"dist": d, "idx": idx, "real": d_real, "threshold": thr, "copies": int((d[:, 0] < thr).sum()),
            "q_samples": q(d[:, 0]), "q_real": q(d_real)}


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------

# -- the settings --------------------------------------------------------------------------------

LR_SCHEDULES = ("constant", "cosine")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
LOSS_WEIGHTS = ("none", "min-snr")


TRAINING = frozenset({"train"})


def needs_recipe(flag: str, field_: str, value: str) -> Callable:
    """`needs` of a setting that only acts with another's value (a run's own, on --resume or a fine-tune,
    is checked against the checkpoint by check_recipe)."""
    def needs(args) -> Optional[str]:
        return None if getattr(args, field_) == value or args.resume or args.loadckpt else \
            f"{flag} goes with --{field_.replace('_', '-')} {value}"
    needs.recipe = (field_, value)
    return needs


@declares(group="training", resume=RUN, commands=TRAINING)
@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run reads besides the model config and the data: built once from the
    command line (or by hand, see the README), stored in every checkpoint, restored by --resume."""

    batch_size: int = setting(64, "--batch-size", "training batch (global) and sampling batch", "run", demo=16,
                              commands=EVERY - {"info", "export", "invert"}, **at_least(1))
    grad_accum: int = setting(1, "--grad-accum", "micro-batches per update (same effective batch; on a GPU more are "
                              "used where memory is short, unless this is typed)", **at_least(1))
    auto_accum: bool = derived("True unless --grad-accum is typed: on a GPU, split the micro-batch further when memory "
                               "is short", True)
    lr: float = setting(1e-4, "--lr", "Adam learning rate", demo=1e-3, check=lambda v: 0 < v <= 1,
                        rule="a positive number up to 1")
    lr_schedule: str = setting("constant", "--lr-schedule", "constant (the original) or cosine decay to 0 at the end "
                               "of --epochs", choices=LR_SCHEDULES)
    warmup_steps: int = setting(0, "--warmup-steps", "linear learning-rate warm-up", demo=100, **at_least(0))
    epochs: int = setting(5, "--epochs", "epochs to train (with --resume: the run's total)", demo=4, **at_least(1))
    ema_decay: float = setting(0.9999, "--ema-decay", "EMA of the weights; 0 turns it off", demo=0.9995,
                               **fraction("in [0, 1)"))
    precision: str = setting("auto", "--precision", "auto: bf16 on GPUs that have it, else fp16 with GradScaler; fp32 "
                             "on CPU", "run", choices=PRECISIONS, commands=EVERY - {"info", "export"})
    holdout: float = setting(0.0, "--holdout", "--train: leave this fraction (0.01 or 1%%) of the images out, recorded "
                             "for --eval", "evaluation", kind=parse_fraction, metavar="FRACTION", **fraction())
    max_steps: Optional[int] = setting(None, "--max-steps", "stop (and save) at this global step", kind=int, resume=NOW,
                                       check=lambda v: v >= 1, rule="at least 1 (leave it out for no limit)")
    max_nonfinite: int = setting(10, "--max-nonfinite", "stop after this many non-finite losses or gradients in a row "
                                 "(those updates are skipped)", **at_least(1))
    log_every: int = setting(50, "--log-every", "steps between metrics.csv rows", **at_least(1))
    sample_every: int = setting(1000, "--sample-every", "steps between preview grids (0: never)", demo=512,
                                **at_least(0))
    tensorboard: bool = setting(False, "--tensorboard", "also log to TensorBoard (needs tensorboard)", switch="both")
    pictures: bool = setting(True, "--run-pictures", "draw run-before/after.png and the final grid (--no-run-pictures: "
                             "skip them)", switch="both")
    guide_snapshot: float = setting(0.0, "--guide-snapshot", "save the EMA weights at fraction F of the run's planned "
                                    "steps as guide.pth (for --guide; 0: no)", metavar="F", **fraction())
    dropout: float = setting(0.1, "--dropout", "dropout in the residual blocks (a training setting)", "model", demo=0.0,
                             **fraction("in [0, 1)"))
    loss_weight: str = setting("none", "--loss-weight", "per-timestep loss weight: none, or Min-SNR-gamma (Hang et al. "
                               "2023)", "diffusion", choices=LOSS_WEIGHTS)
    min_snr_gamma: float = setting(5.0, "--min-snr-gamma", "gamma of --loss-weight min-snr", "diffusion",
                                   needs=needs_recipe("--min-snr-gamma", "loss_weight", "min-snr"),
                                   check=lambda v: 0 < v <= 1e6, rule="a positive number up to 1e6")
    edm_p_mean: float = setting(-1.2, "--edm-p-mean", "--objective edm: the mean of ln sigma in training", "diffusion",
                                needs=needs_recipe("--edm-p-mean", "objective", "edm"),
                                **within(-10, 10, "in [-10, 10] (ln sigma: sigma from 4.5e-5 to 22,000)"))
    edm_p_std: float = setting(1.2, "--edm-p-std", "--objective edm: the deviation of ln sigma in training", "diffusion",
                               needs=needs_recipe("--edm-p-std", "objective", "edm"), check=lambda v: 0 < v <= 10,
                               rule="in (0, 10]")
    posthoc_ema: bool = setting(False, "--posthoc-ema", "keep EDM2's post-hoc EMA: two power-function profiles "
                                "(relative widths 0.05 and 0.10) and --posthoc-snapshots snapshots of both over the "
                                "run in ckpt/posthoc/, from which --ema-length rebuilds an EMA of any length after "
                                "training", switch="both")
    posthoc_snapshots: int = setting(32, "--posthoc-snapshots", "post-hoc EMA: snapshots over the run's planned steps "
                                     "(the disk they take is said at the start)", needs=lambda args: None if
                                     args.posthoc_ema or args.resume else "--posthoc-snapshots goes with --posthoc-ema",
                                     **within(2, 1000))
    eval_every: int = setting(0, "--eval-every", "--train: every N steps, the SWD of --eval-samples images of a fixed "
                              "seed (EMA, default sampler) against held-out images (--holdout, --eval-folders, or new "
                              "demo faces), logged to metrics.csv; the best checkpoint is kept as best.pth, and "
                              "quality.png drawn (0: off)", "evaluation", metavar="N", demo=512, **at_least(0))
    eval_samples: Optional[int] = setting(None, "--eval-samples", "images per --eval-every measurement (default: 256 up "
                                          "to 32x32, 128 above)", "evaluation", kind=int, metavar="K", demo=64,
                                          **within(2, 65536, "from 2 to 65,536"))
    preview: SampleSpec = derived("the sampling flags: how the run's pictures are sampled (kept from the run, as each "
                                  "of SampleSpec's settings says)", SampleSpec())

    def to_dict(self) -> dict:
        return asdict(self)

    def validate(self) -> "TrainConfig":
        """Fail with one line naming the flag on a value of the wrong type or out of its range."""
        check_settings(self)
        check_settings(self.preview)
        return self

    def resumed(self, stored: dict, typed: Iterable[str]) -> "TrainConfig":
        """These settings with the run's own (`stored`, a checkpoint's "train") in place of every
        setting the declarations keep from the run (RUN) and that was not typed; a typed one that differs
        is said in one line. The result is validated: a stored value of the wrong type or range raises
        DDPMError."""
        typed = set(typed)

        def keep(ckpt, stored: dict) -> dict:
            changes = {}
            for name, s in settings_of(type(ckpt)).items():
                if s.resume != RUN or name not in stored:
                    continue
                mine, theirs = getattr(ckpt, name), stored[name]
                if s.name not in typed:
                    changes[name] = float(theirs) if isinstance(mine, float) and type(theirs) is int else theirs
                elif mine != theirs:
                    def shown(v):
                        return ("on" if v == (s.switch != "off") else "off") if s.switch else v
                    log(f"resume: {s.flag} {shown(mine)} (the run used {shown(theirs)})")
            return changes
        changes = keep(self, stored)
        if isinstance(stored.get("preview"), dict):
            changes["preview"] = replace(self.preview, **keep(self.preview, stored["preview"]))
        if "grad_accum" in changes and "auto_accum" in stored:
            changes["auto_accum"] = stored["auto_accum"]
        return replace(self, **changes).validate()


# settings that checkpoints before format 4 kept in their model config ("config"), not in "train"
MOVED_TO_TRAIN = ("dropout", "loss_weight", "min_snr_gamma")


def check_recipe(cfg: ModelConfig, tc: TrainConfig, typed: Iterable[str] = ()) -> None:
    """Model and training options that do not go together, a run's own included (on --resume and a
    fine-tune, where the objective and the loss weighting come from the checkpoint): one line."""
    if cfg.objective == "edm" and tc.loss_weight != "none":
        raise DDPMError("--loss-weight min-snr is not defined for --objective edm (its loss has its own weight, "
                        "Karras et al. 2022); drop one of them")
    for s in DECLARED:
        field_, value = getattr(s.needs, "recipe", (None, None))
        have = getattr(cfg, field_, None) if hasattr(cfg, field_ or "") else getattr(tc, field_ or "", None)
        if s.name in typed and field_ and have != value:
            raise DDPMError(f"{s.flag} goes with --{field_.replace('_', '-')} {value}, and the run has {have}")


def stored_train_settings(ckpt: dict) -> dict:
    """A checkpoint's training settings: its "train" record, with what older checkpoints kept in
    their model config (MOVED_TO_TRAIN) read from there."""
    cfg = ckpt.get("config") if isinstance(ckpt.get("config"), dict) else {}
    return {**{k: cfg[k] for k in MOVED_TO_TRAIN if k in cfg}, **(ckpt.get("train") or {})}


# -- the run's state ---------------------------------------------------------------------------

class EMA:
    """Exponential moving average of the weights, with warm-up min(decay, (1 + n) / (10 + n)) at update n.
    The count n and the decay live on the device (no host value changes from step to step, so the
    update could be captured in a CUDA graph)."""

    def __init__(self, model: nn.Module, decay: float, step: int = 0):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self._ema = list(self.model.parameters())
        self._src = list(model.parameters())
        self.n = torch.full((), float(step), device=self._src[0].device)  # updates so far

    @torch.no_grad()
    def update(self) -> None:
        weight = 1.0 - torch.clamp((1 + self.n) / (10 + self.n), max=self.decay)
        lerp_all(self._ema, self._src, weight)
        self.n += 1


class PowerEMA:
    """--posthoc-ema: EDM2's power-function EMA (Karras et al. 2024, Sec. 3) of the weights for each of
    POSTHOC_WIDTHS: at update n (1, 2, ...), avg = beta avg + (1 - beta) theta with beta = (1 - 1/n)^(gamma
    + 1), which weighs theta(tau) by tau^gamma over the whole run (no warm-up needed). The count lives on
    the device, as EMA's does. Every snapshot of both, kept outside the rotation, lets --ema-length
    rebuild an EMA of any width after training (posthoc_state)."""

    def __init__(self, model: nn.Module, step: int = 0, widths: Sequence[float] = POSTHOC_WIDTHS):
        self.widths, self.gammas = tuple(widths), [power_gamma(w) for w in widths]
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        self._src = [p for p in model.parameters() if p.requires_grad]
        self.avgs = [[p.detach().clone() for p in self._src] for _ in self.widths]
        self.n = torch.full((), float(step), device=self._src[0].device)  # updates so far

    @torch.no_grad()
    def update(self) -> None:
        self.n += 1
        for gamma, avg in zip(self.gammas, self.avgs):
            lerp_all(avg, self._src, 1 - (1 - 1 / self.n) ** (gamma + 1))

    def state(self) -> dict:
        """What checkpoints and snapshots keep: the widths and each profile's average, by parameter name."""
        return {"widths": list(self.widths), "ema": [{n: a.detach().cpu().clone() for n, a in zip(self.names, avg)}
                                                     for avg in self.avgs]}

    def load(self, state: dict) -> None:
        for avg, stored in zip(self.avgs, state["ema"]):
            for a, n in zip(avg, self.names):
                a.copy_(stored[n])


class StopRequest:
    """SIGINT / SIGTERM: the first asks training to finish its step, save and exit; the second aborts
    at once (KeyboardInterrupt) without touching the files. SIGTERM is skipped where the platform
    cannot install it (e.g. some Windows setups)."""

    def __init__(self):
        self.reason: Optional[str] = None
        self.aborted = False  # the second signal came
        self._old = {}

    def _handle(self, signum, frame):
        if self.reason is not None:
            self.aborted = True
            raise KeyboardInterrupt
        self.reason = signal.Signals(signum).name
        print(f"\n{self.reason}: finishing the current step, then saving (press Ctrl-C again to abort "
              f"without saving)", file=sys.stderr, flush=True)

    def __enter__(self):
        for name in ("SIGINT", "SIGTERM"):
            with contextlib.suppress(AttributeError, ValueError, OSError):  # no such signal, not the main thread
                sig = getattr(signal, name)
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            with contextlib.suppress(ValueError, OSError):
                signal.signal(sig, old)
        return False


# the loss by noise level in metrics.csv: the images' sigma below 0.1 (fine detail, where speckle is made),
# 0.1 to 1, 1 to 10, and above 10 (the coarse layout)
NOISE_BANDS = {"loss_fine": 0.1, "loss_detail": 1.0, "loss_shape": 10.0, "loss_coarse": math.inf}


class MetricsLog:
    """metrics.csv (one row per --log-every steps) and events.csv (checkpoints, previews) in the
    checkpoint folder; a resumed run first drops rows past its step, so no step is logged twice."""

    METRICS = ["step", "epoch", "images_seen", "loss", "skipped", *NOISE_BANDS, "lr", "img_per_s", "swd", "swd_levels",
               "colour_mean", "colour_std", "wall_time"]
    EVENTS = ["step", "event", "path", "wall_time"]

    def __init__(self, folder: Path, start_step: int, enabled: bool, tensorboard: bool = False):
        self.enabled = enabled
        self.metrics = folder / "metrics.csv"
        self.events = folder / "events.csv"
        self.tb = None
        if not enabled:
            return
        try:
            folder.mkdir(parents=True, exist_ok=True)
            for path, cols in ((self.metrics, self.METRICS), (self.events, self.EVENTS)):
                rows = self._rows_until(path, start_step) if start_step > 0 else []
                text = io.StringIO(newline="")
                w = csv.DictWriter(text, cols)
                w.writeheader()
                w.writerows({c: r.get(c, "") for c in cols} for r in rows)
                atomic_write(path, lambda f: f.write(text.getvalue().encode()))  # a failure keeps the old log
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter
                # purge_step hides events at steps >= it: the checkpoint's own step stays, as in metrics.csv
                self.tb = SummaryWriter(str(folder / "tensorboard"), purge_step=start_step + 1 if start_step else None)
        except OSError as e:
            raise DDPMError(f"could not write the run's logs in {folder} ({e.strerror or first_line(e)}); the files "
                            f"there are kept; free some disk space and start again") from None

    @staticmethod
    def _rows_until(path: Path, step: int) -> List[dict]:
        """The rows of a log up to `step`. A log with damage (unreadable, no step column, a row whose
        step or loss is not a number) is kept aside under a new name, never deleted, and its good rows
        are carried into the fresh one, with one line."""
        if not path.exists():
            return []
        good, bad, why = [], 0, ""
        try:
            with open(path, newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f)
                if not reader.fieldnames or "step" not in reader.fieldnames:
                    raise ValueError("no header with a step column")
                for r in reader:
                    if MetricsLog._row_ok(r):
                        good.append(r)
                    else:
                        bad, why = bad + 1, why or f"row {reader.line_num}: step {r.get('step')!r}, loss {r.get('loss')!r}"
        except (UnicodeDecodeError, csv.Error, ValueError) as e:
            good, bad, why = [], 1, first_line(e, 80)
        if bad:
            aside = unused_name(path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}"))
            os.replace(path, aside)
            log(f"note: {path} could not be read ({why}); kept as {aside.name}, a fresh log starts"
                + (f" with its {len(good)} good rows" if good else ""))
        return [r for r in good if int(r["step"]) <= step]

    @staticmethod
    def _row_ok(r: dict) -> bool:
        """A row whose step is an integer and whose loss (if any) is a number."""
        try:
            float(r.get("loss") or 0)
        except ValueError:
            return False
        return (r.get("step") or "").isdigit()

    def _append(self, path: Path, cols: List[str], row: dict) -> None:
        """One row at the end of a log, never through a link planted at its name."""
        text = io.StringIO(newline="")
        csv.DictWriter(text, cols).writerow(row)
        flags = os.O_WRONLY | os.O_APPEND | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
        try:
            fd = os.open(str(path), flags)
            with os.fdopen(fd, "ab") as f:
                f.write(text.getvalue().encode("utf-8"))
        except OSError as e:
            raise DDPMError(f"could not write {path} ({e.strerror or first_line(e)}); free some space, then "
                            f"continue with --resume") from None

    def metric(self, **row) -> None:
        """One row of metrics.csv (the columns not given are left empty; swd_levels, a dict of size in
        pixels -> SWD, is written as "32:41.2 16:30.1"), and its scalars in TensorBoard."""
        if self.enabled:
            levels = row.pop("swd_levels", {})
            text = " ".join(f"{k}:{v:.3f}" for k, v in levels.items())
            self._append(self.metrics, self.METRICS, {**{c: row.get(c, "") for c in self.METRICS}, "swd_levels": text})
            if self.tb is not None:
                scalars = {**{k: row[k] for k in ("loss", *NOISE_BANDS, "lr", "img_per_s", "swd", "colour_mean",
                                                  "colour_std") if row.get(k, "") != ""},
                           **{f"swd_{k}px": v for k, v in levels.items()}}
                for k, v in scalars.items():
                    group = "eval" if k.startswith(("swd", "colour")) else "train"
                    self.tb.add_scalar(f"{group}/{k}", v, row["step"])

    def event(self, step: int, event: str, path: Path, image: Optional[torch.Tensor] = None) -> None:
        if self.enabled:
            self._append(self.events, self.EVENTS, {"step": step, "event": event, "path": str(path),
                                                    "wall_time": round(time.time(), 3)})
            if self.tb is not None and image is not None:
                self.tb.add_image(event, image, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


class Stop(enum.Enum):
    """Why fit() returned."""

    DONE = "done"                                  # the planned epochs are trained
    NOTHING = "nothing to do"                      # the run was already at its end
    MAX_STEPS = "max steps"
    TIME_BUDGET = "time budget"
    SIGINT = "SIGINT"
    SIGTERM = "SIGTERM"
    ELSEWHERE = "stop on another process"          # under torchrun: a signal or deadline on another rank
    ERROR = "error"                                # a write or memory failed: saved, then the error is raised

    @property
    def by_signal(self) -> bool:
        """A signal (or another process's) asked to stop: exit at once, no more pictures."""
        return self in (Stop.SIGINT, Stop.SIGTERM, Stop.ELSEWHERE)


@dataclass
class Position:
    """Where a run is: the counters saved in its checkpoints. end_epoch: the epoch it stops before."""

    step: int = 0
    epoch: int = 0
    epoch_step: int = 0     # steps into the current epoch
    images_seen: int = 0
    end_epoch: int = 0

    def roll_over(self, steps_per_epoch: int) -> bool:
        """Start the next epoch if this one is complete; whether it did."""
        if self.epoch_step < steps_per_epoch:
            return False
        self.epoch, self.epoch_step = self.epoch + 1, 0
        return True


class LossStats:
    """Device-side sums of the loss and of skipped (non-finite) steps, read only at sync points, so
    the hot path has no host sync: since the last log line, since the epoch began, and in all; and
    since the last log line, this process's per-image losses and counts by noise level (NOISE_BANDS)."""

    NAMES = ("loss_sum", "good_steps", "epoch_loss_sum", "epoch_good", "bad_total", "bad_run", "bad_run_max")

    def __init__(self, device: torch.device):
        # one tensor (NAMES), so that an update is a handful of kernels
        self.acc = torch.zeros(len(self.NAMES), device=device)
        for i, name in enumerate(self.NAMES):
            setattr(self, name, self.acc[i])  # views: zero_() and item() work on them
        self.bands = torch.zeros(2, len(NOISE_BANDS), device=device)  # sums, counts
        self.edges = torch.tensor(list(NOISE_BANDS.values())[:-1], device=device)

    def add_bands(self, sigma: torch.Tensor, per_image: torch.Tensor, bands: torch.Tensor) -> None:
        """A micro-batch's per-image losses into `bands` (2, n_bands), by their noise levels sigma: (B,)."""
        k = torch.bucketize(sigma.float(), self.edges, right=True)
        bands[0].index_add_(0, k, per_image.float())
        bands[1].index_add_(0, k, torch.ones_like(per_image, dtype=torch.float32))

    def band_means(self) -> dict:
        """Host sync: the mean loss per noise level since the last call ("" where no image fell in one)."""
        sums, counts = self.bands.tolist()
        self.bands.zero_()
        return {name: round(s / c, 6) if c else "" for name, s, c in zip(NOISE_BANDS, sums, counts)}

    def add(self, loss: torch.Tensor, bad: torch.Tensor, bands: Optional[torch.Tensor] = None) -> None:
        """One update: its loss (not counted where bad = 1, a skipped step), and its losses by noise level."""
        if bands is not None:
            self.bands += bands * (1 - bad)
        loss = torch.where(bad > 0, torch.zeros_like(loss), loss)
        good = 1 - bad
        self.acc[:5] += torch.stack([loss, good, loss, good, bad])
        self.acc[5] = (self.acc[5] + 1) * bad
        self.acc[6] = torch.maximum(self.acc[6], self.acc[5])


@dataclass
class Clock:
    """Wall times and steps at the last log line and the epoch's start, for img/s."""

    t_log: float = 0.0
    step_log: int = 0
    t_epoch: float = 0.0
    step_epoch: int = 0
    t_start: float = field(default_factory=time.time)  # this process's fit began

    def restart(self, step: int) -> None:
        self.t_log = self.t_epoch = time.time()
        self.step_log = self.step_epoch = step


KEEP_CHECKPOINTS = 5  # ckpt-{epoch % 5}.pth: the last five epochs, as the original


def checkpoint_path(folder: Path, epoch: int) -> Path:
    """The rotating checkpoint file of `epoch`."""
    return Path(folder) / f"ckpt-{epoch % KEEP_CHECKPOINTS}.pth"


def oom_split(micro: int, accum: int) -> Tuple[int, int]:
    """After CUDA out-of-memory: half the micro-batch, twice the accumulation (same effective batch)."""
    if micro < 2 or micro % 2:
        raise TrainingError(f"CUDA out of memory even at micro-batch {micro}; lower --batch-size or --img-size")
    return micro // 2, accum * 2


# -- quality during training --------------------------------------------------------------------

class QualityProbe:
    """--eval-every: every `every` steps, n images of a fixed seed from the EMA weights (the default
    sampler) are compared by SWD (x1e3, lower is better) with n fixed held-out images, beside the
    floor: n other held-out images against the same n. The best so far is kept as best.pth. On rank
    0 only; `seconds` counts the time spent."""

    def __init__(self, held: torch.Tensor, n: int, every: int, seed: int, what: str):
        self.real, other = two_real_sets(held, n, seed, 11, what, "--eval-every", "--eval-samples")
        n = len(self.real)
        self.n, self.every, self.seed, self.what = n, every, seed, what
        self.floors = self.compare(other)  # real vs real: each figure's floor for this n
        self.floor = self.floors["swd"]
        self.spec = SampleSpec()  # the default sampler: what users sample with
        # how it measures, in one value: the images compared against, the floor's images, the seed of the
        # samples and the sampler; a best.pth measured otherwise is never replaced by this probe's best
        h = hashlib.sha256(json.dumps([n, seed, self.spec.to_dict(), "fixed places"]).encode())
        for imgs in (self.real, other):
            h.update(imgs.contiguous().numpy().tobytes())
        self.key = h.hexdigest()[:16]
        self.best_step: Optional[int] = None
        self.best_swd: Optional[float] = None
        self.seconds, self.count = 0.0, 0

    def compare(self, imgs: torch.Tensor) -> dict:
        """imgs against the held-out images: the SWD (x1e3; "swd" the mean, "levels" per pyramid level by
        size in pixels, finest first), its patches read at the same places every time (so that one
        set measured twice gives the same number, and a small change a small one), and the colour gap
        that SWD cannot see (colour_gap: "colour_mean", "colour_std", 8-bit levels)."""
        r, c = swd(imgs, self.real, self.seed, fixed=True), colour_gap(imgs, self.real)
        return {"swd": r["mean"], "levels": dict(zip(r["sizes"], r["per_level"])), "colour_mean": c["mean"],
                "colour_std": c["std"]}

    def measure(self, model: GaussianDiffusion, rt: Runtime) -> dict:
        """The model's n samples against the held-out images (see compare; host sync)."""
        t0 = time.time()
        fake = generate(model, rt, list(range(self.n)), self.seed, self.spec, batch_size=min(self.n, 128),
                        show_progress=False)
        out = self.compare(fake)
        self.seconds, self.count = self.seconds + time.time() - t0, self.count + 1
        return out

    def estimate(self, model: GaussianDiffusion, rt: Runtime) -> float:
        """Seconds one measurement will take: one sampling step of a batch, timed, times the steps and
        batches (the SWD itself is a small part)."""
        b = min(self.n, 128)
        x = torch.zeros(b, self.real.shape[1], self.real.shape[2], self.real.shape[3], device=rt.device)
        t = torch.full((b,), model.timesteps // 2, device=rt.device, dtype=torch.long)
        net = sampling_net(model, rt)
        with torch.inference_mode():
            net(x, t)  # warm-up
            t0 = time.time()
            net(x, t)
        per_step = time.time() - t0
        return per_step * model.calls(self.spec) * math.ceil(self.n / b) * 1.1

    def record(self) -> dict:
        """What checkpoints keep of it: the best step and SWD, the floor, the held-out set's size and
        name, and its key (how it measures)."""
        return {"best_step": self.best_step, "best_swd": self.best_swd, "floor": self.floor, "n": self.n,
                "every": self.every, "key": self.key, "what": self.what,
                "floor_levels": {str(k): v for k, v in self.floors["levels"].items()}}

    def restore(self, rec: Optional[dict]) -> Optional[str]:
        """A continued run's best so far, where its checkpoint recorded one measured the same way (the
        same key); otherwise the best starts again and the reason is returned, for one line."""
        if not isinstance(rec, dict) or not isinstance(rec.get("best_swd"), (int, float)):
            return None
        if rec.get("key") != self.key:
            return (f"the run's best (SWD {rec['best_swd']:.2f} at step {rec.get('best_step')}) was measured with "
                    f"{rec.get('n')} samples against {rec.get('what') or 'another held-out set'}, this run measures "
                    f"with {self.n} against {self.what}")
        self.best_step, self.best_swd = rec.get("best_step"), float(rec["best_swd"])
        return None


# -- the pictures of a run -----------------------------------------------------------------------

class RunPictures:
    """Every picture a training run draws, on rank 0, into its output folder (see output_folder):
    run-before.png before the first step (x_T -> x_0 strips of 8 images, raw weights); a grid of
    16 images from the same noise every --sample-every steps (preview/step-NNNNNNN.png); at the end
    loss.png (and quality.png with --eval-every), and unless a signal stopped the run, run-after.png (the strips, EMA weights) and
    final-grid.png (`final` images). All sampled as the run's preview SampleSpec says (the sampling
    flags). strips=False (--no-run-pictures) leaves out run-before, run-after and the final grid."""

    def __init__(self, folder: Path, final: int = 64, strips: bool = True):
        self.folder, self.final, self.strips = Path(folder), final, strips and is_rank0()

    @staticmethod
    def memory(name: str):
        return memory_or(f"out of memory drawing {name}; free memory, or leave the run's pictures out "
                         f"(--no-run-pictures, --sample-every 0)")

    def before(self, tr: "Trainer") -> None:
        if self.strips:
            with self.memory("run-before.png"):
                strips = reverse_strip(tr.sampling_view(ema=False), tr.rt.local(), tr.seed, 8, tr.tc.preview)
            save_png(upscale(strips, 2), self.folder / "run-before.png")

    def preview(self, tr: "Trainer", metrics: MetricsLog, n: int = 16) -> Path:
        with self.memory("a preview"):
            imgs = generate(tr.sampling_view(ema=True), tr.rt.local(), list(range(n)), tr.seed, tr.tc.preview,
                            batch_size=n, show_progress=False)
        grid = image_grid(imgs, nrow=math.ceil(math.sqrt(n)))
        path = self.folder / "preview" / f"step-{tr.pos.step:07d}.png"
        save_picture(grid, tr.cfg, path)
        metrics.event(tr.pos.step, "preview", path, image=grid)
        return path

    def after(self, tr: "Trainer", ckpt_dir: Path, stop: Stop) -> None:
        if not is_rank0():
            return
        floors = probe_floors(tr.probe.record()) if tr.probe is not None else None
        for name, column in [("loss.png", "loss")] + ([("quality.png", "swd")] if tr.probe is not None else []):
            why = write_curve(ckpt_dir / "metrics.csv", self.folder / name, column, floors, tr.cfg.objective)
            if why:
                log(f"note: {why}")
        if self.strips and not stop.by_signal:
            model, spec = tr.sampling_view(ema=True), tr.tc.preview
            with self.memory("run-after.png"):
                strips = reverse_strip(model, tr.rt.local(), tr.seed, 8, spec)
            save_png(upscale(strips, 2), self.folder / "run-after.png")
            with self.memory("final-grid.png"):
                grid = image_grid(generate(model, tr.rt.local(), list(range(self.final)), tr.seed, spec))
            save_picture(grid, tr.cfg, self.folder / "final-grid.png")
            log(f"wrote {self.folder / 'run-before.png'}, {self.folder / 'run-after.png'} and "
                f"{self.folder / 'final-grid.png'}")


# -- the trainer ---------------------------------------------------------------------------------

class Trainer:
    """One training run: model, EMA, optimizer, data order and RNG, all saved and restored together.

    Its state: the settings (tc, cfg), the runtime (rt), the data (batches) and the seed; the modules
    (model, ema, opt, scaler; train_model wraps model in DDP under torchrun, compiled_model compiles
    that); the batch layout (batch, micro, accum, steps_per_epoch); where the run is (pos, a
    Position, saved in every checkpoint); the device-side loss sums (stats) and the clocks (clock);
    while fit runs, the signals (stop) and a deferred error (failure)."""

    def __init__(self, tc: TrainConfig, rt: Runtime, cfg: ModelConfig, batches: Batches, seed: int,
                 resume: Optional[dict] = None, init: Optional[dict] = None, run_id: Optional[str] = None,
                 data: Optional[dict] = None):
        """tc: the training settings; cfg: the model; batches: the data (see Batches); seed: everything
        random; resume: a checkpoint to continue exactly; init: one to fine-tune from (weights, EMA
        and counters, a fresh optimizer); run_id and data: recorded in every checkpoint."""
        self.tc, self.rt, self.cfg, self.batches, self.seed = tc, rt, cfg, batches, seed
        self.run_id = run_id or new_run_id()
        self.data_record = data or {}
        self._build(resume or init)
        self._lay_out_batches()
        self.pos = Position(end_epoch=tc.epochs)
        self.noise_gen = torch.Generator(rt.device)
        self._seed_noise()
        if init is not None and not is_legacy_state_dict(init):  # fine-tune: continue the counters
            self.pos = Position(int(init.get("step", 0)), int(init.get("epoch", 0)), 0, int(init.get("images_seen", 0)),
                                int(init.get("epoch", 0)) + tc.epochs)
            self._seed_noise(self.pos.step)
        if resume is not None:
            self._restore(resume)
        self.stats, self.clock = LossStats(rt.device), Clock()
        for avg in (self.ema, self.posthoc):
            if avg is not None:
                avg.n.fill_(self.pos.step)  # its warm-up (or profile) counts the run's updates
        self._found_inf = torch.zeros(1, device=rt.device)  # the fused finite check's flag
        self._one = torch.ones(1, device=rt.device)
        self.lr = self.lr_at(self.pos.step, self.pos.images_seen)  # the last update's rate, for the logs
        self.last_loss: Optional[float] = resume.get("last_loss") if resume else None
        self.first_step = self.pos.step
        self.sync_every = 1 if rt.device.type == "cpu" else max(1, min(tc.log_every, 25))
        self.step_loss: Optional[torch.Tensor] = None  # this step's loss, on the device
        self.stop: Optional[StopRequest] = None        # while fit runs: the signals asking it to stop
        self.failure: Optional[DDPMError] = None       # an error that stops the run after a checkpoint
        self.probe: Optional[QualityProbe] = None      # while fit runs with --eval-every
        self.quality_record = (resume or init or {}).get("quality")  # the best so far of a continued run

    def _seed_noise(self, *at: int) -> None:
        """Seed the two streams of training noise from (seed, *at): the diffusion noise generator
        (t and eps, the same on every process) and the global generator (dropout, per process). A
        fresh run seeds them with at = (), a run that cannot take its saved generator states with the
        step it continues from. (The initial weights have a seed of their own, in _build.)"""
        self.noise_gen.manual_seed(mix_seed(self.seed, 2, *at))
        torch.manual_seed(mix_seed(self.seed, 3, self.rt.rank, *at))

    def _build(self, source: Optional[dict]) -> None:
        """Model (weights from `source` if given), EMA, optimizer, scaler, DDP and compile wrappers."""
        rt, dev = self.rt, self.rt.device
        torch.manual_seed(mix_seed(self.seed, -1))  # initial weights from the seed, the same on every rank
        self.model = build_diffusion(self.cfg, dropout=self.tc.dropout).to(dev)
        # channels_last pays only under torch.compile: eager GroupNorm returns the standard layout,
        # so every convolution would convert back and forth (rt.channels_last overrides, for measuring)
        self.channels_last = (dev.type == "cuda" and rt.compile) if rt.channels_last is None else rt.channels_last
        self.graphs = rt.graphs
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        if source is not None:
            state = source if is_legacy_state_dict(source) else source["model"]
            load_weights(self.model, state, Path("checkpoint"), weights_fix(source))
        self.ema = EMA(self.model, self.tc.ema_decay) if self.tc.ema_decay > 0 else None
        if self.ema is not None and source is not None and not is_legacy_state_dict(source) and source.get("ema"):
            self.ema.model.load_state_dict(source["ema"])
        self.posthoc = PowerEMA(self.model) if self.tc.posthoc_ema else None
        stored = source.get("posthoc") if source is not None and not is_legacy_state_dict(source) else None
        if self.posthoc is not None and isinstance(stored, dict) and stored.get("widths") == list(self.posthoc.widths):
            self.posthoc.load(stored)  # the run's own profiles go on; a run that starts them starts from its weights
        # Adam, fused where torch has it for the device, with its rate a device tensor
        params = [p for p in self.model.parameters() if p.requires_grad]
        try:
            self.opt, self.fused = torch.optim.Adam(params, lr=torch.tensor(self.tc.lr, device=dev), fused=True), True
        except (RuntimeError, TypeError, ValueError):
            self.opt, self.fused = torch.optim.Adam(params, lr=self.tc.lr), False
        self.scaler = torch.amp.GradScaler(dev.type, enabled=rt.precision == "fp16")
        self.train_model = self.model
        if rt.distributed:
            self.train_model = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[dev.index] if dev.type == "cuda" else None)
        self.compiled_model = self._compiled()

    def _compiled(self):
        """The training module, compiled as the runtime says (or itself). Under CUDA graphs the gradients
        are allocated once and only zeroed between updates, so that accumulation adds into the same
        memory at every step instead of taking the graph's output buffers (which the next replay reuses)."""
        if not self.rt.compile:
            return self.train_model
        if self.graphs:
            for p in self.model.parameters():
                if p.requires_grad and p.grad is None:
                    p.grad = torch.zeros_like(p)
        return torch.compile(self.train_model, mode=self.rt.compile_mode if self.graphs else None)

    def _lay_out_batches(self) -> None:
        """Global batch B = world * micro * accum; on a GPU the micro-batch and the data's place follow
        from the memory left once the model, EMA and optimizer exist."""
        self.batch, self.accum = self.tc.batch_size, self.tc.grad_accum
        self.micro = self.batch // self.rt.world // self.accum
        self.memory_note = ""
        if self.rt.device.type == "cuda":
            per_image, fixed = activation_bytes(self.model, self.rt, self.cfg)
            n_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters() if p.requires_grad)
            # gradients and Adam's two moments come with the first step; every rank must keep the same
            # layout, so under torchrun the flags decide it
            plan = plan_memory(cuda_free_bytes(self.rt.device), 3 * n_bytes, per_image, fixed, self.batch // self.rt.world,
                               self.accum, self.tc.auto_accum and not self.rt.distributed, self.batches.nbytes)
            self.micro, self.accum, self.memory_note = plan.micro, plan.accum, plan.note
            self.batches.place(plan.data_on_device)
        elif self.rt.device.type != "cpu":
            self.batches.place(True)
        self.steps_per_epoch = max(1, self.batches.n // self.batch)

    # -- checkpoint state -----------------------------------------------------------------------
    def state_dict(self, collective: bool = True) -> dict:
        """The whole run, as checkpoints hold it. collective=False (rank 0 alone, for best.pth): only
        this process's generator states."""
        cpu = torch.get_rng_state()  # every process's generator states (collective under torchrun)
        cuda = torch.cuda.get_rng_state(self.rt.device) if self.rt.device.type == "cuda" else None
        states = [(cpu, cuda)]
        if self.rt.distributed and collective:
            states = [None] * self.rt.world
            dist.all_gather_object(states, (cpu, cuda))
        rng = {"noise": self.noise_gen.get_state(), "device": self.rt.device.type, "torch": [st[0] for st in states],
               "cuda": [st[1] for st in states]}
        pos = self.pos
        return {
            "format": FORMAT, "version": FORMAT_VERSION, "config": self.cfg.to_dict(),
            "model": self.model.state_dict(),
            "ema": self.ema.model.state_dict() if self.ema is not None else None,
            "optimizer": self.opt.state_dict(), "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "step": pos.step, "epoch": pos.epoch, "epoch_step": pos.epoch_step, "end_epoch": pos.end_epoch,
            "images_seen": pos.images_seen, "seed": self.seed, "world_size": self.rt.world, "rng": rng,
            "last_loss": self.last_loss, "run_id": self.run_id, "data": self.data_record,
            "holdout": self.data_record.get("holdout"),
            "train": {**self.tc.to_dict(), "epochs": pos.end_epoch, "data_folders": self.data_record.get("folders", []),
                      "demo": not self.data_record.get("folders")},
            "torch_version": str(torch.__version__),  # a plain str: TorchVersion is refused by weights_only
            "quality": self.probe.record() if self.probe is not None else self.quality_record,
            "posthoc": self.posthoc.state() if self.posthoc is not None else None,
        }

    def _restore(self, ckpt: dict) -> None:
        try:
            self.opt.load_state_dict(ckpt["optimizer"])
        except (ValueError, RuntimeError, KeyError, TypeError, IndexError) as e:
            raise DDPMError(f"the checkpoint's optimizer state does not fit the model ({first_line(e, 80)}); the file "
                            f"was edited or is damaged") from None
        # Adam's moments keep the memory layout they were saved in; a run resumed with compile on or
        # off (channels_last or not) gets them in its parameters' layout, as fused Adam requires
        for p in self.model.parameters():
            state = self.opt.state.get(p, {})
            for k, v in state.items():
                if isinstance(v, torch.Tensor) and v.shape == p.shape and v.stride() != p.stride():
                    state[k] = torch.empty_like(p, dtype=v.dtype).copy_(v)
        self._set_lr(self.tc.lr)
        if ckpt.get("scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(ckpt["scaler"])
        self.pos = Position(int(ckpt["step"]), int(ckpt["epoch"]), int(ckpt.get("epoch_step", 0)),
                            int(ckpt.get("images_seen", 0)), self.pos.end_epoch)
        self._continue_epoch(ckpt)
        if ckpt.get("seed") != self.seed:  # a typed --seed (said in one line): the noise follows it from here
            self._seed_noise(self.pos.step)
        else:
            self._restore_rng(ckpt.get("rng") or {})

    def _continue_epoch(self, ckpt: dict) -> None:
        """Where in its epoch a resumed run goes on. The same data and batch: exactly where it stopped.
        Another batch size: at the same image of the epoch. Other data (--resume-with-new-data): an
        epoch cut short is closed, and the next starts on the new images. Each change said in one line."""
        pos = self.pos
        if not pos.epoch_step:
            return
        rec, held = ckpt.get("data") or {}, ckpt.get("holdout") or {}
        n_before = rec.get("images", 0) - held.get("n", 0) if rec.get("images") else None
        b_before = (ckpt.get("train") or {}).get("batch_size", self.batch)
        if n_before is not None and n_before != self.batches.n:
            log(f"resume: the data changed ({self.batches.n} training images, the run had {n_before}); epoch "
                f"{pos.epoch} ends here and epoch {pos.epoch + 1} starts on the new images")
            pos.roll_over(0)
        elif b_before != self.batch:
            pos.epoch_step = pos.epoch_step * b_before // self.batch
            log(f"resume: batch {self.batch} (the run used {b_before}); epoch {pos.epoch} goes on at image "
                f"{pos.epoch_step * self.batch} of its order")

    def _restore_rng(self, rng: dict) -> None:
        """The saved generators, where this run can take them: a run on another device type (CPU and
        CUDA generator states differ) reseeds both streams from (seed, step), one with another number
        of processes the dropout stream alone, each with a note; the data order follows (seed, epoch)."""
        dev, step = self.rt.device.type, self.pos.step
        saved = rng.get("device") or ("cuda" if any(c is not None for c in rng.get("cuda", [])) else "cpu")
        if saved != dev:
            log(f"note: the checkpoint was written on {saved} and this run is on {dev}; the diffusion and "
                f"dropout noise are reseeded from the step (the data order still follows)")
            self._seed_noise(step)
            return
        if "noise" in rng:
            self.noise_gen.set_state(rng["noise"])
        if len(rng.get("torch", [])) == self.rt.world:
            torch.set_rng_state(rng["torch"][self.rt.rank])
            if dev == "cuda" and rng["cuda"][self.rt.rank] is not None:
                torch.cuda.set_rng_state(rng["cuda"][self.rt.rank], self.rt.device)
        else:
            log(f"note: the checkpoint was written by {len(rng.get('torch', []))} processes and this run has "
                f"{self.rt.world}; dropout noise is reseeded (data order and diffusion noise still follow)")
            torch.manual_seed(mix_seed(self.seed, 3, self.rt.rank, step))

    def save(self, path: Path, log_: Optional[MetricsLog] = None) -> None:
        """Rank 0 writes (atomically); every rank waits for it. Weights that are not finite are never
        written, and a write that fails (a full disk) leaves the checkpoints already there as they were."""
        if not self.weights_finite():
            raise TrainingError(f"the weights stopped being finite at step {self.pos.step}; not saved. Lower --lr; "
                                f"the last checkpoint is kept")
        state = self.state_dict()  # collective under torchrun
        if is_rank0():
            save_or_explain(path, state, self.stop is not None and self.stop.aborted)
            if log_ is not None:
                self._write_or_defer(log_.event, self.pos.step, "checkpoint", path)
        barrier(self.rt)

    def sampling_view(self, ema: bool = True) -> GaussianDiffusion:
        """The EMA (or raw) model in eval mode, for pictures; fit() puts the raw one back in training mode."""
        return (self.ema.model if ema and self.ema is not None else self.model).eval()

    # -- one optimisation step ------------------------------------------------------------------
    def train_step(self) -> None:
        """Forward/backward over the accumulation micro-batches, then one (maybe skipped) update.

        On CUDA out-of-memory the micro-batch is halved and the step retried with the same images,
        t and noise. The retry happens outside the `except` block: the exception's traceback holds
        the failed attempt's frames, and with them its activations, until the block is left."""
        B = self.batch
        C, S = self.cfg.img_channels, self.cfg.img_size
        self.pos.roll_over(self.steps_per_epoch)
        start = self.pos.epoch_step * B
        # t and noise for the whole global batch, from one generator: N processes = one process
        t_all = self.model.training_noise_levels(B, self.rt.device, self.noise_gen, self.tc.edm_p_mean, self.tc.edm_p_std)
        noise_all = torch.randn((B, C, S, S), device=self.rt.device, generator=self.noise_gen)
        while True:
            try:
                self._forward_backward(start, t_all, noise_all)
                break
            except torch.OutOfMemoryError:
                if self.rt.distributed:  # one rank alone cannot change the batch layout of all of them
                    raise TrainingError(f"CUDA out of memory on rank {self.rt.rank} at micro-batch {self.micro}; "
                                        f"restart with --grad-accum {self.accum * 2}") from None
            self._free_failed_attempt()
            self.micro, self.accum = oom_split(self.micro, self.accum)
            log(f"note: CUDA out of memory; retrying with micro-batch {self.micro} x {self.accum} accumulation "
                f"steps (effective batch unchanged: {B})")
        self._update()

    def _free_failed_attempt(self) -> None:
        """Drop what a failed forward/backward left: gradients, the partial loss, cached blocks. Under
        CUDA graphs also the graphs and their memory pool: the next micro-batch is a new shape, which
        records new graphs."""
        self.opt.zero_grad(set_to_none=True)
        self.step_loss = None
        if self.graphs:
            torch.compiler.reset()
            self.compiled_model = self._compiled()
        gc.collect()
        if self.rt.device.type == "cuda":
            torch.cuda.empty_cache()

    def _forward_backward(self, start: int, t_all: torch.Tensor, noise_all: torch.Tensor) -> None:
        rt = self.rt
        share = self.micro * self.accum
        self.step_loss = torch.zeros((), device=rt.device)
        self.step_bands = torch.zeros(2, len(NOISE_BANDS), device=rt.device)
        for k in range(self.accum):
            off = rt.rank * share + k * self.micro
            x = self.batches.get(self.pos.epoch, start + off, self.micro)
            t, noise = t_all[off:off + self.micro], noise_all[off:off + self.micro]
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
                noise = noise.contiguous(memory_format=torch.channels_last)
            sync = self.train_model.no_sync() if rt.distributed and k < self.accum - 1 else contextlib.nullcontext()
            if self.graphs:  # a new replay: the previous one's outputs (loss) have been read
                torch.compiler.cudagraph_mark_step_begin()
            with sync:
                with rt.autocast():
                    loss, per = self.compiled_model(x, t, noise, self.model.loss_weights(t, self.tc.loss_weight,
                                                                                           self.tc.min_snr_gamma),
                                                    per_image=True)
                self.scaler.scale(loss / self.accum).backward()
            self.step_loss += loss.detach().float() / self.accum
            self.stats.add_bands(self.model.noise_level(t), per, self.step_bands)

    def lr_at(self, step: int, images_seen: int) -> float:
        """--lr with linear warm-up over --warmup-steps, then constant (the original) or a cosine decay
        to zero at the end of the run's last epoch (--lr-schedule cosine), counted in images, so that a
        run resumed with another batch size follows the same curve; --max-steps does not move it, so a
        run stopped early and resumed follows the same schedule."""
        tc = self.tc
        lr = tc.lr * min(1.0, (step + 1) / tc.warmup_steps) if tc.warmup_steps else tc.lr
        if tc.lr_schedule == "cosine":
            total = self.pos.end_epoch * self.steps_per_epoch * self.batch
            lr *= 0.5 * (1 + math.cos(math.pi * min(1.0, images_seen / max(1, total))))
        return lr

    def _update(self) -> None:
        """One optimizer step, skipped on the device (no host sync) when the loss or the gradients
        are not finite; the skip is counted, and the loss of a skipped step is left out of the logs."""
        self.lr = self.lr_at(self.pos.step, self.pos.images_seen)
        self._set_lr(self.lr)
        if self.rt.distributed:  # the global batch's loss on every rank: logged, and the same skip decision
            dist.all_reduce(self.step_loss)
            self.step_loss /= self.rt.world
        if self.scaler.is_enabled():  # fp16: the scaler skips overflowing steps itself (routine, not counted)
            bad = (~torch.isfinite(self.step_loss)).float()
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            # one fused check of every gradient for inf and NaN into a device flag (the kernel GradScaler
            # uses, unscaling by 1), or-ed with the loss's own check
            grads = [p.grad for p in self.model.parameters() if p.grad is not None]
            self._found_inf.copy_((~torch.isfinite(self.step_loss)).float().view(1))
            flag_nonfinite(grads, self._found_inf, self._one)
            bad = self._found_inf[0].clamp(max=1.0)
            step_unless(self.opt, bad, self.fused)
        self.stats.add(self.step_loss, bad, self.step_bands)
        self.opt.zero_grad(set_to_none=not self.graphs)  # under CUDA graphs the gradients keep their addresses
        if self.ema is not None:
            self.ema.update()
        if self.posthoc is not None:
            self.posthoc.update()
        self.pos.step += 1
        self.pos.epoch_step += 1
        self.pos.images_seen += self.batch

    def _set_lr(self, lr: float) -> None:
        """Adam's rate: fused Adam holds it on the device, filled in place (no new host value per step)."""
        for g in self.opt.param_groups:
            if self.fused:
                if not isinstance(g["lr"], torch.Tensor):
                    g["lr"] = torch.tensor(float(g["lr"]), device=self.rt.device)
                g["lr"].fill_(lr)
            else:
                g["lr"] = lr

    def weights_finite(self) -> bool:
        """Host sync: whether every weight is finite (and their norm does not overflow)."""
        return all_finite(list(self.model.parameters()))

    def check_health(self) -> None:
        """Host sync: stop after --max-nonfinite non-finite updates in a row, or at once if the weights
        stop being finite. Nothing is saved then: the last checkpoint, written while the run was
        healthy, is kept."""
        n, stats = self.tc.max_nonfinite, self.stats
        if stats.bad_run_max.item() >= n:
            raise TrainingError(f"{n} non-finite losses or gradients in a row at step {self.pos.step} "
                                f"({int(stats.bad_total.item())} in all); lower --lr. The last checkpoint is kept")
        stats.bad_run_max.zero_()
        if not self.weights_finite():
            raise TrainingError(f"the weights stopped being finite at step {self.pos.step}; lower --lr. "
                                f"The last checkpoint is kept")

    # -- the loop -------------------------------------------------------------------------------
    def fit(self, ckpt_dir: Path, deadline: Optional[float] = None, pictures: Optional[RunPictures] = None,
            probe: Optional[QualityProbe] = None) -> Stop:
        """Train until the epochs, --max-steps, the time budget or a signal end it, drawing the run's
        `pictures` and measuring its quality with `probe` (--eval-every); returns why it stopped. An
        error on the way (a preview or log that cannot be written, memory running out) saves the last
        good state first, then raises its one-line error: no trained step is thrown away."""
        tc, pos = self.tc, self.pos
        if pos.step >= (tc.max_steps or float("inf")) or pos.epoch >= pos.end_epoch:
            self._say_nothing_to_do()
            return Stop.NOTHING
        if self.posthoc is not None and is_rank0():
            self._plan_posthoc(ckpt_dir)
        if pictures is not None:
            pictures.before(self)
        metrics = MetricsLog(ckpt_dir, pos.step, is_rank0(), tc.tensorboard)
        self.probe, self.clock.t_start = (probe if is_rank0() else None), time.time()
        if self.probe is not None:
            self._start_probe(ckpt_dir, metrics)
        if tc.guide_snapshot and is_rank0():
            self._plan_guide(ckpt_dir, metrics)
        self.first_step = pos.step
        self.model.train()  # run-before.png and the probe (rank 0 only) left it in eval mode: dropout on, every rank
        self.clock.restart(pos.step)
        try:
            with StopRequest() as self.stop, make_progress() as progress:
                stop = self._loop(ckpt_dir, metrics, pictures, progress, deadline)
        finally:
            metrics.close()
            self.stop = None
        if self.probe is not None and self.probe.count:
            p, dt = self.probe, max(time.time() - self.clock.t_start, 1e-9)
            log(f"eval: {p.count} evaluations took {p.seconds:.0f} s, {100 * p.seconds / dt:.0f}% of the run's "
                f"{format_duration(dt)}; best SWD {p.best_swd:.2f} at step {p.best_step} (best.pth)")
        if self.posthoc is not None and is_rank0() and pos.step > self.first_step and stop != Stop.ERROR:
            self._write_or_defer(self._save_posthoc, ckpt_dir)  # the run's last step, where it stopped
        done, bad = pos.step - self.first_step, int(self.stats.bad_total.item())
        if done and bad >= done:
            raise TrainingError(f"every one of the {done} steps was skipped (a non-finite loss or gradient), so nothing "
                                f"was trained: the weights are those of step {self.first_step}. Lower --lr"
                                + (" or bring --edm-p-mean/--edm-p-std nearer -1.2/1.2" if self.cfg.objective == "edm"
                                   else ""))
        if tc.guide_snapshot and pos.step < self.guide_step():
            log(f"guide: not saved yet; the snapshot ({tc.guide_snapshot:g} of the run) is due at step "
                f"{self.guide_step()}: continue with --resume to reach it")
        if pos.step == self.first_step and stop == Stop.DONE:
            self._say_nothing_to_do()
        elif stop != Stop.DONE:
            log(f"stopped ({stop.value}) at step {pos.step}, epoch {pos.epoch}; checkpoint saved in {ckpt_dir}; "
                + ("mend the cause, then " if self.failure else "") + "continue with --resume")
        if self.failure is not None:
            raise self.failure
        if pictures is not None:
            pictures.after(self, ckpt_dir, stop)
        return stop

    def _say_nothing_to_do(self) -> None:
        tc, pos = self.tc, self.pos
        log(f"nothing to do: the run is at step {pos.step}, epoch {pos.epoch} of {pos.end_epoch}"
            + (f", --max-steps {tc.max_steps}" if tc.max_steps else "") + "; raise --epochs or --max-steps")

    def _loop(self, ckpt_dir: Path, metrics: MetricsLog, pictures: Optional[RunPictures], progress,
              deadline: Optional[float]) -> Stop:
        """The steps, each followed by its health check, log row, preview and stop check; a checkpoint at
        each epoch end and wherever the run stops."""
        tc, pos, stop = self.tc, self.pos, Stop.DONE
        bars = (progress.add_task("Epochs", total=pos.end_epoch, completed=pos.epoch, info=""),
                progress.add_task("Batches", total=self.steps_per_epoch * self.batch,
                                  completed=pos.epoch_step * self.batch, info=""))
        while stop == Stop.DONE and pos.epoch < pos.end_epoch:
            if pos.roll_over(self.steps_per_epoch):
                continue
            if not self._step_or_fail():
                self.save(checkpoint_path(ckpt_dir, pos.epoch), metrics)
                return Stop.ERROR
            if self.rt.compile and pos.step == self.first_step + 1:  # say how long compiling took; time from here
                if self.rt.device.type == "cuda":
                    torch.cuda.synchronize(self.rt.device)
                log(f"compile: first step took {time.time() - self.clock.t_log:.1f} s (torch.compile included)")
                self.clock.restart(pos.step)
            progress.advance(bars[1], self.batch)
            if pos.step % self.sync_every == 0:
                self.check_health()
            if pos.step % tc.log_every == 0:
                self._write_or_defer(self._log_interval, metrics, progress, bars[1], deadline)
            if pictures is not None and tc.sample_every and pos.step % tc.sample_every == 0 and is_rank0():
                self._write_or_defer(pictures.preview, self, metrics)
            if self.probe is not None and pos.step % self.probe.every == 0:
                self._write_or_defer(self._evaluate, ckpt_dir, metrics, progress.print)
            if tc.guide_snapshot and pos.step == self.guide_step() and is_rank0():
                self._write_or_defer(self._save_guide, ckpt_dir, metrics, progress.print)
            if self.posthoc is not None and pos.step % self.posthoc_every() == 0 and is_rank0():
                self._write_or_defer(self._save_posthoc, ckpt_dir)
            stop = self._stop_reason(deadline)
            if pos.epoch_step >= self.steps_per_epoch:
                self._end_epoch(ckpt_dir, metrics, progress, bars)
            elif stop != Stop.DONE:
                self.save(checkpoint_path(ckpt_dir, pos.epoch), metrics)
        return stop

    def _start_probe(self, ckpt_dir: Path, metrics: MetricsLog) -> None:
        """Say what --eval-every measures and what one measurement costs (timed on one sampling step). A
        best.pth measured otherwise than this run measures (another held-out set, --eval-samples or
        seed) is moved aside at once, with one line: a best is only ever compared with its own kind."""
        p = self.probe
        why = p.restore(self.quality_record)
        best = ckpt_dir / "best.pth"
        if why and os.path.lexists(best):
            log(f"eval: {why}; {best} moved to {move_aside(ckpt_dir, [best])}, and a new best starts")
        elif why:
            log(f"eval: {why}; a new best starts")
        steps = self.sampling_view().calls(p.spec)
        log(f"eval: every {p.every} steps, {p.n} samples ({p.spec.sampler}, {steps} steps, EMA) against {p.n} held-out "
            f"images of {p.what}; real vs real {p.floor:.2f}; about {p.estimate(self.sampling_view(), self.rt.local()):.0f} s "
            f"per evaluation")

    def _evaluate(self, ckpt_dir: Path, metrics: MetricsLog, say: Optional[Callable]) -> float:
        """One --eval-every measurement: a metrics.csv row (and TensorBoard) with the SWD, its levels and
        the colour gap, and best.pth where the SWD is the lowest so far (written by rank 0 alone, with this
        process's generator states)."""
        p, pos = self.probe, self.pos
        m = p.measure(self.sampling_view(ema=True), self.rt.local())
        value = m["swd"]
        metrics.metric(step=pos.step, epoch=pos.epoch, images_seen=pos.images_seen, swd=round(value, 3),
                       swd_levels=m["levels"], colour_mean=round(m["colour_mean"], 3),
                       colour_std=round(m["colour_std"], 3), wall_time=round(time.time(), 3))
        # the best so far: recorded only for weights that are saved
        best = self.weights_finite() and (p.best_swd is None or value < p.best_swd)
        if best:
            p.best_step, p.best_swd = pos.step, value
            path = ckpt_dir / "best.pth"
            stored = peek_checkpoint(path).get("quality")
            self._save_kept(path, isinstance(stored, dict) and stored.get("key") == p.key,
                            "was measured otherwise (other held-out images, --eval-samples or seed)", say or log)
            metrics.event(pos.step, "best", path)
        if say is not None:
            f = p.floors
            levels = ", ".join(f"{k}px {v:.2f}" for k, v in m["levels"].items())
            floors = ", ".join(f"{v:.2f}" for v in f["levels"].values())
            say(f"eval at step {pos.step}: SWD {value:.2f} ({levels}; real vs real {p.floor:.2f}: {floors}), colour gap "
                f"{m['colour_mean']:.1f}/{m['colour_std']:.1f} (real {f['colour_mean']:.1f}/{f['colour_std']:.1f}); "
                + ("the best so far: best.pth" if best else f"best {p.best_swd:.2f} at step {p.best_step}"
                   if p.best_swd is not None else ""))
        return value

    def planned_steps(self) -> int:
        """The run's planned steps: its epochs', or --max-steps where that is fewer."""
        planned = self.pos.end_epoch * self.steps_per_epoch
        return min(planned, self.tc.max_steps) if self.tc.max_steps else planned

    def guide_step(self) -> int:
        """The step of --guide-snapshot: that fraction of the run's planned steps."""
        return max(1, round(self.tc.guide_snapshot * self.planned_steps()))

    def posthoc_every(self) -> int:
        """Steps between the post-hoc EMA's snapshots: --posthoc-snapshots over the run's epochs (not a
        --max-steps, which is one invocation's, so that a run stopped and resumed keeps its cadence)."""
        return max(1, math.ceil(self.pos.end_epoch * self.steps_per_epoch / self.tc.posthoc_snapshots))

    def _plan_posthoc(self, ckpt_dir: Path) -> None:
        """--posthoc-ema: say what its snapshots will take on disk, and refuse in one line, before anything is
        written, where the ones still to come need more than the disk has free."""
        every, end = self.posthoc_every(), self.planned_steps()
        to_come = end // every - self.pos.step // every + (end % every != 0)  # each due step, and the stop
        size = len(self.posthoc.widths) * sum(4 * p.numel() for p in self.posthoc._src)  # fp32, both profiles
        where = ckpt_dir / POSTHOC_DIR
        free = shutil.disk_usage(next(p for p in (where, *where.parents) if p.exists())).free
        gib = lambda n: f"{n / 2**30:,.1f} GiB" if n >= 2**30 else f"{n / 2**20:,.1f} MiB"  # noqa: E731
        if to_come * size > free:
            raise DDPMError(f"--posthoc-ema: {to_come} more snapshots of {gib(size)} each need {gib(to_come * size)} "
                            f"in {where}, and {gib(free)} is free; lower --posthoc-snapshots or free some disk space")
        log(f"post-hoc EMA: widths {' and '.join(f'{w:g}' for w in self.posthoc.widths)}, a snapshot of both every "
            f"{every} steps ({self.tc.posthoc_snapshots} over the run, {gib(size)} each: {gib(to_come * size)} to come "
            f"in {where}; {gib(free)} free)")

    def _save_posthoc(self, ckpt_dir: Path) -> None:
        """A snapshot of the post-hoc EMA's profiles at this step, ckpt/posthoc/phema-STEP.pth (rank 0), never
        over one that is there: a snapshot of a step is the same whenever the run reaches it."""
        path = ckpt_dir / POSTHOC_DIR / f"phema-{self.pos.step:07d}.pth"
        if not os.path.lexists(path):
            save_or_explain(path, {"format": FORMAT, "version": FORMAT_VERSION, "kind": "posthoc-ema",
                                   "run_id": self.run_id, "step": self.pos.step, **self.posthoc.state()})

    def _plan_guide(self, ckpt_dir: Path, metrics: MetricsLog) -> None:
        """--guide-snapshot on a continued run: say what becomes of a guide.pth that is not this run's
        snapshot at its due step (the run was given more epochs, or another fraction); where the run
        stands at that step, the snapshot is taken now."""
        path, due = ckpt_dir / "guide.pth", self.guide_step()
        step, run = checkpoint_meta(path)
        if (step, run) == (due, self.run_id):
            return
        if self.pos.step == due:
            self._save_guide(ckpt_dir, metrics, log)
        elif not os.path.lexists(path):
            return
        elif self.pos.step < due:
            log(f"guide: {path} is the snapshot of step {step}; this run's ({self.tc.guide_snapshot:g} of its planned "
                f"steps) is due at step {due}, and the earlier one will then be moved aside")
        else:
            log(f"guide: {path} (step {step}) stays; this run's snapshot ({self.tc.guide_snapshot:g} of its planned "
                f"steps) would be step {due}, which is past")

    def _save_guide(self, ckpt_dir: Path, metrics: MetricsLog, say: Callable) -> None:
        """guide.pth: this step's state (its EMA weights are what --guide uses), outside the rotation."""
        path = ckpt_dir / "guide.pth"
        if not self.weights_finite():
            return
        self._save_kept(path, checkpoint_meta(path) == (self.pos.step, self.run_id),
                        f"is not this run's snapshot (step {self.pos.step})", say)
        metrics.event(self.pos.step, "guide", path)
        say(f"guide: the EMA weights of step {self.pos.step} ({self.tc.guide_snapshot:g} of the run) saved as {path}; "
            f"sample with --guide {path} --guidance W")

    def _save_kept(self, path: Path, same: bool, what: str, say: Callable = log) -> None:
        """Write a file the run keeps outside the rotation (best.pth, guide.pth; rank 0 alone, with its own
        generator states). One already there that was not made the same way (`same` False: measured on
        other images, or a snapshot of another step) is first moved into a dated folder, with one line."""
        if os.path.lexists(path) and not same:
            old_step, _ = checkpoint_meta(path)
            say(f"{path.name}: the earlier one (step {old_step if old_step >= 0 else 'unknown'}) {what}; moved to "
                f"{move_aside(path.parent, [path])}")
        save_or_explain(path, self.state_dict(collective=False))

    def _step_or_fail(self) -> bool:
        """One training step; False (with self.failure set) where memory ran out on the CPU or, under
        torchrun, on the GPU: the weights are still those of the last update."""
        try:
            self.train_step()
            return True
        except (MemoryError, RuntimeError) as e:
            if not is_out_of_memory(e):
                raise
            self._free_failed_attempt()
            self.failure = DDPMError(f"out of memory on the {self.rt.device.type} at micro-batch {self.micro} "
                                     f"({first_line(e, 60)}); lower --batch-size or raise --grad-accum")
            return False

    def _write_or_defer(self, write: Callable, *args) -> None:
        """A write of rank 0 during training (a log row, a preview): if it fails, the run stops at the
        end of this step with a checkpoint, and then reports the failure. The model trains again after it
        (a picture or an evaluation samples through sampling_view, which puts it in eval mode where there
        is no EMA)."""
        if self.failure is None:
            try:
                write(*args)
            except (DDPMError, OSError) as e:
                self.failure = e if isinstance(e, DDPMError) else DDPMError(f"a write failed ({first_line(e)})")
            finally:
                self.model.train()

    def _log_interval(self, metrics: MetricsLog, progress, task, deadline: Optional[float]) -> None:
        """Every --log-every steps (host sync): the mean loss of the steps that were not skipped, img/s,
        one row of metrics.csv and the progress bar's text."""
        pos, stats, clock = self.pos, self.stats, self.clock
        n, good = pos.step - clock.step_log, int(stats.good_steps.item())
        loss = stats.loss_sum.item() / good if good else None
        bands = stats.band_means()
        stats.loss_sum.zero_()
        stats.good_steps.zero_()
        now = time.time()
        ips = n * self.batch / max(now - clock.t_log, 1e-9)
        clock.t_log, clock.step_log = now, pos.step
        if not is_rank0():
            return
        if loss is not None:
            self.last_loss = loss
        text = f"loss {loss:.4f}" if loss is not None else "loss: every step skipped (non-finite)"
        text += f" | {n - good} skipped" if 0 < n - good < n else ""
        left = f" | time left {format_duration(deadline - now)}" if deadline else ""
        progress.update(task, info=f"{text} | {ips:,.0f} img/s{left}")
        metrics.metric(step=pos.step, epoch=pos.epoch, images_seen=pos.images_seen,
                       loss=round(loss, 6) if loss is not None else "", skipped=n - good, **bands,
                       lr=self.lr, img_per_s=round(ips, 1), wall_time=round(now, 3))

    def _stop_reason(self, deadline: Optional[float]) -> Stop:
        """Stop.DONE to go on, else why to stop. --max-steps is the same step on every rank; clocks,
        signals and errors differ between ranks, so those are agreed at sync points."""
        if self.tc.max_steps and self.pos.step >= self.tc.max_steps:
            return Stop.MAX_STEPS
        local = (Stop.ERROR if self.failure is not None else
                 Stop.TIME_BUDGET if deadline and time.time() >= deadline else
                 Stop(self.stop.reason) if self.stop is not None and self.stop.reason else None)
        if not self.rt.distributed:
            return local or Stop.DONE
        if self.pos.step % self.sync_every == 0 and any_rank(local is not None, self.rt):
            return local or Stop.ELSEWHERE
        return Stop.DONE

    def _end_epoch(self, ckpt_dir: Path, metrics: MetricsLog, progress, bars) -> None:
        """The epoch line (mean loss over its good steps), then the epoch's rotating checkpoint."""
        pos, stats, clock = self.pos, self.stats, self.clock
        n, good = pos.step - clock.step_epoch, int(stats.epoch_good.item())
        mean = f"{stats.epoch_loss_sum.item() / good:.6f}" if good else "nan (every step skipped)"
        dt = time.time() - clock.t_epoch
        progress.print(f"[Epoch {pos.epoch}] Loss: {mean} Elapsed: {dt / 60:.2f} min "
                       f"({n * self.batch / max(dt, 1e-9):,.0f} img/s, step {pos.step})"
                       + (f"; {n - good} steps skipped (non-finite)" if 0 < n - good < n else ""))
        stats.epoch_loss_sum.zero_()
        stats.epoch_good.zero_()
        pos.roll_over(self.steps_per_epoch)
        self.save(checkpoint_path(ckpt_dir, pos.epoch - 1), metrics)
        clock.t_epoch, clock.step_epoch = time.time(), pos.step
        progress.update(bars[0], completed=pos.epoch)
        progress.reset(bars[1])


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------
# The argparse Namespace stops in this section: main() parses the flags once into the typed job they
# ask for (TrainJob, SampleJob, EditJob, InvertJob, EvalJob, InfoJob, ExportJob), each built from the
# declared settings (see Settings), and every command takes its job. Only the parser and the job
# builders below read `args`.

# -- typed jobs: each declares its own options -------------------------------------------------

EVALS = ("nll", "fid", "swd", "nearest")
MAX_GUIDANCE = 10.0  # --guidance above this only saturates (x_0 = guide + W (model - guide))
GUIDANCE = 2.0       # --guidance's default weight


@declares
@dataclass(frozen=True)
class LoadSpec:
    """Which weights a command loads: --loadckpt (a file, or a folder meaning its newest checkpoint),
    the EMA or the raw ones, and the model flags the user typed (they must agree with a checkpoint
    that knows its model, and describe a file of the original script)."""

    path: Optional[str] = setting(None, "--loadckpt", "checkpoint file (or folder: its newest) to sample from, "
                                  "fine-tune (--train) or resume (--train --resume)", "run", kind=str, name="loadckpt",
                                  commands=EVERY - {"info"})
    ema: bool = setting(True, "--no-ema", "use the raw weights instead of the EMA", "sampling", switch="off",
                        commands=SAMPLING | {"export"})
    ema_length: Tuple[float, ...] = setting(
        (), "--ema-length", "a run trained with --posthoc-ema: the EMA of this relative width (sigma_rel, such as 0.05), "
        "rebuilt from the run's post-hoc snapshots at the checkpoint's step; --eval swd takes several and says which is "
        "best", "sampling", kind=float, nargs="+", metavar="SIGMA_REL", commands=SAMPLING | {"export"},
        check=lambda v: all(0 < x < 0.3 for x in v), rule="relative widths in (0, 0.3)",
        needs=lambda args: "--ema-length rebuilds an EMA: drop --no-ema" if not args.ema else
        None if len(args.ema_length) <= 1 or args.eval == "swd" else
        "several --ema-length values go with --eval swd (which says the best); give one")
    model_flags: Tuple[Tuple[str, object], ...] = derived("the model flags typed (ModelConfig's settings)", ())

    @property
    def flags(self) -> Dict[str, object]:
        return dict(self.model_flags)

    @property
    def length(self) -> Optional[float]:
        """The one --ema-length to load with, or None."""
        return self.ema_length[0] if self.ema_length else None


@declares
@dataclass(frozen=True)
class RuntimeFlags:
    """Where and how a command runs: --device, --precision, --compile (None: decided in setup_runtime),
    --compile-mode."""

    device: Optional[str] = setting(None, "--device", "cuda, cuda:N, mps or cpu (default: the best found)", "run",
                                    kind=str, rule="cpu, cuda, cuda:N or mps",
                                    check=lambda v: re.fullmatch(r"cpu|mps|cuda(:\d+)?", v) is not None)
    precision: str = same(TrainConfig, "precision")
    compile: Optional[bool] = setting(None, "--compile", "torch.compile (default: on for CUDA training, off otherwise)",
                                      "run", switch="both", commands=PICTURES)
    compile_mode: str = setting("default", "--compile-mode", "training under --compile: default, or reduce-overhead "
                                "(CUDA graphs: fewer kernel launches from Python; not under torchrun)", "run",
                                choices=COMPILE_MODES, commands=TRAINING)


@declares
@dataclass(frozen=True)
class Outputs:
    """Where a command's pictures go (--save-dir; see output_folder) and whether earlier ones are moved aside."""

    save_dir: Path = setting(Path("output"), "--save-dir", "where images are written", "sampling", kind=str,
                             text="output", commands=EVERY - {"export"})
    overwrite: bool = setting(False, "--overwrite", "move earlier files aside into a dated old-* folder instead of "
                              "refusing (--train: another run's checkpoints; outputs in --save-dir; --export's file)",
                              "training", switch="on")


@declares
@dataclass(frozen=True)
class ModelJob:
    """What every command that samples from --loadckpt shares: the weights, where it runs, how it
    samples and where its pictures go, the guide and the seed."""

    weights: LoadSpec = derived("--loadckpt, --no-ema and the model flags")
    device: RuntimeFlags = derived("--device, --precision, --compile")
    spec: SampleSpec = derived("the sampling flags")
    out: Outputs = derived("--save-dir, --overwrite")
    guide: Optional[LoadSpec] = setting(None, "--guide", "autoguidance (Karras et al. 2024): a weaker model of the same "
                                       "data, such as the run's own early guide.pth (--guide-snapshot)", "sampling",
                                       kind=str, metavar="CKPT", commands=SAMPLING,
                                       needs=lambda args: "--eval nll measures the model's own bound, which a guide does "
                                       "not change; drop --guide (--eval swd, fid and nearest sample with it)"
                                       if args.eval == "nll" else None)
    guidance: float = setting(None, "--guidance", f"with --guide: D = D_guide + W (D_model - D_guide); 1 is the model "
                              f"alone (default: {GUIDANCE:g})", "sampling", kind=float, metavar="W", commands=SAMPLING,
                              needs=lambda args: None if args.guide else
                              "--guidance weighs a guide model: give --guide CKPT too", **within(0, MAX_GUIDANCE, f"from 0 to {MAX_GUIDANCE:g} (1 is the model alone; 1.5 to "
                                              f"3 is where autoguidance helps, far above it every pixel saturates)"))
    seed: Optional[int] = setting(None, "--seed", "seed (0 is a seed); default: random, printed", "run", kind=int,
                                  resume=RUN, commands=EVERY - {"info", "export"})


@declares
@dataclass(frozen=True)
class SampleJob(ModelJob):
    """Sampling from --loadckpt: images, and the pictures the flags ask for."""

    data: DataFlags = derived("the data flags (--forward-steps reads training images)", DataFlags())
    count: Optional[int] = setting(None, "--num-samples", "images to generate (default: --batch-size)", "sampling",
                                   kind=int, name="num_samples", demo=64, commands=EVERY - {"info", "export", "invert"},
                                   needs=lambda args: "--num-samples and --index: --index makes one image; give one of "
                                   "them" if args.index is not None else None, **at_least(1))
    index: Optional[int] = setting(None, "--index", "generate only image INDEX of --seed", "sampling", kind=int,
                                   commands={"sample"}, **at_least(0))
    batch_size: int = same(TrainConfig, "batch_size")
    reverse: bool = setting(False, "--reverse-steps", "also write reverse.png: x_T ... x_0 strips", "sampling",
                            switch="on", commands={"sample"})
    forward: bool = setting(False, "--forward-steps", "also write forward.png: q(x_t|x_0) of data", "sampling",
                            switch="on", commands={"sample"})
    gif: bool = setting(False, "--gif", "also write denoise.gif of the grid being denoised", "sampling", switch="on",
                        commands={"sample"})
    interpolate: Optional[Tuple[str, str]] = setting(
        None, "--interpolate", "also write interpolate.png: slerp between two seeds' noise, two --invert .pt files, or "
        "two image files (inverted first), then a deterministic path to each", "sampling", kind=str, nargs=2,
        metavar=("A", "B"), commands={"sample"})
    inversion_steps: Optional[int] = derived("a typed --steps, for --interpolate between images", None)


@declares
@dataclass(frozen=True)
class EditJob(ModelJob):
    """--init-images (SDEdit), with --mask inpainting (RePaint)."""

    images: Tuple[str, ...] = setting((), "--init-images", "SDEdit: noise these images to --strength, then denoise "
                                      "(--num-samples variations each)", "editing", kind=str, nargs="+", metavar="PATH",
                                      name="init_images", commands={"edit"})
    strength: Optional[float] = setting(None, "--strength", "how much of the schedule to redo, in (0, 1]: small stays "
                                        "close to the image, 1 is plain sampling (default: 0.5, or 1 with --mask)",
                                        "editing", kind=float, commands={"edit"}, check=lambda v: 0 < v <= 1,
                                        rule="in (0, 1]")
    masks: Tuple[str, ...] = setting((), "--mask", "inpainting: white = regenerate, black = keep; one for all "
                                     "--init-images or one each", "editing", kind=str, nargs="+", metavar="PATH",
                                     name="mask", commands={"edit"})
    jumps: int = setting(1, "--resample-jumps", "RePaint's resampling jumps per step (1 = off)", "editing",
                         name="resample_jumps", commands={"edit"}, needs=lambda args: None if args.mask else
                         "--resample-jumps redoes the steps of inpainting: it goes with --init-images and --mask",
                         **at_least(1))
    variations: int = same(SampleJob, "count", 1)
    batch_size: int = same(TrainConfig, "batch_size")
    background: Tuple[int, int, int] = same(DataFlags, "background")


@declares
@dataclass(frozen=True)
class InvertJob(ModelJob):
    """--invert: DDIM inversion of real images to x_T (spec: the inversion's path, inversion_spec)."""

    images: Tuple[str, ...] = setting((), "--invert", f"DDIM inversion (eta 0; {INVERT_STEPS} steps unless --steps) "
                                      "of real images to x_T: edit-invert-NAME.pt, its reconstruction "
                                      "edit-invert-NAME.png and its PSNR", "editing", kind=str, nargs="+",
                                      metavar="PATH", name="invert", commands={"invert"})
    background: Tuple[int, int, int] = same(DataFlags, "background")


@declares
@dataclass(frozen=True)
class EvalJob(ModelJob):
    """--eval nll | fid | swd | nearest on --loadckpt."""

    kind: Optional[str] = setting(None, "--eval", "evaluate --loadckpt: nll = bits/dim (variational bound), fid = "
                                  "Frechet Inception Distance (pytorch-fid), swd = sliced Wasserstein distance (no "
                                  "network, no download), nearest = nearest training images of samples (memorisation "
                                  "check)", "evaluation", choices=EVALS, name="eval", commands={"eval"})
    data: DataFlags = derived("the data flags: the real images compared with", DataFlags())
    samples: Optional[int] = same(SampleJob, "count")
    batch_size: int = same(TrainConfig, "batch_size")
    nll_timesteps: Optional[int] = setting(None, "--nll-timesteps", "nll: a stratified estimate from K of the T "
                                           "timesteps (default: all T)", "evaluation", kind=int, metavar="K",
                                           commands={"eval"}, check=lambda v: v >= 2, rule="at least 2 (t=1 for the "
                                           "decoder, one more for the KL terms)",
                                           needs=lambda args: None if args.eval == "nll" else "--nll-timesteps goes with "
                                           "--eval nll")
    fid_weights: Optional[str] = setting(None, "--fid-weights", f"the {FID_WEIGHTS_NAME} file (default: torch.hub's "
                                         "checkpoints folder; never downloaded)", "evaluation", kind=str, metavar="PATH",
                                         commands={"eval"}, needs=lambda args: None if args.eval in ("fid", "nearest") else
                                         "--fid-weights goes with --eval fid or --eval nearest")


TRAIN = Setting("--train", "train (otherwise sample from --loadckpt)", "training", False, switch="on", name="train",
                homed=True)
DECLARED.append(TRAIN)  # the command itself: a job, not a field of one


@declares
@dataclass(frozen=True)
class TrainJob:
    """--train: a fresh run, a fine-tune of --loadckpt, or --resume."""

    cfg: ModelConfig = derived("the model flags")
    train: TrainConfig = derived("the training settings")
    data: DataSource = derived("--data-folders, or --demo's faces")
    ckpt_dir: Path = setting(Path("ckpt"), "--ckpt-save-dir", "checkpoints ckpt-{epoch %% 5}.pth, metrics.csv",
                             "training", kind=str, text="ckpt", name="ckpt_save_dir", commands=TRAINING)
    out: Outputs = derived("--save-dir, --overwrite", Outputs())
    device: RuntimeFlags = derived("--device, --precision, --compile", RuntimeFlags())
    typed: frozenset = derived("the flags the user typed (a resume keeps the others)", frozenset())
    model_flags: Tuple[Tuple[str, object], ...] = derived("the model flags typed", ())
    loadckpt: Optional[str] = same(LoadSpec, "path")
    resume: bool = setting(False, "--resume", "continue the run of the newest checkpoint (by step) in --ckpt-save-dir, "
                           "or of --loadckpt, with the run's own settings and data", "training", switch="on",
                           commands=TRAINING)
    new_data: bool = setting(False, "--resume-with-new-data", "--resume on other data than the run's (other folders, or "
                             "images added or removed)", "training", switch="on", name="resume_with_new_data",
                             commands=TRAINING, needs=lambda args: None if args.resume else
                             "--resume-with-new-data goes with --train --resume")
    seed: Optional[int] = same(ModelJob, "seed")
    time_budget: Optional[float] = setting(None, "--time-budget", "stop (and save) after this wall time: 2h, 90m, 45s",
                                           "training", kind=parse_duration, demo=600.0, commands=TRAINING,
                                           check=lambda v: v > 0, rule="longer than 0 (leave it out for no limit)")
    final: int = same(SampleJob, "count", 64)
    demo_on_folders: bool = derived("--demo with --data-folders: the preset applies to them", False)
    eval_folders: Tuple[str, ...] = same(DataFlags, "eval_folders")
    held: Optional[torch.Tensor] = derived("ddpm.train's held-out images for --eval-every", None)


@declares
@dataclass(frozen=True)
class InfoJob:
    path: str = setting(None, "--info", "describe a checkpoint and exit", "tools", kind=str, metavar="CKPT", name="info",
                        commands={"info"})
    plot: bool = setting(False, "--plot", "with --info: draw the run's loss.png and quality.png (from its metrics.csv, "
                         "also while it trains) into --save-dir", "tools", switch="on", commands={"info"})
    out: Outputs = derived("--save-dir, --overwrite", Outputs())


@declares
@dataclass(frozen=True)
class ExportJob:
    weights: LoadSpec = derived("--loadckpt, --no-ema")
    out: Path = setting(None, "--export", "write --loadckpt's EMA (or --no-ema raw) weights as safetensors", "tools",
                        kind=str, metavar="FILE.safetensors", name="export", commands={"export"})
    overwrite: bool = same(Outputs, "overwrite")


# -- the parser and the checks: from the declarations ---------------------------------------------

# --demo: a CPU-sized preset on the built-in faces (a small model, a short run, the measured recipe at
# its width: README, "Better samples"); any flag typed explicitly still wins
DEMO_PRESET = {s.name: s.demo for s in DECLARED if s.demo is not NO_DEMO}
COMMAND_WORDS = {"train": "--train", "sample": "sampling", "edit": "--init-images", "invert": "--invert",
                 "eval": "--eval", "info": "--info", "export": "--export"}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show defaults, except where there is none or the help already says it."""

    def _get_help_string(self, action):
        if action.default in (None, False, ()) or "default" in (action.help or "") or action.nargs == 0:
            return action.help
        return super()._get_help_string(action)


class ArgParser(argparse.ArgumentParser):
    """argparse with one-line errors."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n" if prints_errors() else None)


def build_parser() -> ArgParser:
    """The command line, from the declared settings: each in its --help group, in the order declared."""
    p = ArgParser(prog="ddpm.py", allow_abbrev=False,
                  formatter_class=HelpFormatter,
                  description="Train a DDPM on a folder of images, or sample from a checkpoint. "
                              "Sampling defaults to DPM-Solver++(2M) with 25 steps on the EMA weights.",
                  epilog="Examples: `ddpm.py --train --demo` (CPU, built-in faces); "
                         "`ddpm.py --train --data-folders data/faces`; `ddpm.py --loadckpt ckpt/ckpt-0.pth "
                         "--batch-size 64`. Under torchrun, --batch-size is the global batch.")
    groups = {key: p.add_argument_group(title) for key, title in GROUPS.items()}
    for s in DECLARED:
        groups[s.group].add_argument(s.flag, **s.parser_kwargs(s.default))
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> Tuple[argparse.Namespace, frozenset]:
    """The flags as argparse reads them (with --demo's preset as defaults) and the set of the ones
    the user typed (their names), every flag checked (check_flags)."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--demo" in argv:
        parser.set_defaults(**DEMO_PRESET)
    args = parser.parse_args(argv)
    typed = {a.split("=", 1)[0] for a in argv if a.startswith("--")}
    typed = frozenset(a.dest for a in parser._actions if typed.intersection(a.option_strings))
    if "--demo" in argv and "eval_every" not in typed and not args.train:
        args.eval_every = 0  # the preset measures training (quality_probe decides whether it can)
    check_flags(args, typed)
    return args, typed


def command_of(args) -> str:
    """The command the flags ask for (COMMAND_NAMES)."""
    return ("info" if args.info is not None else "export" if args.export is not None else "train" if args.train else
            "eval" if args.eval else "invert" if args.invert else "edit" if args.init_images else "sample")


def check_flags(args, typed: frozenset) -> None:
    """Every flag, in one place, before any work: one line naming the flag. First the commands'
    combinations; then each setting's range (its declaration); then each typed setting where it does
    not act: in another command, or with a sampler (or recipe) it does not go with."""
    if args.resume and not args.train:
        raise DDPMError("--resume continues a training run: add --train")
    if args.eval and (args.train or not args.loadckpt):
        raise DDPMError(f"--eval {args.eval} evaluates a trained model: give --loadckpt CKPT, without --train")
    if args.info is None and args.export is None and not args.train and not args.loadckpt:
        raise DDPMError("nothing to do: give --train to train, or --loadckpt CKPT to sample from a checkpoint")
    if args.export is not None and not args.loadckpt:
        raise DDPMError("--export needs --loadckpt CKPT to know which weights to write")
    if args.train and not (args.demo or args.data_folders or args.resume):
        raise DDPMError("--train needs --data-folders DIR [DIR ...] (or --demo for the built-in faces)")
    if args.init_images and args.invert:
        raise DDPMError("--init-images and --invert are separate commands; give one")
    if (args.init_images or args.invert) and (args.train or args.eval):
        raise DDPMError("--init-images and --invert work in sampling mode: drop --train / --eval")
    if args.invert and args.sampler in SAMPLERS and from_flags(SampleSpec, args).draws_noise:
        raise DDPMError("--invert runs the deterministic DDIM (eta 0) backwards: use --sampler "
                        f"{' or '.join(n for n, r in SAMPLERS.items() if not r.stochastic)} with --eta 0, not a "
                        f"stochastic sampler")
    paths = [settings_of(c)[n] for c, n in ((Outputs, "save_dir"), (TrainJob, "ckpt_dir"), (LoadSpec, "path"))]
    for s in paths + [settings_of(ExportJob)["out"], settings_of(InfoJob)["path"]]:  # the last two: files
        v = getattr(args, s.name)
        if v is not None and not str(v).strip():
            raise DDPMError(f"{s.flag} is empty; name a {'path' if s in paths else 'file'}"
                            + (" (. for the current folder)" if s.flag.endswith("dir") else ""))
    for s in DECLARED:
        why = s.out_of_range(getattr(args, s.name))
        if why:
            raise DDPMError(why)
    command = command_of(args)
    for s in DECLARED:
        if s.name not in typed or getattr(args, s.name) == (s.kind(s.text) if s.text is not None else s.default):
            continue
        if command not in s.commands:
            raise DDPMError(f"{s.flag} goes with {' or '.join(COMMAND_WORDS[c] for c in COMMAND_NAMES if c in s.commands)}"
                            f", not with {COMMAND_WORDS[command]}")
        why = s.needs(args) if s.needs is not None else None
        if why:
            raise DDPMError(why)
    if args.mask and len(args.mask) not in (1, len(args.init_images)):
        raise DDPMError(f"--mask: give one mask for all {len(args.init_images)} --init-images or one each, "
                        f"not {len(args.mask)}")


# -- from the flags to a job ------------------------------------------------------------------------

def from_flags(cls, args, **given):
    """An instance of cls from the parsed flags: each field that declares or takes a setting gets its
    flag's value (a list as a tuple, a path as a Path); `given` fills in the others."""
    values = dict(given)
    for f in fields(cls):
        s = f.metadata.get("setting")
        if s is not None and f.name not in given:
            v = getattr(args, s.name)
            values[f.name] = tuple(v) if isinstance(v, list) else Path(v) if "Path" in str(f.type) and v is not None else v
    return cls(**values)


def job_from_args(args, typed: frozenset):
    """The typed job the flags ask for (one of the *Job classes)."""
    model_flags = tuple((k, tuple(v) if isinstance(v, list) else v) for k in MODEL_FLAGS if k in typed
                        for v in [getattr(args, k)])
    weights = from_flags(LoadSpec, args, model_flags=model_flags) if args.loadckpt else None
    command, out = command_of(args), from_flags(Outputs, args)
    if command == "info":
        return from_flags(InfoJob, args, out=out)
    if command == "export":
        return from_flags(ExportJob, args, weights=weights)
    device, spec = from_flags(RuntimeFlags, args), from_flags(SampleSpec, args)
    if command == "train":
        tc = from_flags(TrainConfig, args, auto_accum="grad_accum" not in typed, preview=spec)
        data = DataSource(tuple(args.data_folders or ()), args.demo_images if args.demo or "demo_images" in typed else 0,
                          args.background)
        return from_flags(TrainJob, args, cfg=from_flags(ModelConfig, args), train=tc, data=data, out=out, device=device,
                          typed=typed, model_flags=model_flags, final=args.num_samples or 64,
                          demo_on_folders=bool(args.demo and args.data_folders))
    shared = dict(weights=weights, device=device, spec=spec, out=out, guide=LoadSpec(args.guide) if args.guide else None,
                  guidance=GUIDANCE if args.guidance is None else args.guidance)
    if command == "eval":
        return from_flags(EvalJob, args, **shared, data=from_flags(DataFlags, args),
                          samples=args.num_samples if "num_samples" in typed else None)
    if command == "invert":
        return from_flags(InvertJob, args, **dict(shared, spec=inversion_spec(spec, args.steps)))
    if command == "edit":
        return from_flags(EditJob, args, **shared, variations=args.num_samples or 1)
    return from_flags(SampleJob, args, **shared, data=from_flags(DataFlags, args), count=args.num_samples or args.batch_size,
                      inversion_steps=args.steps)


def parse_command_line(argv: Optional[Sequence[str]] = None):
    """argv (default: sys.argv[1:]) -> the typed job it asks for, every flag checked."""
    return job_from_args(*parse_args(argv))


def pick_seed(seed: Optional[int]) -> int:
    """`seed`, or a random one (the same on every process), printed so that it can be repeated."""
    if seed is not None:
        return seed
    seed = broadcast_int(random.SystemRandom().randrange(2**31), Runtime(torch.device("cpu"), "fp32",
                                                                       world=int(os.environ.get("WORLD_SIZE", "1"))))
    log(f"seed: {seed} (pass --seed {seed} to repeat)")
    return seed


# -- train ----------------------------------------------------------------------------------------

@dataclass
class RunStart:
    """What a --train command starts from, decided before any work: a fresh run, a fine-tune of
    --loadckpt's weights, or a resumed run with its own settings and data."""

    kind: str                      # fresh | fine-tune | resume
    cfg: ModelConfig
    train: TrainConfig
    data: DataSource
    run_id: str
    ckpt: Optional[dict] = None    # the checkpoint read (fine-tune, resume)
    path: Optional[Path] = None
    eval_folders: Tuple[str, ...] = ()  # --eval-every's held-out images: typed, or (--resume) the run's own

    @property
    def step(self) -> Optional[int]:
        """The step of the checkpoint it continues from (None: fresh, or a file of the original script)."""
        return self.ckpt.get("step") if self.ckpt is not None and not is_legacy_state_dict(self.ckpt) else None


def start_of_run(job: TrainJob) -> RunStart:
    if not (job.resume or job.loadckpt):
        cfg = job.cfg.validate()
        warning = signal_left(cfg)
        if warning:
            log(f"warning: {warning}")
        return RunStart("fresh", cfg, job.train, job.data, new_run_id(), eval_folders=job.eval_folders)
    path = resolve_checkpoint(job.loadckpt) if job.loadckpt else newest_checkpoint(job.ckpt_dir)
    if path is None:
        raise DDPMError(f"--resume found no {CKPT_PATTERN} in {job.ckpt_dir}; train without --resume first")
    ckpt = read_checkpoint(path)
    cfg = config_from_checkpoint(ckpt, path, dict(job.model_flags), job.cfg)
    if not job.resume:
        return fine_tune_start(job, ckpt, path, cfg)
    if is_legacy_state_dict(ckpt):
        raise DDPMError(f"{path} was written by the original script and has no run state to resume; "
                        f"use --loadckpt {path} --train (without --resume) to fine-tune it")
    if ckpt.get("optimizer") is None or "epoch" not in ckpt:  # e.g. a .safetensors export
        raise DDPMError(f"{path} holds weights only (no optimizer or run state) and cannot be resumed; "
                        f"use --loadckpt {path} --train (without --resume) to fine-tune it")
    check_run_state(ckpt, path, cfg, resume=True)
    stored = stored_train_settings(ckpt)
    stored.setdefault("epochs", ckpt.get("end_epoch"))
    if "holdout" not in stored and ckpt.get("holdout"):
        stored["holdout"] = ckpt["holdout"].get("fraction", 0.0)
    log(f"resume: {path} (step {ckpt['step']}, epoch {ckpt['epoch']})")
    try:
        tc = job.train.resumed({k: v for k, v in stored.items() if v is not None}, job.typed)
    except DDPMError as e:
        raise DDPMError(f"{path}: the stored training settings are invalid ({e}); the file was edited or is "
                        f"damaged") from None
    if "seed" in job.typed and job.seed != ckpt["seed"]:
        log(f"resume: --seed {job.seed} (the run used {ckpt['seed']}); the data order and the noise follow the new "
            f"seed from step {ckpt['step']}")
    return RunStart("resume", cfg, tc, resumed_source(job, ckpt), run_id_of(ckpt) or new_run_id(), ckpt, path,
                    resumed_eval_folders(job, ckpt))


def resumed_eval_folders(job: TrainJob, ckpt: dict) -> Tuple[str, ...]:
    """--resume measures on the run's own --eval-folders (recorded resolved) unless others are typed,
    which is said in one line (the best so far, measured on the others, then starts again)."""
    stored = tuple((ckpt.get("data") or {}).get("eval_folders") or ())
    if not job.eval_folders:
        if stored:
            log(f"resume: --eval-every measures on the run's --eval-folders {' '.join(stored)}")
        return stored
    if [str(Path(f).resolve()) for f in job.eval_folders] != list(stored):
        log(f"resume: --eval-folders {' '.join(job.eval_folders)} (the run measured on "
            f"{' '.join(stored) if stored else 'its own held-out images'})")
    return job.eval_folders


def fine_tune_start(job: TrainJob, ckpt: dict, path: Path, cfg: ModelConfig) -> RunStart:
    """--loadckpt X --train: X's weights, EMA and counters, a fresh optimizer at --lr. The settings that
    checkpoints before format 4 kept in their model config (dropout, the loss weighting) carry over
    from X unless typed, as they did then."""
    tc = job.train
    if not is_legacy_state_dict(ckpt):
        check_run_state(ckpt, path, cfg, resume=False)
        stored = stored_train_settings(ckpt)
        tc = replace(tc, **{k: stored[k] for k in MOVED_TO_TRAIN if k in stored and k not in job.typed})
        try:
            tc.validate()
        except DDPMError as e:
            raise DDPMError(f"{path}: the stored training settings are invalid ({e}); the file was edited or is "
                            f"damaged") from None
    log(f"fine-tune: weights from {path}, lr {tc.lr}")
    return RunStart("fine-tune", cfg, tc, job.data, run_id_of(ckpt) or new_run_id(), ckpt, path, job.eval_folders)


def resumed_source(job: TrainJob, ckpt: dict) -> DataSource:
    """--resume trains on the run's own data (its folders or demo faces, and its --background); data
    flags typed that name other data are refused unless --resume-with-new-data says so."""
    src, typed = job.data, {"data_folders", "demo", "demo_images", "background"} & job.typed
    if not ckpt.get("data"):  # written before the data record: its folders were kept as typed, relative to
        # a working directory it did not record, so only the image count is checked
        return src if src.folders else training_source(ckpt, DataFlags(background=src.background))
    run = DataSource.from_record(ckpt["data"], src.background)
    if not typed:
        return run
    want = replace(run, **({"folders": src.folders, "flag": src.flag} if src.folders else
                           {"folders": (), "demo_images": src.demo_images} if typed & {"demo", "demo_images"} else {}),
                   **({"background": src.background} if "background" in typed else {}))
    if not want.same_as(run):
        if not job.new_data:
            raise DDPMError(f"--resume: the run trained on {run.describe()}, not {want.describe()}; drop the data "
                            f"flags to use the run's data, or add --resume-with-new-data")
        log(f"resume: on {want.describe()} (the run trained on {run.describe()}; --resume-with-new-data)")
    return want


def train_command(job: TrainJob, started: float) -> "Trainer":
    """--train: fresh, fine-tuned from --loadckpt, or resumed with --resume. The checkpoint folder is
    locked for the run and must hold no other run's files; the first process of a torchrun launch
    checks both, before any work, and decides where the pictures go."""
    if job.train.tensorboard:
        try:
            import torch.utils.tensorboard  # noqa: F401
        except ImportError:
            raise DDPMError("--tensorboard needs the tensorboard package; run `pip install tensorboard`") from None
    if not (job.resume or job.loadckpt):
        job.cfg.validate()  # bad flag combinations fail before any work
    if job.data.folders:
        find_image_files(job.data.folders)  # a missing or empty folder fails here, before any model
    check_writable(job.ckpt_dir, "--ckpt-save-dir")
    check_writable(job.out.save_dir, "--save-dir")
    first = int(os.environ.get("RANK", "0")) == 0
    lock, out = FolderLock(job.ckpt_dir), OutputClaim(job.out.save_dir)
    try:
        if first:
            lock.acquire()
        run = start_of_run(job)
        check_recipe(run.cfg, run.train, job.typed)
        if run.eval_folders and run.train.eval_every and run.data.folders:  # held-out images must be held out
            k, n = shared_images(run.eval_folders, run.data.folders, "--eval-folders", run.data.flag)
            if k:
                raise DDPMError(f"--eval-folders {' '.join(run.eval_folders)} shares {k} of its {n} images with the "
                                f"training data ({run.data.describe()}), so they are not held out; name a folder outside "
                                f"the training folders, or use --holdout 5%")
        inside = [f for f in run.data.folders if Path(f).resolve() in [job.out.save_dir.resolve(),
                                                                        *job.out.save_dir.resolve().parents]]
        if inside:
            warn_once(f"--save-dir {job.out.save_dir} is inside the training folder {inside[0]}: the run's pictures "
                      f"would be read as training images by the next run on it (and --resume would find the data "
                      f"changed); write them elsewhere")
        if first:
            moved = guard_run_folder(job.ckpt_dir, run.run_id, run.kind != "fresh", job.out.overwrite, run.path,
                                     run.step)
            out = output_folder(job.out.save_dir, "train", job.out.overwrite)
            if moved is not None and out.moved_to is not None:  # the old run's log names its pictures' new place
                repoint_events(moved / "events.csv", job.out.save_dir, out.moved_to)
        rt = setup_runtime(job.device.device, run.train.precision, job.device.compile, training=True,
                           compile_mode=job.device.compile_mode)
        return train_run(job, rt, run, out.folder, started)
    finally:
        out.release()
        lock.release()
        remove_if_empty(out.folder, job.out.save_dir)


def train_run(job: TrainJob, rt: Runtime, run: RunStart, save_dir: Path, started: float) -> "Trainer":
    """Load the data, build the trainer, train it with its pictures."""
    tc, cfg, resume = run.train, run.cfg, run.kind == "resume"
    seed = int(run.ckpt["seed"]) if resume and job.seed is None else pick_seed(job.seed)
    if job.demo_on_folders:
        log(f"note: --demo's CPU preset applies to your folders ({' '.join(job.data.folders)}); the built-in "
            f"faces are not used")
    data = run.data.load(cfg)
    expected = (run.ckpt.get("data") or {}).get("images") or (run.ckpt.get("holdout") or {}).get("total") if resume else None
    if expected and len(data) != expected and not job.new_data:
        raise DDPMError(f"--resume: {run.data.describe()} now holds {len(data)} images, the run trained on {expected}; "
                        f"add --resume-with-new-data to continue on the new set")
    held_rec = (run.ckpt.get("holdout") or {}) if resume and "holdout" not in job.typed else {}
    train_data, held, holdout = split_holdout(data, tc.holdout, held_rec.get("seed", seed))
    if len(held):
        log(f"holdout: {len(held)} of {len(data)} images left out of training (--holdout {tc.holdout:g}); "
            f"--eval uses them")
    B = tc.batch_size  # the global batch divides over the processes and accumulation steps, and fits the data
    if B % (rt.world * tc.grad_accum):
        raise DDPMError(f"--batch-size {B} is the global batch and must divide evenly over {rt.world} processes x "
                        f"{tc.grad_accum} accumulation steps")
    if len(train_data) < B:
        raise DDPMError(f"--batch-size {B} is larger than the {len(train_data)} training images; use --batch-size "
                        f"{len(train_data)} or fewer")
    remove_stale_temps(job.ckpt_dir)
    record = {**run.data.record(len(data)), "holdout": holdout}
    if run.eval_folders and tc.eval_every:
        record["eval_folders"] = [str(Path(f).resolve()) for f in run.eval_folders]
    trainer = Trainer(tc, rt, cfg, Batches(train_data, rt.device, seed), seed, resume=run.ckpt if resume else None,
                      init=run.ckpt if run.kind == "fine-tune" else None, run_id=run.run_id, data=record)
    n_params = sum(p.numel() for p in trainer.model.parameters())
    log(f"model: {n_params / 1e6:.2f}M parameters | batch {tc.batch_size} = {rt.world} process(es) x {trainer.micro} x "
        f"{trainer.accum} accumulation | {trainer.steps_per_epoch} steps per epoch | EMA "
        f"{tc.ema_decay if tc.ema_decay else 'off'}" + (f" | {trainer.memory_note}" if trainer.memory_note else ""))
    deadline = (started + job.time_budget) if job.time_budget else None
    if tc.pictures or tc.sample_every:
        say_sampling(trainer.model, tc.preview)
    probe = quality_probe(job, run, cfg, tc, held, seed) if tc.eval_every and is_rank0() else None
    trainer.fit(job.ckpt_dir, deadline, RunPictures(save_dir, job.final, tc.pictures), probe)
    return trainer


def quality_probe(job: TrainJob, run: RunStart, cfg: ModelConfig, tc: TrainConfig, held: torch.Tensor,
                  seed: int) -> Optional[QualityProbe]:
    """--eval-every's held-out images: --eval-folders, else the --holdout split, else (the demo) new
    faces past the ones it trains on; a folder of images without any is a one-line error."""
    n = tc.eval_samples or (256 if cfg.img_size <= 32 else 128)  # --eval-samples, or its default
    if job.held is not None:
        return QualityProbe(job.held, n, tc.eval_every, seed, f"{len(job.held)} held-out images")
    if run.data.images is not None and not len(held):
        raise DDPMError("train(): tc.eval_every needs held=... (held-out images to measure the quality on), or "
                        "tc.holdout")
    if run.eval_folders:
        imgs = load_images(run.eval_folders, cfg.img_size, cfg.img_channels, run.data.background, flag="--eval-folders")
        return QualityProbe(imgs, n, tc.eval_every, seed, "--eval-folders " + " ".join(run.eval_folders))
    if len(held):
        return QualityProbe(held, n, tc.eval_every, seed, f"the --holdout split ({len(held)} images)")
    if run.data.folders and "eval_every" in job.typed:
        raise DDPMError("--eval-every needs held-out images the run does not train on: add --holdout 5% (or a number "
                        "that leaves 2 x --eval-samples images out), or --eval-folders DIR")
    if run.data.folders:  # from --demo's preset or a resumed run, on folders with nothing held out
        log("eval: off (--eval-every from --demo or the resumed run, but these folders have no held-out images; "
            "--holdout 5% or --eval-folders DIR turns it on)")
        return None
    faces = run.data.new_faces(cfg, 2 * n)
    return QualityProbe(faces, n, tc.eval_every, seed, f"{2 * n} new demo faces (never trained on)")


def train(cfg: ModelConfig, tc: TrainConfig, data: torch.Tensor, ckpt_dir="ckpt", save_dir="output",
          device: Optional[str] = None, seed: int = 0, pictures: bool = True, final: int = 64,
          held: Optional[torch.Tensor] = None) -> "Trainer":
    """Train from Python, without the command line: `data` is (N, C, S, S) uint8 at the model's size
    (load_images, demo_faces). The same path as --train (train_command): the same checks, folder
    lock and guard, cleanup of stale temporary files, signals, runtime options, checkpoints, logs and
    pictures (in save_dir, or a new subfolder of it, see output_folder). pictures=False: no
    run-before/after.png or final grid (the previews every tc.sample_every steps and loss.png are
    still drawn). With tc.eval_every, `held` are the held-out images (N, C, S, S) uint8 that the
    quality is measured against. Returns the trainer (.model, .ema.model, .sampling_view())."""
    job = TrainJob(cfg, replace(tc, pictures=tc.pictures and pictures), DataSource(images=data), Path(ckpt_dir),
                   Outputs(Path(save_dir)), RuntimeFlags(device, tc.precision), seed=seed, final=final, held=held)
    return train_command(job, time.time())


# -- sample, edit, invert -------------------------------------------------------------------------

def sampling_runtime(device: RuntimeFlags) -> Runtime:
    return setup_runtime(device.device, device.precision, device.compile, training=False)


def sampling_fn(job: ModelJob, model: GaussianDiffusion, rt: Runtime) -> ModelFn:
    """What the job's sampling calls: the model's network (compiled with --compile), or with --guide
    the autoguidance of it by the guide (two networks per model call)."""
    net = sampling_net(model, rt, bool(job.device.compile))
    say_sampling(model, job.spec)
    if job.guide is None:
        return net
    guide, _ = load_for_sampling(job.guide, rt, "guide")
    cfg, gcfg = model.config, guide.config
    if (gcfg.img_size, gcfg.img_channels) != (cfg.img_size, cfg.img_channels):
        raise DDPMError(f"--guide {job.guide.path} makes {gcfg.img_channels}x{gcfg.img_size}x{gcfg.img_size} images, "
                        f"the model {cfg.img_channels}x{cfg.img_size}x{cfg.img_size}; a guide must be a model of the "
                        f"same data")
    check_guide_levels(model, guide, job.guide.path)
    fn = Guidance(net, guide, sampling_net(guide, rt, bool(job.device.compile)), job.guidance)
    cost = ("two networks per model call (about twice the time)" if fn.runs_guide else
            "weight 1 is plain sampling, so the guide is not run")
    log(f"guidance: weight {job.guidance:g} with the guide {guide.source.describe()}: {cost}")
    if fn.runs_guide and all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), guide.state_dict().values())):
        warn_once(f"--guide {job.guide.path} has the model's own weights (the model itself, or a snapshot at the run's "
                  f"end): D_guide = D_model, so guidance changes nothing and costs twice the time; guide with an "
                  f"earlier snapshot (--guide-snapshot 0.5 saves one)")
    return fn


def say_sampling(model: GaussianDiffusion, spec: SampleSpec) -> None:
    """One line where a sampling flag does less than its number says: --steps beyond the model calls the
    sampler's grid has, --churn beyond its cap."""
    calls = model.calls(spec)
    if spec.steps and calls < spec.steps:
        warn_once(f"--steps {spec.steps}: {spec.sampler} on the {spec.grid or spec.row.grid} grid of this model (T = "
                  f"{model.timesteps}) makes {calls} model calls, its most")
    levels = len(model.grid(spec))
    if spec.row.churn and spec.churn / levels > math.sqrt(2) - 1:
        warn_once(f"--churn {spec.churn:g} is above its cap: each of the {levels} noise levels is raised by at most "
                  f"sqrt(2) - 1 = 41%, which --churn {levels * (math.sqrt(2) - 1):.2f} already gives")


def check_guide_levels(model: GaussianDiffusion, guide: GaussianDiffusion, path: str) -> None:
    """A guide is evaluated at the main model's noise level sigma, at its own (fractional) timestep of
    that sigma; an eps or v guide whose schedule does not reach the model's sigma range would be
    evaluated at a clamped, wrong level, so it is refused (an EDM-objective guide takes any sigma)."""
    if guide.same_schedule(model) or guide.objective == "edm":
        return
    lo, hi = model.sigma(0), model.sigma(model.timesteps - 1)
    glo, ghi = guide.sigma(0), guide.sigma(guide.timesteps - 1)
    if ghi < 0.99 * hi or glo > 1.01 * lo:
        def name(m: GaussianDiffusion) -> str:
            return f"{m.config.beta_schedule if m.config else 'linear'} schedule, T = {m.timesteps}"
        raise DDPMError(f"--guide {path} knows noise levels sigma {glo:.3g} to {ghi:.3g} ({name(guide)}), the model "
                        f"samples at {lo:.3g} to {hi:.3g} ({name(model)}); a guide must cover the model's levels: use one "
                        f"trained with the model's schedule (or with --objective edm)")


def load_for_sampling(weights: LoadSpec, rt: Runtime, what: str = "model") -> Tuple[GaussianDiffusion, dict]:
    """The model to sample from (EMA or raw weights, checked) on rt's device, and the checkpoint dict."""
    path = resolve_checkpoint(weights.path)
    ckpt = read_checkpoint(path)
    model = load_model(path, rt.device, use_ema=weights.ema, _ckpt=ckpt, ema_length=weights.length, **weights.flags)
    best = Path(weights.path) / "best.pth"
    if what == "model":
        log(f"model: {model.source.describe()}" + (f"; the newest of {weights.path} (--eval-every's best: --loadckpt "
                                                   f"{best})" if Path(weights.path).is_dir() and best.is_file() else ""))
    return model, ckpt


def sample_command(job: SampleJob) -> int:
    """Sampling from --loadckpt: ddpm-{i}.png for each index, ddpm-all.png, optional pictures."""
    check_writable(job.out.save_dir, "--save-dir")
    rt = sampling_runtime(job.device)
    model, ckpt = load_for_sampling(job.weights, rt)
    cfg, spec = model.config, job.spec
    data = training_source(ckpt, job.data) if job.forward else None  # fails here, before sampling
    seed = pick_seed(job.seed)
    ends = interpolation_ends(job, model, rt.local()) if job.interpolate and is_rank0() else None
    n = 1 if job.index is not None else job.count
    check_sampling_memory(cfg, min(job.batch_size, n), n, rt.device)  # before a list of n indices is made
    indices = [job.index] if job.index is not None else list(range(n))
    fn = sampling_fn(job, model, rt)
    with writing_to(job.out.save_dir, "sample", job.out.overwrite) as save_dir:
        t0 = time.time()
        imgs = sample_or_fail(lambda: generate(model, rt, indices, seed, spec, job.batch_size, model_fn=fn),
                              job.batch_size, cfg)
        if is_rank0():
            write_samples(job, model, rt, imgs, indices, seed, ends, data, save_dir, time.time() - t0, fn)
    return 0


def sample_or_fail(make: Callable[[], torch.Tensor], batch: int, cfg: ModelConfig) -> torch.Tensor:
    """make(), with memory running out (GPU or CPU) as one line."""
    with memory_or(f"out of memory sampling batches of {batch} at {cfg.img_size}x{cfg.img_size}; use a smaller "
                   f"--batch-size"):
        return make()


def write_samples(job: SampleJob, model: GaussianDiffusion, rt: Runtime, imgs: torch.Tensor, indices: List[int],
                  seed: int, ends, data: Optional[DataSource], save_dir: Path, took: float, fn: ModelFn) -> None:
    """ddpm-{i}.png, ddpm-all.png and the pictures the flags ask for."""
    cfg, spec = model.config, job.spec
    for i, img in zip(indices, imgs):
        save_png(img, save_dir / f"ddpm-{i}.png")
    if len(indices) > 1:
        save_png(image_grid(imgs), save_dir / "ddpm-all.png")
    log(f"wrote {len(indices)} images to {save_dir} in {took:.1f} s ({spec.sampler}, "
        f"{model.calls(spec)} model calls, seed {seed})" + (", and ddpm-all.png" if len(indices) > 1 else ""))
    local = rt.local()
    if job.reverse:
        save_png(reverse_strip(model, local, seed, 8, spec, fn), save_dir / "reverse.png")
    if job.forward:
        save_png(forward_strip(model, data.load(cfg)[:8], seed), save_dir / "forward.png")
    if job.gif:
        save_gif(denoise_frames(model, local, indices[:16], seed, spec, fn), save_dir / "denoise.gif")
    if ends is not None:
        save_png(interpolation_strip(model, local, *ends, model_fn=fn), save_dir / "interpolate.png")


def interpolation_ends(job: SampleJob, model: GaussianDiffusion, rt: Runtime
                       ) -> Tuple[torch.Tensor, torch.Tensor, SampleSpec]:
    """--interpolate A B: two seeds (their noise, the sampling flags' path), or two real faces: .pt
    files of --invert or image files inverted here (the DDIM path, eta 0, that reconstructs them)."""
    if all(re.fullmatch(r"-?\d+", v) for v in job.interpolate):
        return seed_noise(model, int(job.interpolate[0])), seed_noise(model, int(job.interpolate[1])), job.spec
    cfg, inversion = model.config, inversion_spec(job.spec, job.inversion_steps)
    ends = []
    for v in job.interpolate:
        if v.endswith(".pt"):
            ends.append(read_latent(v, cfg))
        else:
            img = load_image_files([v], cfg.img_size, cfg.img_channels, job.data.background, "--interpolate")
            ends.append(model.invert(to_model_range(img).to(rt.device), inversion, sampling_net(model, rt))[0].cpu())
        if not torch.isfinite(ends[-1]).all() or float(ends[-1].abs().max()) == 0:
            raise DDPMError(f"--interpolate {v}: its x_T is {'all zero' if torch.isfinite(ends[-1]).all() else 'not finite'}"
                            f", so no path leads from it; invert the image again or use another file")
    return ends[0], ends[1], inversion


def read_latent(v: str, cfg: ModelConfig) -> torch.Tensor:
    """An x_T that --invert wrote (edit-invert-NAME.pt), checked against the model's shape."""
    if not Path(v).is_file():
        raise DDPMError(f"--interpolate {v} does not exist or is not a regular file")
    try:
        z = torch.load(v, map_location="cpu", weights_only=True)
    except Exception as e:
        raise DDPMError(f"--interpolate {v}: not a readable --invert file ({first_line(e, 80)})") from None
    if not isinstance(z, torch.Tensor) or tuple(z.shape) != (cfg.img_channels, cfg.img_size, cfg.img_size):
        raise DDPMError(f"--interpolate {v}: not an x_T of this model's shape "
                        f"({cfg.img_channels}, {cfg.img_size}, {cfg.img_size})")
    return z.float()


def edit_command(job: EditJob) -> int:
    """--init-images (SDEdit; with --mask, inpainting): edit-J-V.png for variation V of image J, and
    edit-grid.png with one row per image: the input, its mask, the results."""
    check_writable(job.out.save_dir, "--save-dir")
    rt = sampling_runtime(job.device)
    model, _ = load_for_sampling(job.weights, rt)
    cfg, spec, seed = model.config, job.spec, pick_seed(job.seed)
    images = load_image_files(job.images, cfg.img_size, cfg.img_channels, job.background, "--init-images")
    masks = None
    if job.masks:
        masks = (load_masks(job.masks, job.images, cfg.img_size) > 127).float().expand(len(images), -1, -1, -1)
    k = job.variations
    rows = [j for j in range(len(images)) for _ in range(k)]
    strength = job.strength if job.strength is not None else (1.0 if job.masks else 0.5)
    edit = Edit(images[rows], strength, None if masks is None else masks[rows], job.jumps)
    fn = sampling_fn(job, model, rt)
    with writing_to(job.out.save_dir, "edit", job.out.overwrite) as save_dir:
        t0 = time.time()
        out = sample_or_fail(lambda: generate(model, rt, [v for _ in images for v in range(k)], seed, spec,
                                              job.batch_size, model_fn=fn, edit=edit), job.batch_size, cfg)
        if is_rank0():
            for n, (j, v) in enumerate((j, v) for j in range(len(images)) for v in range(k)):
                save_png(out[n], save_dir / f"edit-{j}-{v}.png")
            # edit-grid.png: one row per image (the input, its mask, its k results)
            cols = [images] + ([to_uint8(masks * 2 - 1).expand(-1, cfg.img_channels, -1, -1)] if masks is not None else [])
            grid = torch.cat([torch.stack([c[j] for c in cols] + list(out[j * k:(j + 1) * k])) for j in range(len(images))])
            save_picture(image_grid(grid, nrow=len(cols) + k), cfg, save_dir / "edit-grid.png")
            log(f"wrote {len(out)} edits of {len(images)} images to {save_dir} in {time.time() - t0:.1f} s (strength "
                f"{strength:g}{', inpainting' if masks is not None else ''}; {spec.sampler}, seed {seed}) and "
                f"edit-grid.png")
    return 0


def invert_command(job: InvertJob) -> int:
    """--invert: x_T of each image by DDIM inversion, its reconstruction from x_T and the PSNR."""
    check_writable(job.out.save_dir, "--save-dir")
    rt = sampling_runtime(job.device)
    model, _ = load_for_sampling(job.weights, rt)
    cfg, spec = model.config, job.spec
    images = load_image_files(job.images, cfg.img_size, cfg.img_channels, job.background, "--invert")
    if not is_rank0():
        return 0
    fn = sampling_fn(job, model, rt)
    with writing_to(job.out.save_dir, "invert", job.out.overwrite) as save_dir:
        with torch.inference_mode():
            z = sample_or_fail(lambda: model.invert(to_model_range(images).to(rt.device), spec, fn), len(images), cfg)
            rec = to_uint8(model.sample(z.clone(), spec, model_fn=fn)).cpu()
        for path, stem, zi, ri, im in zip(job.images, distinct_stems(job.images), z.cpu(), rec, images):
            buf = io.BytesIO()
            torch.save(zi.clone(), buf)
            write_output(save_dir / f"edit-invert-{stem}.pt", buf.getvalue())
            save_png(ri, save_dir / f"edit-invert-{stem}.png")
            log(f"{path}: x_T in {save_dir / f'edit-invert-{stem}.pt'}; reconstruction PSNR {psnr(ri, im):.2f} dB "
                f"(DDIM, eta 0, {model.calls(spec)} steps)")
        grid = torch.cat([torch.stack([im, ri]) for im, ri in zip(images, rec)])
        save_picture(image_grid(grid, nrow=2), cfg, save_dir / "edit-grid.png")
    return 0


def distinct_stems(paths: Sequence[str]) -> List[str]:
    """The file names of `paths` without suffix, one result name each: a name that repeats (a.png and
    a.jpg, or a.png and sub/a.png) gets -2, -3, ... in the order given."""
    out, seen = [], set()
    for p in paths:
        stem, k = Path(p).stem, 2
        name = stem
        while name.lower() in seen:  # case-insensitive file systems (Windows, macOS) too
            name, k = f"{stem}-{k}", k + 1
        seen.add(name.lower())
        out.append(name)
    return out


# -- evaluate -------------------------------------------------------------------------------------

def eval_command(job: EvalJob, features: Optional[Features] = None) -> int:
    """--eval nll | fid | swd | nearest on --loadckpt. `features` replaces the Inception features (tests)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise DDPMError("--eval runs in one process; start it with python, not torchrun")
    if job.kind == "nearest":
        check_writable(job.out.save_dir, "--save-dir")
    rt = sampling_runtime(job.device)
    job = replace(job, seed=pick_seed(job.seed))  # the same samples' noise for every set of weights
    if len(job.weights.ema_length) > 1:  # --eval swd of several post-hoc EMA lengths: each, then the best
        found = {}
        for width in job.weights.ema_length:
            log(f"--ema-length {width:g}:")
            found[width] = evaluate(replace(job, weights=replace(job.weights, ema_length=(width,))), rt, features)
        best = min(found, key=found.get)
        log("post-hoc EMA, SWD x1e3 by --ema-length: " + ", ".join(f"{w:g}: {v:.2f}" for w, v in found.items())
            + f"; the best: --ema-length {best:g}")
    else:
        evaluate(job, rt, features)
    return 0


def evaluate(job: EvalJob, rt: Runtime, features: Optional[Features]) -> Optional[float]:
    """One --eval of one set of weights; --eval swd returns its mean (the others, None)."""
    if job.kind == "fid" and features is None:
        features = inception_features(job.fid_weights, rt.device)  # fails fast: the package, the weights
    model, ckpt = load_for_sampling(job.weights, rt)
    seed = pick_seed(job.seed)
    if job.kind == "nll":
        return eval_nll(job, ckpt, model, seed)
    n = job.samples or {"fid": 5000, "swd": 256}.get(job.kind, 16)
    spec, fn = job.spec, sampling_fn(job, model, rt)

    def samples(lo: int, hi: int) -> torch.Tensor:  # (hi - lo, C, H, W) uint8
        return generate(model, rt, list(range(lo, hi)), seed, spec, job.batch_size, model_fn=fn)
    how = f"{spec.sampler}, {model.calls(spec)} model calls, seed {seed}"
    if job.kind == "fid":
        return eval_fid(job, ckpt, resolve_checkpoint(job.weights.path), model.config, samples, n, how, features)
    if job.kind == "swd":
        return eval_swd(job, ckpt, model.config, samples, n, how, seed)
    return eval_nearest(job, rt, ckpt, model.config, samples, n, how)


def eval_swd(job: EvalJob, ckpt: dict, cfg: ModelConfig, samples: Callable[[int, int], torch.Tensor], n: int, how: str,
             seed: int) -> float:
    """--eval swd: n samples against n real images (held out where there are: --eval-folders, the
    run's --holdout, new demo faces; else the training images), beside the figure of n other real
    images against the same n, so that a number means something."""
    train, held, what = eval_datasets(ckpt, cfg, job.data, new_faces=2 * n)
    ref, what = (held, what) if held is not None else (train, "the training images")
    real_a, real_b = two_real_sets(ref, n, seed, 10, what, "--eval swd", "--num-samples")
    n = len(real_a)

    def levels(r: dict) -> str:
        return " | ".join(f"{sz}px {v:.2f}" for sz, v in zip(r["sizes"], r["per_level"])) + f" | mean {r['mean']:.2f}"
    imgs = samples(0, n)
    fake, base = swd(imgs, real_a, seed), swd(real_b, real_a, seed)
    cf, cb = colour_gap(imgs, real_a), colour_gap(real_b, real_a)
    log(f"SWD x1e3: {levels(fake)} ({n} samples: {how}; vs {n} real images of {what})")
    log(f"  real vs real: {levels(base)} (another {n} of them against the same {n}: the floor for this n)")
    log(f"  colour (largest per-channel gap, 8-bit levels): mean {cf['mean']:.1f}, std {cf['std']:.1f} (real vs real: "
        f"{cb['mean']:.1f}, {cb['std']:.1f}); SWD does not see a global shift")
    return fake["mean"]


def eval_nll(job: EvalJob, ckpt: dict, model: GaussianDiffusion, seed: int) -> None:
    """--eval nll: the bound in bits/dim on held-out images (or, without any, the training images)."""
    cfg, variance = model.config, job.spec.variance
    if job.data.eval_folders:  # the training data is not needed
        held = load_images(job.data.eval_folders, cfg.img_size, cfg.img_channels, job.data.background,
                           flag="--eval-folders")
        src = None
        with contextlib.suppress(DDPMError):  # where the checkpoint records its data: is any of it trained on?
            src = training_source(ckpt, job.data)
        what = "--eval-folders " + " ".join(job.data.eval_folders) + (trained_on(job.data.eval_folders, src) if src else "")
    else:
        train, held, what = eval_datasets(ckpt, cfg, job.data)
        if held is None:
            held, what = train, "the training images (no held-out set: --eval-folders DIR, or train with --holdout)"
    r = bits_per_dim(model, held, job.nll_timesteps, job.batch_size, seed, variance=variance)
    how = (f"strided estimate ({r['K']} of {r['T']} timesteps)" if r["K"] < r["T"]
           else f"full bound (all {r['T']} timesteps)")
    log(f"NLL: {r['bpd']:.4f} bits/dim +- {r['ci']:.4f} (95% CI over {r['n']} images of {what}); {how}")
    log(f"  terms (bits/dim): prior L_T {r['prior']:.4f} | KL L_1..L_T-1 {r['kl']:.4f} | decoder L_0 "
        f"{r['decoder']:.4f} (sigma_t^2 = {'beta_t' if variance == 'large' else 'beta-tilde_t'}; 8-bit "
        f"data scaled to [-1, 1], 256 bins)")


def eval_fid(job: EvalJob, ckpt: dict, path: Path, cfg: ModelConfig, samples: Callable[[int, int], torch.Tensor],
             n: int, how: str, features: Features) -> None:
    """--eval fid: n samples against the real images (--eval-folders, --data-folders or the run's data),
    whose statistics are cached next to the checkpoint."""
    d = job.data
    src = (DataSource(d.eval_folders or d.folders, 0, d.background, "--eval-folders" if d.eval_folders else
                      "--data-folders") if d.eval_folders or d.folders else training_source(ckpt, d))
    cache = path.parent / f"fid-stats-{fid_cache_key(src, cfg, features.tag)}.pt"
    real = real_statistics(src, cfg, features, cache, job.batch_size)
    if n < 2048 and "pt_inception" in features.tag:
        warn_once(f"FID from {n} < 2048 samples is biased high (singular covariance); compare only at equal "
                  f"--num-samples (papers use 50000)")
    chunk = max(job.batch_size, 500)
    fake = activation_stats((samples(b, min(n, b + chunk)) for b in range(0, n, chunk)), features)
    dist_ = frechet_distance(fake[0], fake[1], real[0], real[1])
    log(f"FID: {dist_:.4f} ({n} samples: {how}; vs {real[2]} real images: {src.describe()}; features: {features.tag})")


def eval_nearest(job: EvalJob, rt: Runtime, ckpt: dict, cfg: ModelConfig, samples: Callable[[int, int], torch.Tensor],
                 n: int, how: str) -> None:
    """--eval nearest: samples vs training images, with held-out real images vs the training images
    as the yardstick; nearest.png shows each sample beside its nearest training images."""
    train, held, what = eval_datasets(ckpt, cfg, job.data)
    bank = train
    if held is None:
        if len(train) < 2:
            raise DDPMError("--eval nearest needs at least 2 training images")
        bank, held, _ = split_holdout(train, 0.05, 0)
        what = f"a deterministic 5% of the training images vs the other {len(bank)}"
    if job.fid_weights:
        net = inception_features(job.fid_weights, rt.device)
        space, abs_thr = "L2 in Inception pool3 feature space", 1e-4

        def feats(u: torch.Tensor) -> torch.Tensor:  # (N, C, H, W) uint8 -> (N, 2048)
            return torch.cat([net(fid_input(c)) for c in u.split(job.batch_size)])
    else:
        feats, space, abs_thr = pixel_features, "RMS pixel difference at 16x16 in [-1, 1] units", 0.02
    imgs = samples(0, n)
    f_train = feats(train)
    r = copy_check(feats(imgs), f_train, feats(held), f_train if bank is train else feats(bank), abs_thr)
    fmt = " | ".join(f"{k} {{:.4f}}" for k in ("min", "5%", "median", "95%"))
    log(f"nearest: {n} samples ({how}) vs {len(train)} training images; distance: {space}")
    log(f"  nearest distance, {n} samples: ".ljust(44) + fmt.format(*r["q_samples"]))
    log(f"  nearest distance, {len(held)} held-out real images: ".ljust(44) + fmt.format(*r["q_real"]) + f" ({what})")
    log(f"  possible copies: {r['copies']} of {n} (nearest distance < {r['threshold']:.4f}: the 5% quantile of "
        f"the held-out real images, or {abs_thr:g}; about 5% expected by chance)")
    k = r["idx"].shape[1]
    rows = torch.cat([torch.cat([imgs[i:i + 1], train[r["idx"][i]]]) for i in range(n)])  # (n*(k+1), C, H, W)
    with writing_to(job.out.save_dir, "nearest", job.out.overwrite) as save_dir:
        save_picture(image_grid(rows, nrow=k + 1), cfg, save_dir / "nearest.png")
    log(f"wrote {save_dir / 'nearest.png'} (each row: a sample, then its {k} nearest training images)")


# -- inspect and export ---------------------------------------------------------------------------

def info_command(job: InfoJob) -> int:
    """--info: describe a checkpoint without building the model."""
    p = resolve_checkpoint(job.path)
    ckpt = read_checkpoint(p)
    size = p.stat().st_size
    if is_legacy_state_dict(ckpt):
        n = sum(v.numel() for v in ckpt.values())
        w = ckpt.get("eps_model.in_conv.weight")
        guess = f"img_channels={w.shape[1]}, num_channels={w.shape[0]}" if w is not None else "unknown"
        print(f"{p}: checkpoint of the original script (bare state_dict, no format version)\n"
              f"  config: unknown (from the weights: {guess}); pass the model flags it was trained with\n"
              f"  step, epoch, images seen, last loss: unknown\n  EMA: no\n"
              f"  parameters: {n / 1e6:.2f}M | file: {size / 2**20:.1f} MiB")
        return 0
    if ckpt.get("format") != FORMAT:
        raise DDPMError(f"{p}: not a ddpm.py checkpoint")
    model_cfg = config_from_checkpoint(ckpt, p, {}, ModelConfig())  # validated, as on every load
    with torch.device("meta"):  # shapes only: no memory, no time
        own = build_diffusion(model_cfg).state_dict()
    for part in ("model", "ema"):
        if ckpt.get(part) is not None:
            check_weights(own, ckpt[part], p, weights_fix(ckpt))
    n = sum(v.numel() for v in ckpt["model"].values())
    cfg = ", ".join(f"{k}={v}" for k, v in ckpt["config"].items())
    last = ckpt.get("last_loss")
    last = f"{last:.6f}" if isinstance(last, (int, float)) and not isinstance(last, bool) else \
        ("unknown" if last is None else f"{str(last)[:40]!r} (not a number: the file was edited or is damaged)")
    print(f"{p}: ddpm.py checkpoint, format version {ckpt.get('version')}"
          + (f", run {run_id_of(ckpt)}" if run_id_of(ckpt) else "") + "\n"
          f"  config: {cfg}\n"
          f"  step: {ckpt.get('step', 'unknown')} | epoch: {ckpt.get('epoch', 'unknown')} | images seen: "
          f"{ckpt.get('images_seen', 'unknown')} | last loss: {last}\n"
          f"  EMA: {'yes' if ckpt.get('ema') is not None or ckpt.get('exported') == 'ema' else 'no'}"
          + (f" (exported {ckpt['exported']} weights)" if ckpt.get("exported") else "") + "\n"
          f"  parameters: {n / 1e6:.2f}M | file: {size / 2**20:.1f} MiB" + quality_line(ckpt, p))
    if job.plot:
        plot_run(p.parent, ckpt, job.out)
    return 0


def quality_line(ckpt: dict, path: Path) -> str:
    """--info's line on --eval-every: the best step and its SWD, and where best.pth is."""
    q = ckpt.get("quality") if isinstance(ckpt.get("quality"), dict) else {}
    if q.get("best_swd") is None:
        return ""
    best = path.parent / "best.pth"
    return (f"\n  quality (--eval-every {q.get('every')}): best SWD {q['best_swd']:.2f} at step {q.get('best_step')} "
            f"(real vs real {q.get('floor', float('nan')):.2f})" + (f"; {best}" if best.is_file() else ""))


def plot_run(folder: Path, ckpt: dict, out: Outputs) -> None:
    """--info --plot: loss.png and quality.png from a run folder's metrics.csv."""
    metrics = folder / "metrics.csv"
    if not metrics.is_file():
        raise DDPMError(f"--plot: {metrics} does not exist; the run has logged nothing yet")
    check_writable(out.save_dir, "--save-dir")
    floors = probe_floors(ckpt.get("quality"))
    objective = (ckpt.get("config") or {}).get("objective", "eps")
    with writing_to(out.save_dir, "plot", out.overwrite) as save_dir:
        for name, column in (("loss.png", "loss"), ("quality.png", "swd")):
            why = write_curve(metrics, save_dir / name, column, floors, objective)
            if (save_dir / name).exists():
                log(f"wrote {save_dir / name}" + (f" ({why})" if why else ""))
            elif why and (column == "loss" or "0 rows" not in why or "no number" in why):  # quality: --eval-every ran
                log(f"note: {why}")


def export_command(job: ExportJob) -> int:
    """--export never writes over its own source, nor over another file without --overwrite, and
    fails before reading anything if the place cannot take the file."""
    source, out = resolve_checkpoint(job.weights.path), job.out
    if out.is_dir():
        raise DDPMError(f"--export {out} is a folder; name a file such as {out / 'model.safetensors'}")
    if os.path.lexists(out):
        if source.exists() and out.exists() and os.path.samefile(out, source):
            raise DDPMError(f"--export {out} is the checkpoint being exported; name another file")
        if not job.overwrite:
            raise DDPMError(f"--export {out} exists; name another file, or add --overwrite to replace it")
    check_writable(out.parent if str(out.parent) else Path("."), "--export")
    model = load_model(source, "cpu", use_ema=job.weights.ema, ema_length=job.weights.length, **job.weights.flags)
    weights = f"post-hoc ema {job.weights.length:g}" if job.weights.length else "ema" if model.source.ema else "raw"
    if os.path.lexists(out):  # --overwrite (above): the old file is kept under another name
        aside = unused_name(out.with_name(f"{out.name}.old-{time.strftime('%Y%m%d-%H%M%S')}"))
        os.replace(out, aside)
        log(f"--overwrite: moved the earlier {out} to {aside}")
    export_safetensors(model, model.config, out, weights, model.source.step or 0)
    print(f"wrote {out} ({weights} weights, config in the metadata)")
    return 0


# -- main -----------------------------------------------------------------------------------------

COMMANDS = {SampleJob: sample_command, EditJob: edit_command, InvertJob: invert_command, EvalJob: eval_command,
            InfoJob: info_command, ExportJob: export_command}


def run_job(job, started: Optional[float] = None) -> int:
    """Carry out a typed job (see parse_command_line); returns the exit status."""
    if isinstance(job, TrainJob):
        train_command(job, time.time() if started is None else started)
        return 0
    return COMMANDS[type(job)](job)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The command line; returns the exit status. Errors in the input are one line, status 2."""
    started = time.time()  # --time-budget counts from here
    for stream in (sys.stdout, sys.stderr):  # a path that is not valid UTF-8 must not stop a run
        with contextlib.suppress(AttributeError, ValueError):
            stream.reconfigure(errors="backslashreplace")
    try:
        if signal.getsignal(signal.SIGINT) is _abort_while_starting:  # from here on, Ctrl-C is KeyboardInterrupt
            signal.signal(signal.SIGINT, signal.default_int_handler)
        return run_job(parse_command_line(argv), started)
    except DDPMError as e:
        if prints_errors():
            print(f"ddpm.py: error: {e}", file=sys.stderr, flush=True)
        return 2
    except TrainingError as e:
        if prints_errors():
            print(f"ddpm.py: training stopped: {e}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print("\nddpm.py: aborted; files on disk were left as they were", file=sys.stderr, flush=True)
        return 130
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------
# Appendix: run safety
# ----------------------------------------------------------------------------------------------
# Plumbing that the sections above call so that nothing is lost: atomic writes and outputs that never
# replace a file, output folders, the checkpoint folder's guard and lock, stale temporary files.

# -- atomic writes --------------------------------------------------------------------------------

def fsync_dir(folder: Path) -> None:
    """fsync a folder so a rename in it is durable. POSIX only; elsewhere a no-op."""
    if os.name == "posix":
        with contextlib.suppress(OSError):
            fd = os.open(str(folder), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def new_file_mode() -> int:
    """The permissions a plain open() would give a new file (mkstemp makes its files 0600): 0666 less
    the process's umask, which can only be read by setting it (and setting it back at once)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: Path, write: Callable[[io.BufferedWriter], None], replace_existing: bool = True) -> None:
    """Write a file so that a crash at any moment leaves either the old file or the new one.

    The temporary file is created exclusively in the same folder (tempfile.mkstemp: O_EXCL, so a
    link planted under its name is never followed), flushed and fsynced, then renamed to `path`
    (os.replace puts a file where a link at `path` was, and never writes through it), and the folder
    is fsynced. replace_existing=False (outputs): `path` must not exist; the file is hard-linked into
    place, which fails if the name appeared meanwhile (where the file system has no hard links, the
    name is checked just before the rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=str(path.parent))
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        with contextlib.suppress(OSError):
            os.chmod(tmp, new_file_mode())
        if replace_existing:
            os.replace(tmp, path)
        else:
            _link_new(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


def _link_new(tmp: Path, path: Path) -> None:
    """Give the finished file `tmp` the name `path`, which must not exist."""
    try:
        os.link(tmp, path)
    except OSError as e:  # the name exists, or no hard links on this file system (FAT, some network shares)
        if isinstance(e, FileExistsError) or os.path.lexists(path):
            raise FileExistsError(errno.EEXIST, "it appeared while this command ran; it was left as it is") from None
        os.replace(tmp, path)
        return
    tmp.unlink()


def write_output(path: Path, data: bytes) -> Path:
    """An output file (picture, latent, plot): written atomically, never over an existing file, and a
    failure (a full disk, a folder in the way) is one line naming the file. Where the name appeared
    while the command ran (another program writing into the folder), the finished result is kept
    under the next free name (NAME-2.png, ...), said in one line. Returns the path written."""
    path = Path(path)
    for attempt in range(100):
        target = path.with_name(f"{path.stem}-{attempt + 1}{path.suffix}") if attempt else path
        try:
            atomic_write(target, lambda f: f.write(data), replace_existing=False)
        except FileExistsError:
            continue
        except OSError as e:
            raise DDPMError(f"could not write {target} ({e.strerror or first_line(e)}); free some space or write "
                            f"elsewhere") from None
        if attempt:
            log(f"note: {path} appeared while this command ran (another program writes into {path.parent}); "
                f"this result is kept as {target.name}")
        return target
    raise DDPMError(f"could not write {path}: the folder fills with that name as fast as it is written; write elsewhere")


def pid_alive(pid: int) -> Optional[bool]:
    """Whether process `pid` runs on this machine: POSIX asks with signal 0; Windows opens the
    process and reads its exit code (os.kill(pid, 0) would terminate it there); None where it
    cannot be told."""
    if pid == os.getpid():
        return True
    if os.name == "posix":
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except OSError:  # alive, owned by someone else
            return True
        return True
    if os.name == "nt":
        try:
            import ctypes

            k32 = ctypes.windll.kernel32
            handle = k32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
            if not handle:
                return k32.GetLastError() == 5  # access denied: it exists; otherwise it is gone
            code = ctypes.c_ulong()
            ok = k32.GetExitCodeProcess(handle, ctypes.byref(code))
            k32.CloseHandle(handle)
            return bool(ok) and code.value == 259  # STILL_ACTIVE
        except Exception:
            return None
    return None


_TEMP_NAME = re.compile(r"\.tmp-(\d+)(-\w+)?$")


def is_stale_temp(path: Path) -> bool:
    """Whether a temporary file of atomic_write (named .NAME.tmp-PID-XXXX) was left by a process that
    no longer runs, or, where that cannot be asked, is over an hour old."""
    m = _TEMP_NAME.search(path.name)
    alive = pid_alive(int(m.group(1))) if m else None
    if alive is not None:
        return not alive
    try:
        return time.time() - path.stat().st_mtime > 3600
    except OSError:
        return False


def check_writable(folder: Path, flag: str) -> None:
    """Fail before any work, with one line, if `folder` cannot hold our files: it is empty (''), a
    file (or a device such as /dev/null), cannot be created, or refuses a probe file (created
    exclusively, then removed). Folders it had to create for the probe are removed again."""
    if not str(folder):
        raise DDPMError(f"{flag} is empty; name a folder (. for the current one)")
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise DDPMError(f"{flag} {folder} is a file, not a folder; name a folder")
    made = []
    try:
        for a in [*reversed(folder.absolute().parents), folder.absolute()]:
            if not a.is_dir():
                try:
                    a.mkdir()
                    made.append(a)
                except FileExistsError:  # made by another process meanwhile: fine if it is a folder
                    if not a.is_dir():
                        raise
        probe = folder / f".write-probe-{os.getpid()}-{os.urandom(4).hex()}"
        os.close(os.open(str(probe), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        probe.unlink()
    except OSError as e:
        what = "cannot be created" if made or not folder.is_dir() else "is not writable"
        raise DDPMError(f"{flag} {folder} {what} ({e.strerror or e}); name a folder you can write to") from None
    finally:
        for a in reversed(made):
            with contextlib.suppress(OSError):
                a.rmdir()


# -- output folders -------------------------------------------------------------------------------

# What each command writes into --save-dir (glob patterns). A command whose kind of files are already
# there writes into a new subfolder instead, so that nothing existing is replaced and no folder mixes
# two commands' results under the same names.
OUTPUTS = {
    "train": ("run-before.png", "run-after.png", "final-grid.png", "loss.png", "quality.png", "preview"),
    "sample": ("ddpm-*.png", "reverse.png", "forward.png", "denoise.gif", "interpolate.png"),
    "edit": ("edit-*.png",),
    "invert": ("edit-invert-*", "edit-grid.png"),
    "nearest": ("nearest.png",),
    "plot": ("loss.png", "quality.png"),
}


OUTPUT_LOCK = ".output.lock"  # held in --save-dir by the command writing into it


@dataclass
class OutputClaim:
    """Where a command writes (output_folder), the lock it holds on that folder until it ends, and where
    --overwrite moved the earlier files."""

    folder: Path
    lock: Optional[object] = None
    moved_to: Optional[Path] = None
    made: Tuple[Path, ...] = ()    # folders made for the lock, removed again if the command leaves them empty

    def release(self) -> None:
        """Let go of the lock and remove its file (a command that finds the folder free after this finds
        this command's files in it, and writes elsewhere)."""
        if self.lock is not None:
            with contextlib.suppress(OSError):
                (self.folder / OUTPUT_LOCK).unlink()
            self.lock.release()
            self.lock = None
        for folder in reversed(self.made):
            with contextlib.suppress(OSError):
                folder.rmdir()


def output_folder(save_dir: Path, kind: str, overwrite: bool) -> OutputClaim:
    """Where a command of `kind` writes: --save-dir itself when no other command is writing into it now
    (an operating-system lock on save-dir/.output.lock, held until the command ends: see writing_to)
    and it holds none of that kind's files (OUTPUTS); else a new subfolder save-dir/KIND-2, -3, ...,
    said in one line. With --overwrite the earlier files are moved into save-dir/old-<date>/ (nothing
    is deleted) and the command writes in place. Call it on the writing process only, once the
    command's flags are checked."""
    from filelock import FileLock, Timeout

    save_dir = Path(save_dir)
    made = tuple(a for a in [*reversed(save_dir.absolute().parents), save_dir.absolute()] if not a.exists())
    claim = OutputClaim(save_dir, made=made)
    with contextlib.suppress(OSError):  # a folder that cannot be locked is written unlocked, as before
        save_dir.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(save_dir / OUTPUT_LOCK), timeout=0)
        try:
            lock.acquire()
            claim.lock = lock
        except Timeout:
            sub = new_folder(save_dir, kind)
            log(f"note: another command is writing into {save_dir} now; writing to {sub} instead")
            return OutputClaim(sub)
    found = sorted({p for pat in OUTPUTS[kind] for p in save_dir.glob(pat)}) if save_dir.is_dir() else []
    if found and overwrite:
        claim.moved_to = move_aside(save_dir, found)
        log(f"--overwrite: moved {len(found)} earlier files from {save_dir} to {claim.moved_to}")
    elif found:
        claim.release()
        sub = new_folder(save_dir, kind)
        more = f" and {len(found) - 1} more" if len(found) > 1 else ""
        log(f"note: {save_dir} holds {found[0].name}{more} from an earlier command; writing to {sub} instead "
            f"(--overwrite moves the earlier files aside and writes in {save_dir})")
        return OutputClaim(sub)
    return claim


def unused_name(path: Path) -> Path:
    """`path`, or path-2, path-3, ... : the first name that does not exist."""
    k, out = 2, path
    while os.path.lexists(out):
        out, k = path.with_name(f"{path.name}-{k}"), k + 1
    return out


def remove_if_empty(folder: Path, unless: Path) -> None:
    """Remove a subfolder that output_folder made when the command ended before writing into it."""
    if Path(folder) != Path(unless):
        with contextlib.suppress(OSError):
            Path(folder).rmdir()


@contextlib.contextmanager
def writing_to(save_dir: Path, kind: str, overwrite: bool):
    """output_folder for the length of a command (decided on the writing process, rank 0), its lock
    released at the end: a subfolder it made and left empty, because the command failed first, goes
    again."""
    claim = output_folder(save_dir, kind, overwrite) if is_rank0() else OutputClaim(Path(save_dir))
    try:
        yield claim.folder
    finally:
        claim.release()
        remove_if_empty(claim.folder, save_dir)


def new_folder(parent: Path, stem: str) -> Path:
    """A folder that did not exist: parent/stem, else parent/stem-2, -3, ... (mkdir claims it, so two
    processes never get the same one). An "old-" folder takes its name as given first."""
    parent.mkdir(parents=True, exist_ok=True)
    for k in range(1 if stem.startswith("old-") else 2, 100000):
        folder = parent / (stem if k == 1 else f"{stem}-{k}")
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            continue
    raise DDPMError(f"{parent} holds too many {stem}-N folders; choose another --save-dir")


def move_aside(folder: Path, files: Sequence[Path]) -> Path:
    """Move files of `folder` into a new folder/old-<date>/ (never deleted); returns it."""
    dest = new_folder(folder, "old-" + time.strftime("%Y%m%d-%H%M%S"))
    for f in files:
        os.replace(f, dest / f.name)
    fsync_dir(folder)
    return dest


# -- the checkpoint folder ------------------------------------------------------------------------

def new_run_id() -> str:
    """A fresh run's id: its start time and 6 random hex digits, e.g. 20261127-101500-3fa2c1."""
    return time.strftime("%Y%m%d-%H%M%S") + "-" + os.urandom(3).hex()


KEPT = ("best.pth", "guide.pth")  # checkpoints a run keeps outside the rotation
RUN_FILES = ("metrics.csv", "events.csv") + KEPT  # the run's files besides the rotation: each a regular file
RUN_LOGS = RUN_FILES + ("tensorboard", POSTHOC_DIR)  # all a run writes into its folder besides the rotation


def guard_run_folder(folder: Path, run_id: Optional[str], continuing: bool, overwrite: bool,
                     source: Optional[Path] = None, from_step: Optional[int] = None) -> Optional[Path]:
    """One run per checkpoint folder. A run may write into `folder` if it holds no run files, or
    only files of this same run (`continuing`: --resume, or a staged --loadckpt of one of its
    checkpoints) and `source`, the checkpoint it continues from (at `from_step`), is the newest of
    them: a branch from an older one would overwrite newer checkpoints, so it is refused with the
    name of another folder. A folder that holds only the logs of a run that never wrote a checkpoint
    is restartable: the logs are moved aside. Otherwise refuse with one line, or with --overwrite
    move the other run's files into a dated subfolder (never deleted), which is returned."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    odd = [p for p in [*folder.glob(CKPT_PATTERN), *(folder / n for n in RUN_FILES)]
           if os.path.lexists(p) and (p.is_symlink() or not p.is_file())]
    if odd:
        raise DDPMError(f"{odd[0]} is not a regular file (a folder, link or device is in its place); move it away "
                        f"or use another --ckpt-save-dir")
    # the files a training run writes here: checkpoints, logs, TensorBoard
    files = sorted(checkpoint_files(folder) + [folder / n for n in RUN_LOGS if os.path.lexists(folder / n)])
    if not files:
        return
    ckpts = [p for p in files if p.suffix == ".pth"]  # the rotation and the kept files
    metas = [checkpoint_meta(p) for p in ckpts]
    runs = {run for step, run in metas if step >= 0}  # a damaged file (step -1) belongs to no run
    if continuing and run_id is not None and ckpts and runs <= {run_id}:
        newest = max((step for step, _ in metas), default=-1)
        if from_step is not None and newest > from_step:
            raise DDPMError(f"{source} is step {from_step} of the run in {folder}, which has reached step {newest}; "
                            f"training from it there would overwrite newer checkpoints: put this branch in another "
                            f"folder (--ckpt-save-dir {folder}-from-{from_step}), or continue the newest "
                            f"(--loadckpt {folder})")
        return
    if not ckpts:  # the logs of a run that died before its first checkpoint: nothing to continue
        dest = move_aside(folder, files)
        log(f"note: {folder} held only the logs of a run that never saved a checkpoint; moved them to {dest}")
        return dest
    if not overwrite:
        rotation = [p for p in ckpts if p.name not in KEPT]
        kept = [p.name for p in ckpts if p.name in KEPT]
        what = (f"{len(rotation)} checkpoint{'s' if len(rotation) != 1 else ''}" if rotation else "") + \
            (" and " if rotation and kept else "") + " and ".join(kept)
        others = sorted({r for _, r in metas if r is not None and r != run_id})
        raise DDPMError(f"{folder} holds {what} of another run{f' ({others[0]})' if len(others) == 1 else ''}; "
                        + ("continue it with --resume, " if rotation else "")
                        + f"train into another --ckpt-save-dir, or add --overwrite to move its files into "
                          f"{folder}/old-<date>/")
    dest = move_aside(folder, files)
    log(f"--overwrite: moved {len(files)} files of the previous run to {dest}")
    return dest


def repoint_events(events: Path, save_dir: Path, moved_to: Path) -> None:
    """An earlier run's events.csv, moved aside by --overwrite, names pictures in save_dir that --overwrite
    has moved to `moved_to`: its rows are pointed there, so that they never name the new run's files."""
    try:
        with open(events, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error):
        return
    changed = 0
    for r in rows:
        with contextlib.suppress(ValueError, TypeError):
            rel = Path(r.get("path") or "").relative_to(save_dir)
            if os.path.lexists(moved_to / rel):
                r["path"], changed = str(moved_to / rel), changed + 1
    if changed:
        text = io.StringIO(newline="")
        w = csv.DictWriter(text, MetricsLog.EVENTS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
        with contextlib.suppress(OSError):
            atomic_write(events, lambda f: f.write(text.getvalue().encode()))


class FolderLock:
    """An exclusive lock on a checkpoint folder for one training run: an operating-system lock on
    FOLDER/.lock (filelock: flock on POSIX, LockFileEx on Windows), which the system releases when the
    process ends, however it ends, so there is never a stale lock to take over. The file itself stays
    (removing it would let a process that opened it just before lock the removed file). Who holds it
    (pid, host, start time) is written beside it to FOLDER/.lock.json for the refusal message, and
    removed on release."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / ".lock"
        self.info = Path(folder) / ".lock.json"
        self._lock = None
        self.created = False

    def acquire(self) -> None:
        from filelock import FileLock, Timeout

        folder = self.path.parent
        self.created = not folder.exists()  # then removed again if the run leaves it empty
        if os.path.lexists(self.path) and (self.path.is_symlink() or not self.path.is_file()):
            raise DDPMError(f"{self.path} is not a lock file (a folder or a link is in its place); move it away "
                            f"or use another --ckpt-save-dir")
        try:
            folder.mkdir(parents=True, exist_ok=True)
            lock = FileLock(str(self.path), timeout=0)
            lock.acquire()
        except Timeout:
            holder = "a process that is starting"
            with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                info = json.loads(self.info.read_text(encoding="utf-8"))
                holder = f"process {info['pid']} on {info['host']}, since {info['started']}"
            raise DDPMError(f"{folder} is in use by another training run ({holder}); wait for it to finish "
                            f"or use another --ckpt-save-dir") from None
        except OSError as e:
            raise DDPMError(f"cannot lock {self.path} ({e.strerror or first_line(e)}); check --ckpt-save-dir") from None
        self._lock = lock
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        with contextlib.suppress(OSError):  # only for the message of a refused run: a full disk is no reason to stop
            atomic_write(self.info, lambda f: f.write(json.dumps(info).encode()))

    def release(self) -> None:
        if self._lock is None:
            return
        with contextlib.suppress(OSError):
            self.info.unlink()
        if self.created and [p.name for p in self.path.parent.iterdir()] == [".lock"]:
            with contextlib.suppress(OSError):  # a folder this run made and left empty goes again
                self.path.unlink()
                self.path.parent.rmdir()
        self._lock.release()
        self._lock = None


def remove_stale_temps(folder: Path) -> None:
    """Remove the temporary files of a run's checkpoints, logs and post-hoc snapshots (.ckpt-N.pth.tmp-PID-...,
    .best.pth.tmp-..., .metrics.csv.tmp-..., posthoc/.phema-*.tmp-...) that processes which no longer run left
    behind: a killed save; never a valid file."""
    for tmp in [*Path(folder).glob(".*.tmp-*"), *(Path(folder) / POSTHOC_DIR).glob(".phema-*.tmp-*")]:
        name = _TEMP_NAME.sub("", tmp.name)[1:]
        if (Path(name).match(CKPT_PATTERN) or name in RUN_FILES or name.startswith("phema-")) and is_stale_temp(tmp):
            with contextlib.suppress(OSError):
                tmp.unlink()


# ----------------------------------------------------------------------------------------------
# Appendix: the built-in demo faces
# ----------------------------------------------------------------------------------------------
# Data, not pipeline: DataSource.load calls demo_faces for --demo. Each face is drawn with PIL at 4x
# resolution in flat colours and simple shapes, then downsampled with LANCZOS. Every random draw
# comes from random.Random(seed * 1000003 + i), in a fixed order, so face i depends on (seed, i) alone.

HAIR = [(30, 28, 38), (92, 58, 36), (140, 90, 50), (240, 205, 110), (250, 150, 190), (70, 120, 230),
        (205, 210, 225), (205, 45, 50), (60, 170, 95), (140, 80, 200), (245, 130, 40), (60, 200, 210),
        (250, 245, 235), (60, 60, 120)]
EYES = [(40, 110, 230), (40, 160, 80), (210, 40, 50), (140, 60, 200), (230, 150, 30), (230, 90, 160),
        (30, 170, 180), (120, 70, 40), (90, 90, 110)]
SKIN = [(255, 236, 224), (255, 224, 204), (248, 212, 186), (236, 192, 160), (212, 160, 122)]
_CIRCLE = [(math.cos(2 * math.pi * j / 24), math.sin(2 * math.pi * j / 24)) for j in range(24)]


def _mix(a, b, t):
    return tuple(int(round(x + (y - x) * t)) for x, y in zip(a, b))


def _shade(c, f):
    return tuple(max(0, min(255, int(v * f))) for v in c)


def _hsv(h, s, v):
    import colorsys

    return tuple(int(255 * c) for c in colorsys.hsv_to_rgb(h, s, v))


class _FaceCanvas:
    """Drawing in face coordinates (x right, y down, the head about [-0.3, 0.3] wide), scaled by
    `sc` and tilted about the neck (0, 0.2), on an S x S PIL image."""

    def __init__(self, img, S: int, cx: float, cy: float, sc: float, tilt: float):
        from PIL import ImageDraw

        self.img, self.S = img, S
        self.d = ImageDraw.Draw(img)
        ct, st = math.cos(tilt), math.sin(tilt)
        self.a, self.b = S * sc * ct, S * sc * st
        self.ox, self.oy = S * cx + 0.2 * self.b, S * (cy + 0.2 * sc) - 0.2 * self.a

    def P(self, x, y):
        return (self.ox + self.a * x - self.b * y, self.oy + self.b * x + self.a * y)

    def poly(self, pts, col):
        self.d.polygon([self.P(x, y) for x, y in pts], fill=col)

    @staticmethod
    def arcpts(x0, y0, x1, y1, a0=0, a1=360, k=24):
        mx, my, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
        cs = _CIRCLE if (a0, a1, k) == (0, 360, 24) else [
            (math.cos(t), math.sin(t)) for t in (math.radians(a0 + (a1 - a0) * j / k) for j in range(k + 1))]
        return [(mx + rx * c, my + ry * s) for c, s in cs]

    def ell(self, x0, y0, x1, y1, col, a0=0, a1=360):
        """A filled ellipse (or chord), as a polygon so that it tilts."""
        self.poly(self.arcpts(x0, y0, x1, y1, a0, a1), col)

    def arc(self, x0, y0, x1, y1, a0, a1, col, w):
        self.d.line([self.P(x, y) for x, y in self.arcpts(x0, y0, x1, y1, a0, a1, 10)], fill=col, width=w,
                    joint="curve")

    def line(self, pts, col, w):
        self.d.line([self.P(x, y) for x, y in pts], fill=col, width=w)


def _background(rng, S: int, grad):
    """A pastel colour, plain or as a vertical two-tone gradient."""
    from PIL import Image

    bg1 = _hsv(rng.random(), rng.uniform(0.15, 0.45), rng.uniform(0.75, 1.0))
    bg2 = _mix(bg1, (255, 255, 255) if rng.random() < 0.5 else (40, 40, 70), rng.uniform(0.3, 0.6))
    img = Image.new("RGB", (S, S), bg1)
    if rng.random() < 0.6:
        img = Image.composite(Image.new("RGB", (S, S), bg2), img, grad)
    return img


def _back_hair(c: _FaceCanvas, rng, dark, longh: bool) -> None:
    """Hair behind the head: long hair, twin tails or a ponytail peeking out at one side."""
    c.ell(-0.40, -0.48, 0.40, 0.22, dark)
    if longh:
        c.poly([(-0.40, -0.1), (0.40, -0.1), (0.44, 0.6), (-0.44, 0.6)], dark)
    tail = rng.random()
    if tail < 0.18:
        c.ell(-0.58, -0.30, -0.34, 0.45, dark)
        c.ell(0.34, -0.30, 0.58, 0.45, dark)
    elif tail < 0.3:
        s = rng.choice((-1, 1))
        c.ell(min(0.3 * s, 0.55 * s), -0.40, max(0.3 * s, 0.55 * s), 0.20, dark)


def _neck_and_head(c: _FaceCanvas, rng, skin) -> None:
    """Neck, shirt, and the head: a wide cranium with a pointed anime chin."""
    shirt = _hsv(rng.random(), rng.uniform(0.2, 0.7), rng.uniform(0.5, 0.95))
    c.poly([(-0.08, 0.2), (0.08, 0.2), (0.09, 0.45), (-0.09, 0.45)], _shade(skin, 0.85))
    c.ell(-0.38, 0.40, 0.38, 0.80, shirt)
    c.poly([(-0.09, 0.40), (0.09, 0.40), (0.0, 0.50)], _shade(skin, 0.85))
    c.ell(-0.30, -0.34, 0.30, 0.20, skin)
    chin = rng.uniform(0.30, 0.36)
    c.poly([(-0.30, -0.04), (-0.26, 0.14), (-0.08, chin - 0.02), (0.0, chin), (0.08, chin - 0.02),
            (0.26, 0.14), (0.30, -0.04)], skin)


def _eyes(c: _FaceCanvas, rng) -> Tuple[float, float]:
    """Two eyes: white, dark rim, iris, lighter lower half, pupil, upper lash with a wing, and two
    highlights on the same side of both eyes (one light source). Returns (eye height y, eye size)."""
    eye = EYES[rng.randrange(len(EYES))]
    ew, eh = rng.uniform(0.16, 0.19), rng.uniform(0.13, 0.20)
    ey, ex = rng.uniform(0.04, 0.06), rng.uniform(0.125, 0.14)
    hx, hy = rng.choice((-0.22, 0.22)), rng.uniform(-0.3, -0.15)
    line = _mix(eye, (20, 15, 25), 0.8)
    for s in (-1, 1):
        x = s * ex
        c.ell(x - ew / 2, ey - eh / 2, x + ew / 2, ey + eh / 2, (255, 255, 255))
        iw = ew * 0.72
        c.ell(x - iw / 2, ey - eh / 2, x + iw / 2, ey + eh / 2, line)
        c.ell(x - iw / 2 + 0.01, ey - eh / 2 + 0.012, x + iw / 2 - 0.01, ey + eh / 2 - 0.006, eye)
        c.ell(x - iw / 2 + 0.016, ey, x + iw / 2 - 0.016, ey + eh / 2 - 0.01, _mix(eye, (255, 255, 255), 0.35))
        c.ell(x - iw * 0.22, ey - eh * 0.2, x + iw * 0.22, ey + eh * 0.22, line)
        c.poly([(x - s * ew * 0.55, ey - eh * 0.32), (x - s * ew * 0.35, ey - eh * 0.58), (x + s * ew * 0.3, ey - eh * 0.60),
                (x + s * ew * 0.62, ey - eh * 0.35), (x + s * ew * 0.55, ey - eh * 0.18), (x + s * ew * 0.3, ey - eh * 0.42),
                (x - s * ew * 0.35, ey - eh * 0.40)], line)
        r, r2 = 0.024, 0.012
        hxx, hyy = x + hx * iw, ey + hy * eh
        c.ell(hxx - r, hyy - r, hxx + r, hyy + r, (255, 255, 255))
        c.ell(x - hx * iw * 0.8 - r2, ey + eh * 0.25 - r2, x - hx * iw * 0.8 + r2, ey + eh * 0.25 + r2, (255, 255, 255))
    return ey, eh


def _mouth(c: _FaceCanvas, rng, skin) -> None:
    """Blush (sometimes), then a smile, a small 'o', a flat line or an open smile."""
    if rng.random() < 0.6:
        bl = _mix(skin, (255, 110, 130), 0.45)
        for s in (-1, 1):
            c.ell(s * 0.17 - 0.05, 0.13, s * 0.17 + 0.05, 0.17, bl)
    mcol, my = (150, 40, 50), rng.uniform(0.21, 0.24)
    m = rng.randrange(4)
    if m == 0:
        c.arc(-0.05, my - 0.05, 0.05, my + 0.015, 20, 160, mcol, max(1, c.S // 48))
    elif m == 1:
        c.ell(-0.022, my - 0.02, 0.022, my + 0.025, mcol)
    elif m == 2:
        c.line([(-0.035, my), (0.035, my)], mcol, max(1, c.S // 48))
    else:
        c.ell(-0.045, my - 0.03, 0.045, my + 0.035, mcol, 0, 180)


def _fringe(c: _FaceCanvas, rng, hair, fy: float) -> None:
    """The hair cap and one of four fringes down to height fy: spiky, straight, side-swept, centre part."""
    c.ell(-0.34, -0.46, 0.34, 0.20, hair, 180, 360)
    fr = rng.randrange(4)
    if fr == 0:
        k = rng.randint(4, 6)
        pts = [(-0.34, -0.13)]
        for j in range(k):
            x0, x1 = -0.30 + 0.60 * j / k, -0.30 + 0.60 * (j + 1) / k
            pts += [(x0, -0.12), ((x0 + x1) / 2 + rng.uniform(-0.02, 0.02), fy + rng.uniform(-0.05, 0.01))]
        pts += [(0.30, -0.12), (0.34, -0.13)]
    elif fr == 1:
        pts = [(-0.34, -0.13), (-0.30, fy), (0.30, fy), (0.34, -0.13)]
    elif fr == 2:
        s = rng.choice((-1, 1))
        pts = [(-0.34 * s, -0.13), (-0.30 * s, fy - 0.02), (0.05 * s, fy - 0.1), (0.30 * s, fy), (0.34 * s, -0.13)]
    else:
        pts = [(-0.34, -0.13), (-0.30, fy), (-0.12, fy - 0.03), (0.0, -0.2), (0.12, fy - 0.03), (0.30, fy), (0.34, -0.13)]
    c.poly(pts + [(0.34, -0.2), (-0.34, -0.2)], hair)


def _side_locks(c: _FaceCanvas, rng, hair, longh: bool) -> None:
    """Locks at both sides of the face, a highlight arc, and sometimes an ahoge."""
    lock = 0.40 if longh else rng.uniform(0.12, 0.28)
    for s in (-1, 1):
        c.poly([(s * 0.35, -0.2), (s * 0.24, -0.12), (s * 0.25, lock - 0.08), (s * 0.30, lock), (s * 0.36, lock - 0.1)], hair)
    c.arc(-0.24, -0.38, 0.24, -0.10, 200, 250, _mix(hair, (255, 255, 255), 0.45), max(1, c.S // 40))
    if rng.random() < 0.35:
        t = rng.choice((-1, 1))
        c.poly([(0.0, -0.42), (0.03 * t, -0.52), (0.12 * t, -0.55), (0.05 * t, -0.50), (0.03 * t, -0.40)], hair)


def _face(rng, size: int, grad):
    """One face as a PIL image of size x size."""
    from PIL import Image

    S = 4 * size
    img = _background(rng, S, grad)
    cx, cy = 0.5 + rng.uniform(-0.03, 0.03), 0.5 + rng.uniform(-0.03, 0.03)
    sc = rng.uniform(0.93, 1.05)
    c = _FaceCanvas(img, S, cx, cy, sc, math.radians(rng.uniform(-7, 7)))
    hair = _shade(HAIR[rng.randrange(len(HAIR))], rng.uniform(0.85, 1.1))
    skin = SKIN[rng.randrange(len(SKIN))]
    longh = rng.random() < 0.55
    _back_hair(c, rng, _shade(hair, 0.7), longh)
    _neck_and_head(c, rng, skin)
    ey, eh = _eyes(c, rng)
    _mouth(c, rng, skin)
    _fringe(c, rng, hair, ey - eh / 2 - 0.02)
    _side_locks(c, rng, hair, longh)
    return img.resize((size, size), getattr(Image, "Resampling", Image).LANCZOS)


def demo_faces(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """(n, 3, size, size) torch.uint8 tensor of anime-style faces; image i depends only on (seed, i)."""
    from PIL import Image

    grad = Image.linear_gradient("L").resize((4 * size, 4 * size))
    data = b"".join(_face(random.Random(seed * 1000003 + i), size, grad).tobytes() for i in range(n))
    out = torch.frombuffer(bytearray(data), dtype=torch.uint8) if n else torch.zeros(0, dtype=torch.uint8)
    return out.view(n, size, size, 3).permute(0, 3, 1, 2).contiguous()


if __name__ == "__main__":
    sys.exit(main())
