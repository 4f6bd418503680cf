"""What the tests share: the import path, one torch thread, the tiny model's flags, a tiny trained
run built once per session, and small helpers. Test files import the names with
`from conftest import ...` and state only what they test."""
import csv
import errno
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import ddpm  # noqa: E402

DDPM = str(ROOT / "ddpm.py")
# the tiny model used everywhere: 8x8 images, 32 channels, two resolutions (attention at the second)
MODEL = ["--img-size", "8", "--num-channels", "32", "--channel-multiples", "1", "2", "--has-attn", "f", "t",
         "--num-blocks", "1", "--timesteps", "50"]
TINY_CFG = ddpm.ModelConfig(3, 8, 32, (1, 2), (False, True), 1, 50)  # the same model, by hand
# quiet CPU training: no pictures, no previews, no quality probe (the demo preset has one), a metrics row every step
QUIET = ["--device", "cpu", "--no-run-pictures", "--sample-every", "0", "--log-every", "1", "--eval-every", "0"]
SUBPROCESS_ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Tiny CPU models gain nothing from threads, and on a busy 2-core machine threads spin; one
    thread also keeps in-process and subprocess (OMP_NUM_THREADS=1) results bitwise comparable."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def dirs(root: Path) -> list:
    return ["--ckpt-save-dir", str(Path(root) / "ckpt"), "--save-dir", str(Path(root) / "out")]


TINY_RUN = ["--train", "--demo", "--demo-images", "8", *MODEL, "--batch-size", "4", "--seed", "0", *QUIET]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """A finished tiny run (8 demo faces, batch 4: 2 steps per epoch, --max-steps 3): ckpt/ckpt-0.pth
    at step 2 (epoch end), ckpt/ckpt-1.pth at step 3, ckpt/metrics.csv and events.csv. Read only:
    tests that change it work on a copy (copy_run)."""
    root = tmp_path_factory.mktemp("tiny_run")
    assert ddpm.main([*TINY_RUN, *dirs(root), "--max-steps", "3"]) == 0
    return root


def copy_run(run: Path, root: Path) -> Path:
    """A copy of a run's checkpoint folder at root/ckpt, which is returned."""
    shutil.copytree(Path(run) / "ckpt", Path(root) / "ckpt")
    return Path(root) / "ckpt"


def one_line(text: str) -> str:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one line, got {len(lines)}:\n{text}"
    return lines[0]


def rows(path: Path) -> list:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def pixels(path: Path) -> np.ndarray:
    """A PNG as an (H, W, C) uint8 array."""
    from PIL import Image

    with Image.open(path) as im:
        assert im.format == "PNG"
        return np.asarray(im.convert("RGB")).copy()


LOCK_FILES = (".lock", ".lock.json", ddpm.OUTPUT_LOCK)  # the folder locks and the holder's note


def tree(root: Path) -> dict:
    """Every file under root (recursively) with its bytes; the lock files excluded."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(Path(root).rglob("*"))
            if p.is_file() and p.name not in LOCK_FILES}


def assert_kept(before: dict, root: Path) -> None:
    """Every file of `before` (a tree) is still under root, byte-identical."""
    after = tree(root)
    for name, data in before.items():
        assert after.get(name) == data, f"{name} changed or vanished"


def error_line(capsys) -> str:
    """The one line of a refused command, on stderr."""
    line = one_line(capsys.readouterr().err)
    assert line.startswith("ddpm.py: error:"), line
    return line


def faces(folder: Path, n: int = 4, size: int = 8, seed: int = 5) -> Path:
    """A folder of n demo faces as PNG files (seed: which faces)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(ddpm.demo_faces(n, size, seed=seed)):
        ddpm.save_png(img, folder / f"face{i}.png")
    return folder


def disk_full_at(monkeypatch, where: str, step: int) -> None:
    """From training step `step` on, every write to a path containing `where` fails as on a full disk,
    in the operating system's own calls (os.open for appends, the atomic writer's temporary file)."""
    import tempfile

    real_open, real_mkstemp = os.open, tempfile.mkstemp

    def full(path) -> bool:
        return where in str(path) and (where.startswith("step-") or len(rows_of(path)) >= step - 1)

    def rows_of(path):
        try:
            return Path(path).read_text().splitlines()[1:]
        except OSError:
            return []

    def open_(path, flags, *a, **k):
        if flags & os.O_APPEND and full(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(path, flags, *a, **k)

    def mkstemp(*a, prefix="", dir=None, **k):
        if full(Path(dir or ".") / prefix.lstrip(".")):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_mkstemp(*a, prefix=prefix, dir=dir, **k)
    monkeypatch.setattr(ddpm.os, "open", open_)
    monkeypatch.setattr(ddpm.tempfile, "mkstemp", mkstemp)


def nan_losses(monkeypatch, bad) -> list:
    """Make the loss of forward call k (counted from 1) NaN wherever bad(k); returns the call list."""
    real = ddpm.GaussianDiffusion.forward
    calls = []

    def forward(self, *a, **k):
        calls.append(1)
        out = real(self, *a, **k)  # the loss, or (the loss, each image's) where the trainer asks for them
        if not bad(len(calls)):
            return out
        return (out[0] * float("nan"), out[1]) if isinstance(out, tuple) else out * float("nan")
    monkeypatch.setattr(ddpm.GaussianDiffusion, "forward", forward)
    return calls


def partial_save(monkeypatch, after) -> list:
    """torch.save that writes half of the file, then calls after() (raise, or signal); returns the
    sizes written."""
    import io

    real_save = torch.save
    written = []

    def save(obj, f, *a, **k):
        buf = io.BytesIO()
        real_save(obj, buf, *a, **k)
        data = buf.getvalue()
        f.write(data[:len(data) // 2])
        written.append(len(data) // 2)
        after()
    monkeypatch.setattr(torch, "save", save)
    return written
