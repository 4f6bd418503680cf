"""Checkpoints: atomic writes, SIGKILL, exact resume, SIGINT/SIGTERM, data-only loading, corrupt
files, config checks, the original script's files, --info, key prefixes; training robustness
(CUDA OOM retry with a fake error, the non-finite guard).

Most runs call ddpm.main(argv) in-process (one torch import for the whole file); the tests that
need a real process (SIGKILL, SIGTERM from outside, the pickle payload through the CLI) start
`python ddpm.py`.
"""
import os
import pickle
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import ddpm
from conftest import DDPM, LOCK_FILES, MODEL, SUBPROCESS_ENV, nan_losses, one_line, partial_save

RUN = ["--batch-size", "4", "--device", "cpu", "--no-run-pictures", "--sample-every", "0", "--eval-every", "0",
       "--seed", "0"]
# the original script's model, shrunk: --img-size 16, 32 channels, two resolutions, default T = 1000
OLD_FLAGS = ["--num-channels", "32", "--channel-multiples", "1", "2", "--has-attn", "f", "t", "--num-blocks", "1"]


def train(folder: Path, *extra, images: int = 8) -> int:
    """In-process `ddpm.py --train --demo` with the tiny model; checkpoints in folder/ckpt."""
    return ddpm.main(["--train", "--demo", "--demo-images", str(images), *MODEL, *RUN,
                      "--ckpt-save-dir", str(folder / "ckpt"), "--save-dir", str(folder / "out"), *extra])


def endless_training(root: Path) -> list:
    """The command line of a tiny training run that goes on until it is stopped (root/ckpt, root/out)."""
    return [sys.executable, DDPM, "--train", "--demo", "--demo-images", "8", *MODEL, *RUN, "--max-steps", "1000000",
            "--epochs", "1000000", "--log-every", "1000", "--ckpt-save-dir", str(root / "ckpt"), "--save-dir",
            str(root / "out")]


def newest(folder: Path) -> dict:
    return ddpm.read_checkpoint(ddpm.newest_checkpoint(folder))


def snapshot(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file() and p.name not in LOCK_FILES}


def assert_same_tensors(a, b, what: str) -> None:
    """Every tensor in two nested dict/list structures is torch.equal; other leaves are ==."""
    if isinstance(a, torch.Tensor):
        same = isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
        assert same, f"{what} differs"
    elif isinstance(a, dict):
        assert set(a) == set(b), what
        for k in a:
            assert_same_tensors(a[k], b[k], f"{what}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), what
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tensors(x, y, f"{what}[{i}]")
    else:
        assert a == b, what


def old_format_file(path: Path, seed: int = 0) -> dict:
    """A file as the original script wrote it: torch.save(GaussianDiffusion.state_dict()), no config."""
    torch.manual_seed(seed)
    unet = ddpm.UNet(3, 32, (1, 2), (False, True), 1, legacy_attention=False)
    state = ddpm.GaussianDiffusion(unet).state_dict()
    assert state and all(k.startswith("eps_model.") for k in state)
    torch.save(state, path)
    return state


class Payload:
    """Unpickling this object creates a file: code that must never run when loading."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.fixture
def trained(tiny_run) -> Path:
    """The session's tiny run (2 steps per epoch): ckpt-0.pth at step 2, ckpt-1.pth at step 3. Read only."""
    return tiny_run / "ckpt"


# ----------------------------------------------------------------------------------------------
# 1. atomic writes
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("error", [OSError("No space left on device"), KeyboardInterrupt()])
def test_failed_write_keeps_the_previous_checkpoint(trained, tmp_path, monkeypatch, error):
    path = tmp_path / "ckpt-0.pth"
    shutil.copy(trained / "ckpt-1.pth", path)
    before = path.read_bytes()
    state = ddpm.read_checkpoint(path)
    state["step"] += 100
    state["model"] = {k: v + 1 for k, v in state["model"].items()}
    written = partial_save(monkeypatch, lambda: (_ for _ in ()).throw(error))
    with pytest.raises(type(error)):
        ddpm.save_checkpoint(path, state)
    monkeypatch.undo()
    assert written and written[0] > 1000  # it really wrote part of a file before failing
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["ckpt-0.pth"]  # no temporary file left behind
    assert ddpm.read_checkpoint(path)["step"] == 3
    model = ddpm.load_model(path)
    assert model.source.step == 3


# ----------------------------------------------------------------------------------------------
# 2. SIGKILL at random moments
# ----------------------------------------------------------------------------------------------

@pytest.mark.skipif(os.name != "posix", reason="SIGKILL is POSIX")
def test_sigkill_at_random_moments_leaves_loadable_checkpoints(tmp_path):
    ckpt = tmp_path / "ckpt"
    # 8 images, batch 4: a checkpoint every 2 steps, so a kill often lands inside a write
    argv = endless_training(tmp_path)
    rng = random.Random()
    kills, last_step, pids = [], -1, []
    for run in range(3):
        out = tmp_path / f"out{run}.txt"
        started = time.time_ns()
        with open(out, "wb") as f:
            proc = subprocess.Popen(argv + (["--resume"] if run else []), cwd=tmp_path, stdout=f,
                                    stderr=subprocess.STDOUT, env=SUBPROCESS_ENV)
        try:
            # wait until this process has written a checkpoint of its own
            limit = time.monotonic() + 120
            while not any(p.stat().st_mtime_ns >= started for p in ckpt.glob("ckpt-*.pth")):
                assert proc.poll() is None, out.read_text()
                assert time.monotonic() < limit, "no checkpoint written:\n" + out.read_text()
                time.sleep(0.02)
            delay = rng.uniform(0.0, 0.4)
            time.sleep(delay)
            kills.append(round(delay, 3))
        finally:
            proc.kill()
            proc.wait()
        assert proc.returncode == -signal.SIGKILL, (kills, out.read_text())
        if run:
            # the restart resumed from the newest checkpoint and removed the killed run's temp files
            m = re.search(r"resume: \S+ \(step (\d+)", out.read_text())
            assert m and int(m.group(1)) == last_step, (kills, out.read_text())
            assert not [p for p in ckpt.glob(".ckpt-*.tmp-*") if any(p.name.endswith(f"-{q}") for q in pids)]
        pids.append(proc.pid)
        steps = []
        for p in sorted(ckpt.glob("ckpt-*.pth")):
            obj = ddpm.read_checkpoint(p)  # every checkpoint loads after every kill
            assert obj["format"] == ddpm.FORMAT and obj["model"] and obj["optimizer"]["state"], p
            steps.append(obj["step"])
        assert steps and max(steps) >= max(last_step, 2), (kills, steps)
        last_step = max(steps)


# ----------------------------------------------------------------------------------------------
# 3. exact resume
# ----------------------------------------------------------------------------------------------

def test_resume_is_bitwise_exact(tmp_path):
    # 12 images, batch 4: 3 steps per epoch, so step 4 is in the middle of epoch 1; dropout 0.1
    common = ["--dropout", "0.1", "--lr", "1e-3", "--ema-decay", "0.9"]
    assert train(tmp_path / "once", *common, "--max-steps", "8", images=12) == 0
    assert train(tmp_path / "twice", *common, "--max-steps", "4", images=12) == 0
    mid = newest(tmp_path / "twice" / "ckpt")
    assert (mid["step"], mid["epoch"], mid["epoch_step"]) == (4, 1, 1)
    assert train(tmp_path / "twice", *common, "--max-steps", "8", "--resume", images=12) == 0
    a, b = newest(tmp_path / "once" / "ckpt"), newest(tmp_path / "twice" / "ckpt")
    assert a["step"] == b["step"] == 8 and a["images_seen"] == b["images_seen"] == 32
    assert (a["epoch"], a["epoch_step"]) == (b["epoch"], b["epoch_step"])
    assert_same_tensors(a["model"], b["model"], "model")
    assert_same_tensors(a["ema"], b["ema"], "ema")
    assert_same_tensors(a["optimizer"], b["optimizer"], "optimizer")
    assert_same_tensors(a["rng"], b["rng"], "rng")
    # the run did train between step 4 and step 8
    assert any(not torch.equal(mid["model"][k], a["model"][k]) for k in a["model"])


# ----------------------------------------------------------------------------------------------
# 4. SIGINT / SIGTERM
# ----------------------------------------------------------------------------------------------

@pytest.mark.skipif(os.name != "posix", reason="sends SIGTERM to a child process")
def test_sigterm_finishes_the_step_saves_and_exits_0(tmp_path):
    ckpt = tmp_path / "ckpt"
    argv = endless_training(tmp_path)
    proc = subprocess.Popen(argv, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=SUBPROCESS_ENV)
    try:
        limit = time.monotonic() + 120
        while not (ckpt / "ckpt-0.pth").exists():
            assert proc.poll() is None and time.monotonic() < limit, proc.communicate()
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out, err = out.decode(), err.decode()
    assert proc.returncode == 0, err
    stop = [ln for ln in out.splitlines() if "stopped" in ln]
    assert len(stop) == 1, out
    m = re.search(r"stopped \(SIGTERM\) at step (\d+)", stop[0])
    assert m, out
    said = [ln for ln in err.splitlines() if "SIGTERM" in ln]
    assert len(said) == 1 and said[0].startswith("SIGTERM: finishing the current step"), err
    obj = newest(ckpt)
    assert obj["step"] == int(m.group(1)) >= 2
    assert not list(ckpt.glob(".*tmp*"))


def _signal_before_step(monkeypatch, at_step: int, times: int, folder: Path):
    """Send SIGINT to this process `times` times just before the update of step `at_step` + 1."""
    real_step = ddpm.Trainer.train_step
    seen = {}

    def step(self):
        if self.pos.step == at_step and not seen:
            seen["files"] = snapshot(folder)
            for _ in range(times):
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.01)  # the handler runs here, in the main thread
        return real_step(self)

    monkeypatch.setattr(ddpm.Trainer, "train_step", step)
    return seen


@pytest.mark.skipif(os.name != "posix", reason="os.kill(SIGINT) on Windows terminates the process")
def test_sigint_finishes_the_step_saves_and_exits_0(tmp_path, monkeypatch, capsys):
    seen = _signal_before_step(monkeypatch, at_step=3, times=1, folder=tmp_path / "ckpt")
    handler = signal.getsignal(signal.SIGINT)
    assert train(tmp_path, "--max-steps", "1000", "--epochs", "1000", images=12) == 0
    out, err = capsys.readouterr()
    assert seen, "the signal was never sent"
    assert "SIGINT: finishing the current step" in one_line(err)
    assert re.search(r"stopped \(SIGINT\) at step 4\b", one_line([ln for ln in out.splitlines() if "stopped" in ln][0]))
    obj = newest(tmp_path / "ckpt")
    assert (obj["step"], obj["epoch"], obj["epoch_step"]) == (4, 1, 1)
    assert signal.getsignal(signal.SIGINT) is handler  # the handler was put back


@pytest.mark.skipif(os.name != "posix", reason="a second SIGINT delivered to the process itself")
def test_second_sigint_aborts_without_writing(tmp_path, monkeypatch, capsys):
    seen = _signal_before_step(monkeypatch, at_step=3, times=2, folder=tmp_path / "ckpt")
    assert train(tmp_path, "--max-steps", "1000", "--epochs", "1000", images=12) == 130
    out, err = capsys.readouterr()
    assert seen and "ckpt-0.pth" in seen["files"], "the signals were never sent"
    assert "aborted" in err.splitlines()[-1]
    assert snapshot(tmp_path / "ckpt") == seen["files"]  # nothing written or changed by the abort


@pytest.mark.skipif(os.name != "posix", reason="a second SIGINT delivered to the process itself")
def test_second_sigint_during_the_save_leaves_no_file(tmp_path, monkeypatch, capsys):
    seen = _signal_before_step(monkeypatch, at_step=4, times=1, folder=tmp_path / "ckpt")  # step 5 is mid-epoch: saves ckpt-1.pth
    real_save = torch.save
    calls = []

    def interrupt():  # the second SIGINT arrives half-way through the write
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)

    real_step = ddpm.Trainer.train_step

    def step(self):
        if self.pos.step == 4:
            calls.append(partial_save(monkeypatch, interrupt))
        return real_step(self)

    monkeypatch.setattr(ddpm.Trainer, "train_step", step)
    assert train(tmp_path, "--max-steps", "1000", "--epochs", "1000", images=12) == 130
    monkeypatch.setattr(torch, "save", real_save)
    assert seen and calls and calls[0], "the signals were never sent"
    assert snapshot(tmp_path / "ckpt") == seen["files"]
    assert not (tmp_path / "ckpt" / "ckpt-1.pth").exists()


# ----------------------------------------------------------------------------------------------
# 5. loading is data only
# ----------------------------------------------------------------------------------------------

def _payload_files(tmp_path: Path, marker: Path):
    zipped = tmp_path / "bad.pth"  # torch.save's zip format
    torch.save({"format": ddpm.FORMAT, "model": {}, "x": Payload(marker)}, zipped)
    plain = tmp_path / "bad-plain.pth"  # a bare pickle, as very old torch.save wrote
    with open(plain, "wb") as f:
        pickle.dump({"eps_model.x": Payload(marker)}, f, protocol=2)
    return zipped, plain


def test_pickle_payload_is_refused_and_never_run(tmp_path, capsys):
    control = tmp_path / "control-marker"
    zipped, plain = _payload_files(tmp_path, control)
    torch.load(zipped, weights_only=False)  # control: a plain torch.load would run the payload
    assert control.exists()
    marker = tmp_path / "marker"
    zipped, plain = _payload_files(tmp_path, marker)

    # through the real command line
    r = subprocess.run([sys.executable, DDPM, "--loadckpt", str(zipped), "--device", "cpu"], cwd=tmp_path,
                       capture_output=True, text=True, env=SUBPROCESS_ENV, timeout=300)
    assert r.returncode == 2, r.stderr
    line = one_line(r.stderr)
    assert str(zipped) in line and "refused" in line
    assert not marker.exists()

    for path in (zipped, plain):
        with pytest.raises(ddpm.DDPMError, match=re.escape(str(path))):
            ddpm.load_model(path)
        assert ddpm.main(["--info", str(path)]) == 2
        assert ddpm.main(["--loadckpt", str(path), "--device", "cpu"]) == 2
        assert ddpm.main(["--train", "--resume", "--loadckpt", str(path), "--demo", "--demo-images", "8", *MODEL,
                          *RUN, "--ckpt-save-dir", str(tmp_path / "ck")]) == 2
        assert not marker.exists()
    err = capsys.readouterr().err
    assert len([ln for ln in err.splitlines() if ln.strip()]) == 6
    assert not marker.exists()


# ----------------------------------------------------------------------------------------------
# 6. truncated and garbage files
# ----------------------------------------------------------------------------------------------

def test_truncated_and_garbage_files_fail_with_one_line(trained, tmp_path, capsys):
    data = (trained / "ckpt-1.pth").read_bytes()
    files = {"truncated.pth": data[:len(data) // 2], "garbage.pth": b"this is not a checkpoint\n" * 40,
             "empty.pth": b""}
    for name, content in files.items():
        path = tmp_path / name
        path.write_bytes(content)
        for argv in (["--loadckpt", str(path), "--device", "cpu"], ["--info", str(path)]):
            assert ddpm.main(argv) == 2, (name, argv)
            err = capsys.readouterr().err
            assert str(path) in one_line(err), err
        with pytest.raises(ddpm.DDPMError, match=re.escape(str(path))):
            ddpm.read_checkpoint(path)
    assert ddpm.main(["--loadckpt", str(tmp_path / "missing.pth"), "--device", "cpu"]) == 2
    assert "missing.pth" in one_line(capsys.readouterr().err)


def test_resume_skips_a_truncated_newest_checkpoint(trained, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(trained, ckpt)
    data = (ckpt / "ckpt-1.pth").read_bytes()
    (ckpt / "ckpt-2.pth").write_bytes(data[:len(data) // 2])
    assert ddpm.newest_checkpoint(ckpt).name == "ckpt-1.pth"
    assert train(tmp_path, "--resume", "--max-steps", "4") == 0
    assert "(step 3," in capsys.readouterr().out
    assert newest(ckpt)["step"] == 4


# ----------------------------------------------------------------------------------------------
# 7. config disagreement
# ----------------------------------------------------------------------------------------------

def test_disagreeing_model_flags_are_named(trained, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ck = str(trained / "ckpt-1.pth")
    assert ddpm.main(["--loadckpt", ck, "--num-channels", "64", "--device", "cpu", "--batch-size", "1"]) == 2
    line = one_line(capsys.readouterr().err)
    assert "num_channels" in line and "64" in line and "32" in line and ck in line
    assert ddpm.main(["--loadckpt", ck, "--num-channels", "64", "--img-size", "16", "--device", "cpu"]) == 2
    line = one_line(capsys.readouterr().err)
    assert "num_channels" in line and "img_size" in line
    with pytest.raises(ddpm.DDPMError, match="num_channels"):
        ddpm.load_model(ck, num_channels=64)
    assert not (tmp_path / "output").exists()
    # flags that agree are fine
    assert ddpm.main(["--loadckpt", ck, "--num-channels", "32", "--device", "cpu", "--batch-size", "1",
                      "--steps", "2", "--seed", "0"]) == 0
    assert (tmp_path / "output" / "ddpm-0.png").exists()


# ----------------------------------------------------------------------------------------------
# 8. the original script's checkpoints
# ----------------------------------------------------------------------------------------------

def test_original_format_samples_and_fine_tunes(tmp_path, monkeypatch, capsys):
    from PIL import Image

    monkeypatch.chdir(tmp_path)
    old = old_format_file(tmp_path / "old.pth")
    flags = [*OLD_FLAGS, "--img-size", "16"]
    assert ddpm.main(["--loadckpt", "old.pth", *flags, "--batch-size", "2", "--steps", "3", "--device", "cpu",
                      "--seed", "0"]) == 0
    out = capsys.readouterr().out
    assert "original script" in out and "legacy" in out
    for name in ("ddpm-0.png", "ddpm-1.png"):
        with Image.open(tmp_path / "output" / name) as im:
            assert (im.size, im.mode) == ((16, 16), "RGB")
    with Image.open(tmp_path / "output" / "ddpm-all.png") as im:
        assert im.size == (2 * 16 + 3 * 2, 16 + 2 * 2)  # make_grid, padding 2

    model = ddpm.load_model(tmp_path / "old.pth", img_size=16, num_channels=32, channel_multiples=(1, 2),
                            has_attn=(False, True), num_blocks=1)
    assert model.config.legacy_attention and model.source.step is None
    assert all(m.legacy for m in model.modules() if isinstance(m, ddpm.AttentionBlock))
    assert_same_tensors(model.state_dict(), old, "weights")

    # fine-tune: the checkpoint it writes is the new, self-describing format
    data = tmp_path / "faces"
    data.mkdir()
    for i in range(8):
        Image.new("RGB", (16, 16), (30 * i, 255 - 30 * i, 100)).save(data / f"{i}.png")
    assert ddpm.main(["--train", "--loadckpt", "old.pth", *flags, "--data-folders", str(data), "--max-steps", "2",
                      "--batch-size", "4", "--device", "cpu", "--no-run-pictures", "--sample-every", "0",
                      "--seed", "0", "--ckpt-save-dir", "ck"]) == 0
    new = newest(tmp_path / "ck")
    assert new["format"] == "ddpm.py" and new["step"] == 2
    assert new["config"]["legacy_attention"] is True and new["config"]["num_channels"] == 32
    assert new["config"]["img_size"] == 16
    diffs = [(new["model"][k] - old[k]).abs().max().item() for k in old]
    assert 0 < max(diffs) < 0.01  # started from the old weights (a fresh init would be far away)
    assert not ddpm.is_legacy_state_dict(new)

    # wrong model flags for the file: one line, exit 2
    assert ddpm.main(["--loadckpt", "old.pth", "--num-channels", "64", "--img-size", "16", "--device", "cpu"]) == 2
    assert "old.pth" in one_line(capsys.readouterr().err)
    assert ddpm.main(["--loadckpt", "old.pth", "--device", "cpu"]) == 2  # the default flags do not fit it
    assert "old.pth" in one_line(capsys.readouterr().err)


# ----------------------------------------------------------------------------------------------
# 9. --info
# ----------------------------------------------------------------------------------------------

def test_info(trained, tmp_path, capsys):
    assert ddpm.main(["--info", str(trained / "ckpt-1.pth")]) == 0
    out = capsys.readouterr().out
    assert re.search(r"\bstep: 3\b", out) and "num_channels=32" in out and "EMA: yes" in out
    assert ddpm.main(["--info", str(trained)]) == 0  # a folder means its newest checkpoint
    assert str(trained / "ckpt-1.pth") in capsys.readouterr().out

    old_format_file(tmp_path / "old.pth")
    assert ddpm.main(["--info", str(tmp_path / "old.pth")]) == 0
    out = capsys.readouterr().out
    assert "original script" in out
    assert re.search(r"config: unknown", out) and re.search(r"step.*: unknown", out)
    assert "num_channels=32" in out and "img_channels=3" in out  # what the weights do tell


# ----------------------------------------------------------------------------------------------
# 10. no wrapper prefixes in the keys
# ----------------------------------------------------------------------------------------------

def _all_keys(obj):
    for k, v in obj.items():
        yield k
        if isinstance(v, dict):
            yield from _all_keys(v)


def make_trainer(*extra, images: int = 8, seed: int = 0, compile_: bool = False) -> "ddpm.Trainer":
    job = ddpm.parse_command_line(["--train", "--demo", "--demo-images", str(images), *MODEL, *RUN, *extra])
    rt = ddpm.Runtime(torch.device("cpu"), "fp32", compile=compile_)
    return ddpm.Trainer(job.train, rt, job.cfg.validate(), ddpm.Batches(ddpm.demo_faces(images, 8), rt.device, seed),
                        seed)


def test_checkpoints_have_no_wrapper_prefixes(trained, tmp_path, monkeypatch):
    for p in trained.glob("ckpt-*.pth"):
        obj = ddpm.read_checkpoint(p)
        for part in ("model", "ema"):
            keys = list(obj[part])
            assert keys and all(k.startswith("eps_model.") for k in keys), p
    # with the training module under torch.compile (not run here: only the wrapper matters)
    tr = make_trainer(compile_=True)
    assert hasattr(tr.compiled_model, "_orig_mod")
    tr.save(tmp_path / "ckpt-0.pth")
    obj = ddpm.read_checkpoint(tmp_path / "ckpt-0.pth")
    bad = [k for k in _all_keys(obj) if isinstance(k, str) and ("_orig_mod." in k or k.startswith("module."))]
    assert not bad
    assert set(obj["model"]) == set(ddpm.build_diffusion(tr.cfg).state_dict())


# ----------------------------------------------------------------------------------------------
# training robustness: CUDA out-of-memory retry (fake error) and the non-finite guard
# ----------------------------------------------------------------------------------------------

def one_step(tr) -> None:
    """Trainer.train_step (which rolls the epoch over itself, as fit does)."""
    tr.train_step()


def test_oom_split():
    assert ddpm.oom_split(8, 1) == (4, 2)
    assert ddpm.oom_split(2, 4) == (1, 8)
    for micro in (1, 3):
        with pytest.raises(ddpm.TrainingError, match="out of memory"):
            ddpm.oom_split(micro, 2)


def test_oom_retry_halves_the_micro_batch_with_the_same_update(monkeypatch):
    ref, tr = make_trainer("--dropout", "0"), make_trainer("--dropout", "0")
    start = {k: v.clone() for k, v in tr.model.state_dict().items()}
    assert_same_tensors(start, ref.model.state_dict(), "same init")
    real = tr.compiled_model
    sizes = []

    def flaky(x, t, noise, w=None, **kw):
        sizes.append(x.shape[0])
        if len(sizes) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory (fake)")
        return real(x, t, noise, w, **kw)

    grads = {}
    for name, trainer in (("tr", tr), ("ref", ref)):
        def update(trainer=trainer, name=name, real_update=trainer._update):
            grads[name] = ([p.grad.clone() for p in trainer.model.parameters()], trainer.step_loss.item())
            real_update()
        monkeypatch.setattr(trainer, "_update", update)
    monkeypatch.setattr(tr, "compiled_model", flaky)
    tr.train_step()
    ref.train_step()
    assert sizes == [4, 2, 2]
    assert (tr.micro, tr.accum, tr.batch) == (2, 2, 4) and tr.micro * tr.accum == ref.micro * ref.accum
    assert (tr.pos.step, tr.pos.images_seen) == (ref.pos.step, ref.pos.images_seen) == (1, 4)
    # the same images, t and noise, accumulated over two halves: the same loss and gradient
    (g_tr, loss_tr), (g_ref, loss_ref) = grads["tr"], grads["ref"]
    assert loss_tr == pytest.approx(loss_ref, rel=1e-5)
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(g_tr, g_ref))
    assert max(g.abs().max().item() for g in g_ref) > 1e-3
    assert any(not torch.equal(tr.model.state_dict()[k], start[k]) for k in start)
    tr.train_step()  # training goes on at the new split
    assert sizes == [4, 2, 2, 2, 2] and tr.pos.step == 2

    always = make_trainer()
    monkeypatch.setattr(always, "compiled_model", lambda *a, **k: (_ for _ in ()).throw(torch.OutOfMemoryError("fake")))
    with pytest.raises(ddpm.TrainingError, match="micro-batch 1"):
        always.train_step()


@pytest.mark.parametrize("fused", [True, False])
def test_non_finite_updates_are_skipped_counted_and_stop_training(monkeypatch, fused):
    tr = make_trainer()
    if not fused:
        tr.opt = torch.optim.Adam(tr.model.parameters(), lr=tr.tc.lr)
        tr.fused = False
    real = tr.compiled_model
    mode = {"nan": False}

    def loss_fn(x, t, noise, w=None, **kw):
        loss, per = real(x, t, noise, w, **kw)
        return (loss * float("nan") if mode["nan"] else loss), per

    monkeypatch.setattr(tr, "compiled_model", loss_fn)
    one_step(tr)  # one good step, so the optimizer has state
    weights = {k: v.clone() for k, v in tr.model.state_dict().items()}
    opt_state = {i: {k: v.clone() for k, v in s.items()} for i, s in tr.opt.state_dict()["state"].items()}
    mode["nan"] = True
    for _ in range(9):
        one_step(tr)
        tr.check_health()  # fewer than 10 in a row: goes on
    assert_same_tensors(tr.model.state_dict(), weights, "weights after skipped updates")
    assert_same_tensors(tr.opt.state_dict()["state"], opt_state, "optimizer state after skipped updates")
    assert tr.pos.step == 10 and int(tr.stats.bad_total.item()) == 9
    assert all(torch.isfinite(v).all() for v in tr.ema.model.state_dict().values())
    assert torch.isfinite(tr.stats.loss_sum)
    one_step(tr)
    with pytest.raises(ddpm.TrainingError, match="10 non-finite"):
        tr.check_health()

    # a good step in between resets the count
    tr2 = make_trainer()
    real2 = tr2.compiled_model
    monkeypatch.setattr(tr2, "compiled_model", lambda x, t, n, w=None, **kw: (
        real2(x, t, n, w, **kw)[0] * (float("nan") if tr2.pos.step != 6 else 1.0), real2(x, t, n, w, **kw)[1]))
    for _ in range(12):
        one_step(tr2)
        tr2.check_health()
    assert int(tr2.stats.bad_total.item()) == 11


def test_non_finite_losses_via_cli_exit_1_and_keep_the_checkpoints(tmp_path, monkeypatch, capsys):
    nan_losses(monkeypatch, lambda k: k > 4)  # steps 1-4 good, then NaN
    assert train(tmp_path, "--max-steps", "100", "--epochs", "100") == 1
    err = capsys.readouterr().err
    line = one_line(err)
    assert line.startswith("ddpm.py: training stopped:") and "non-finite" in line and "step 14" in line
    ckpt = tmp_path / "ckpt"
    objs = [ddpm.read_checkpoint(p) for p in sorted(ckpt.glob("ckpt-*.pth"))]
    good = [o for o in objs if o["step"] == 4]
    assert len(good) == 1 and max(o["step"] for o in objs) == 12
    for o in objs:
        assert all(torch.isfinite(v).all() for part in ("model", "ema") for v in o[part].values())
        if o["step"] > 4:  # every later update was skipped: the weights are those of step 4
            assert_same_tensors(o["model"], good[0]["model"], "model")


@pytest.mark.skipif(os.name != "posix", reason="asks the pid with signal 0")
def test_only_temp_files_of_dead_processes_are_stale(tmp_path):
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(done.stdout)
    for pid, stale in ((os.getpid(), False), (os.getppid(), False), (dead, True)):
        p = tmp_path / f".ckpt-0.pth.tmp-{pid}"
        p.write_bytes(b"partial")
        assert ddpm.is_stale_temp(p) is stale, pid
