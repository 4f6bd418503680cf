"""Several processes (gloo on CPU, 2 ranks, launched by torchrun): training and sampling must
equal one process, and only rank 0 may print or write.

torchrun starts one small launcher per rank (written to tmp_path) that imports ddpm and runs
ddpm.main(argv) once per phase (train, resume, sample, ...; one torchrun launch in all, because
starting Python + torch is most of the cost on two cores). In each phase every rank works in its own
folder, so a file written by rank 1 shows up in rank 1's folder; its stdout/stderr go to per-rank
files; its exit status and, after Trainer.fit, its final weights are written next to them. The
one-process references run here, in this process, with one thread like each rank.
"""
import contextlib
import csv
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ddpm
from conftest import MODEL

REPO = Path(__file__).resolve().parent.parent
TINY = [*MODEL, "--device", "cpu"]
# 32 images, global batch 8 = 2 ranks x 2 micro x 2 accumulation: 4 steps per epoch, 8 steps in all
TRAIN = ["--train", "--demo", "--demo-images", "32", *TINY, "--dropout", "0", "--batch-size", "8",
         "--grad-accum", "2", "--epochs", "2", "--seed", "11", "--log-every", "1", "--sample-every", "8",
         "--num-samples", "4", "--warmup-steps", "0", "--lr-schedule", "constant", "--sampler", "dpm++",
         "--steps", "25", "--eval-every", "0", "--posthoc-ema", "--posthoc-snapshots", "2"]
SAMPLE = ["--num-samples", "5", "--batch-size", "4", "--steps", "10", "--seed", "7", "--device", "cpu"]
TIMEOUT = 300  # a deadlock (a collective on only some ranks) shows up as this timeout

LAUNCHER = r'''
import json, os, signal, sys, traceback
rank = int(os.environ["RANK"])
box = os.environ["DDPM_TEST_BOX"]
sys.path.insert(0, REPO)
import torch
import ddpm

fit, train_step = ddpm.Trainer.fit, ddpm.Trainer.train_step
phase, phase_dir = None, None

def dumping_fit(self, *a, **k):
    reason = fit(self, *a, **k)
    torch.save({"model": self.model.state_dict(), "ema": self.ema.model.state_dict(), "step": self.pos.step,
                "reason": reason.value}, os.path.join(phase_dir, "dump%d.pt" % rank))
    return reason

def signalling_step(self):  # phase["sigterm"] = [rank, step]: that rank gets SIGTERM after that step
    train_step(self)
    if phase.get("sigterm") == [rank, self.pos.step]:
        os.kill(os.getpid(), signal.SIGTERM)

ddpm.Trainer.fit, ddpm.Trainer.train_step = dumping_fit, signalling_step
with open(os.path.join(box, "phases.json")) as f:
    phases = json.load(f)
for phase in phases:
    phase_dir = os.path.join(box, phase["name"])
    cwd = os.path.join(phase_dir, "cwd%d" % rank)
    os.makedirs(cwd, exist_ok=True)
    os.chdir(cwd)
    sys.stdout.flush()
    sys.stderr.flush()
    for fd, name in ((1, "out"), (2, "err")):
        f = os.open(os.path.join(phase_dir, "%s%d.txt" % (name, rank)), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(f, fd)
        os.close(f)
    if "port" in phase:  # a fresh rendezvous store: torchrun's would hand out the last phase's addresses
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(phase["port"]),
                          TORCHELASTIC_USE_AGENT_STORE="False")
    try:
        rc = ddpm.main(phase["argv"])
    except BaseException as e:  # printed to the phase's stderr; the next phases still run
        traceback.print_exc()
        rc = repr(e)
    sys.stdout.flush()
    sys.stderr.flush()
    with open(os.path.join(phase_dir, "rc%d" % rank), "w") as f:
        f.write(str(rc))
'''


class Run:
    """One phase on every rank: exit status, output, working folder and final dump of each rank."""

    def __init__(self, box: Path, world: int, launcher_output: str = ""):
        self.box, self.world, self.launcher_output = box, world, launcher_output
        self.cwd = [box / f"cwd{r}" for r in range(world)]

    def rc(self, r):
        path = self.box / f"rc{r}"
        text = path.read_text() if path.exists() else "missing"
        return int(text) if text.lstrip("-").isdigit() else text

    def _read(self, name):
        path = self.box / name
        return path.read_text() if path.exists() else ""

    def out(self, r):
        return self._read(f"out{r}.txt")

    def err(self, r):
        return self._read(f"err{r}.txt")

    def dump(self, r):
        return torch.load(self.box / f"dump{r}.pt", weights_only=True)

    def report(self):
        return "\n".join(f"--- rank {r} rc={self.rc(r)}\nstdout:\n{self.out(r)}\nstderr:\n{self.err(r)}"
                         for r in range(self.world)) + "\n--- torchrun:\n" + self.launcher_output[-3000:]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(box: Path, phases, world: int = 2, meanwhile=None) -> dict:
    """torchrun --standalone --nproc_per_node world launcher.py: every phase on every rank, in order;
    `meanwhile()` runs here while they do. Kills the process group it started on timeout (a deadlock)."""
    box.mkdir(parents=True, exist_ok=True)
    phases = [phases[0]] + [dict(p, port=free_port()) for p in phases[1:]]
    (box / "phases.json").write_text(json.dumps(phases))
    script = box / "launch.py"
    script.write_text(f"REPO = {str(REPO)!r}\n" + LAUNCHER)
    env = {k: v for k, v in os.environ.items()
           if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", DDPM_TEST_BOX=str(box))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world), str(script)]
    proc = subprocess.Popen(cmd, cwd=box, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        if meanwhile is not None:
            meanwhile()
        output = proc.communicate(timeout=TIMEOUT)[0].decode(errors="replace")
    except BaseException as e:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 9)  # torchrun and its workers: the session this test started
        output = proc.communicate()[0].decode(errors="replace")
        if not isinstance(e, subprocess.TimeoutExpired):
            raise
        runs = "\n".join(Run(box / p["name"], world).report() for p in phases)
        pytest.fail(f"ranks did not finish within {TIMEOUT} s (deadlock?)\n{runs}\n{output[-3000:]}")
    assert proc.returncode == 0, output[-3000:]
    return {p["name"]: Run(box / p["name"], world, output) for p in phases}


def files(folder: Path) -> set:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()} if folder.exists() else set()


def metrics_rows(path: Path) -> list:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def run_here(folder: Path, args) -> int:
    """ddpm.main(args) in this process, one process (one thread, like each rank: see conftest.py),
    with `folder` as the working directory."""
    folder.mkdir(parents=True, exist_ok=True)
    old = os.getcwd()
    os.chdir(folder)
    try:
        return ddpm.main(args)
    finally:
        os.chdir(old)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every 2-process phase, in one torchrun launch; meanwhile, the training run in one process here
    (runs["one"] is its folder)."""
    box = tmp_path_factory.mktemp("two")
    one = tmp_path_factory.mktemp("one")
    ckpt0, ckpt1 = (str(box / "train" / "cwd0" / "ckpt" / f"ckpt-{i}.pth") for i in (0, 1))
    quiet = ["--no-run-pictures", "--sample-every", "0"]
    faces = ddpm.demo_faces(2, 8, seed=3)
    for i in range(2):  # the inputs of the edit phase; a mask that redraws the right half
        ddpm.save_png(faces[i], box / f"face{i}.png")
    mask = torch.zeros(1, 8, 8, dtype=torch.uint8)
    mask[..., 4:] = 255
    ddpm.save_png(mask, box / "mask.png")
    rc_one = []
    runs = launch(box, [
        # 8 steps, with run pictures and a preview
        {"name": "train", "argv": TRAIN},
        # the run again from its step-4 checkpoint
        {"name": "resume", "argv": [*TRAIN, *quiet, "--resume", "--loadckpt", ckpt0]},
        {"name": "sample", "argv": ["--loadckpt", ckpt1, *SAMPLE]},
        {"name": "edit", "argv": ["--loadckpt", ckpt1, *edit_flags(box)]},
        {"name": "indivisible", "argv": [*TRAIN, *quiet, "--batch-size", "3", "--grad-accum", "1"]},
        # 16 steps per epoch; rank 1 alone gets SIGTERM after step 3
        {"name": "sigterm", "argv": [*TRAIN, *quiet, "--batch-size", "2", "--grad-accum", "1", "--epochs", "1"],
         "sigterm": [1, 3]},
    ], meanwhile=lambda: rc_one.append(run_here(one, TRAIN)))
    assert rc_one == [0]
    runs["one"] = one
    return runs


@pytest.fixture(scope="module")
def two(runs):
    run = runs["train"]
    assert [run.rc(0), run.rc(1)] == [0, 0], run.report()
    return run


@pytest.fixture(scope="module")
def one(runs):
    """The same training run in one process."""
    return runs["one"]


def assert_same_state(a: dict, b: dict, what: str):
    assert a.keys() == b.keys(), what
    for k in a:
        assert torch.equal(a[k], b[k]), f"{what}: {k} differs"


def test_ranks_hold_bitwise_equal_weights(two):
    d0, d1 = two.dump(0), two.dump(1)
    assert d0["step"] == d1["step"] == 8
    assert_same_state(d0["model"], d1["model"], "model weights on rank 0 vs rank 1")
    ckpt = ddpm.read_checkpoint(two.cwd[0] / "ckpt" / "ckpt-1.pth")
    assert ckpt["step"] == 8 and ckpt["world_size"] == 2
    assert_same_state(ckpt["model"], d0["model"], "checkpoint vs the trained weights")
    assert len(ckpt["rng"]["torch"]) == 2  # every rank's RNG state is in the checkpoint
    # the weights moved: not trivially equal because nothing was trained
    fresh = ddpm.read_checkpoint(two.cwd[0] / "ckpt" / "ckpt-0.pth")
    assert not torch.equal(fresh["model"]["eps_model.in_conv.weight"], ckpt["model"]["eps_model.in_conv.weight"])


def test_ranks_hold_bitwise_equal_ema(two):
    d0, d1 = two.dump(0), two.dump(1)
    assert_same_state(d0["ema"], d1["ema"], "EMA weights on rank 0 vs rank 1")
    ckpt = ddpm.read_checkpoint(two.cwd[0] / "ckpt" / "ckpt-1.pth")
    assert_same_state(ckpt["ema"], d0["ema"], "checkpoint EMA vs the trained EMA")


def test_two_processes_match_one_process(two, one):
    a = ddpm.read_checkpoint(two.cwd[0] / "ckpt" / "ckpt-1.pth")
    b = ddpm.read_checkpoint(one / "ckpt" / "ckpt-1.pth")
    assert a["step"] == b["step"] == 8 and a["images_seen"] == b["images_seen"] == 64
    # The loss of every step is that of the same global batch (same images, t and noise) under the
    # same weights: it would drift by ~1e-2 if a rank saw other data or the gradients were not averaged.
    # (The logged loss is the mean over the global batch on 2 processes too.)
    la = [float(r["loss"]) for r in metrics_rows(two.cwd[0] / "ckpt" / "metrics.csv")]
    lb = [float(r["loss"]) for r in metrics_rows(one / "ckpt" / "metrics.csv")]
    assert len(la) == len(lb) == 8
    assert la == pytest.approx(lb, rel=1e-5, abs=2e-6)
    # Weights: equal up to fp32 summation order, except that Adam divides by sqrt(v): parameters whose
    # true gradient is zero (a bias right before a GroupNorm) take lr-sized steps in the direction of
    # rounding noise. So compare the whole model: the two runs differ by a tiny fraction of how far
    # the weights moved over the last epoch.
    b0 = ddpm.read_checkpoint(one / "ckpt" / "ckpt-0.pth")
    for part in ("model", "ema"):
        keys = sorted(k for k in b[part] if k.startswith("eps_model."))
        assert keys and set(keys) == {k for k in a[part] if k.startswith("eps_model.")}
        flat = lambda d: torch.cat([d[part][k].flatten() for k in keys])  # noqa: E731
        moved = (flat(b) - flat(b0)).norm()
        assert moved > 0.1
        assert (flat(a) - flat(b)).norm() < 0.05 * moved, part


def test_only_rank0_writes_and_prints(two, one):
    expected = files(one)
    assert {"ckpt/ckpt-0.pth", "ckpt/ckpt-1.pth", "ckpt/metrics.csv", "ckpt/events.csv",
            "output/run-before.png", "output/run-after.png", "output/final-grid.png", "output/loss.png",
            "output/preview/step-0000008.png", "ckpt/posthoc/phema-0000004.pth", "ckpt/posthoc/phema-0000008.pth"} <= expected
    assert files(two.cwd[0]) == expected
    assert files(two.cwd[1]) == set(), "rank 1 wrote files"
    events = metrics_rows(two.cwd[0] / "ckpt" / "events.csv")
    assert [e["event"] for e in events].count("checkpoint") == 2  # once per epoch, not once per rank
    assert two.out(1) == "" and two.err(1) == "", two.report()
    assert two.out(0).count("[Epoch 0]") == 1 and two.out(0).count("data: 32 built-in demo faces") == 1


def test_resume_on_two_processes_continues_the_run(two, runs):
    run = runs["resume"]
    assert [run.rc(0), run.rc(1)] == [0, 0], run.report()
    assert "resume:" in run.out(0)
    for r in range(2):
        d, ref = run.dump(r), two.dump(0)
        assert d["step"] == 8
        assert_same_state(d["model"], ref["model"], f"resumed model on rank {r}")
        assert_same_state(d["ema"], ref["ema"], f"resumed EMA on rank {r}")
    a = ddpm.read_checkpoint(run.cwd[0] / "ckpt" / "ckpt-1.pth")
    b = ddpm.read_checkpoint(two.cwd[0] / "ckpt" / "ckpt-1.pth")
    assert torch.equal(a["rng"]["noise"], b["rng"]["noise"])
    # the post-hoc EMA went on from the checkpoint: its step-8 snapshot is the uninterrupted run's
    pa, pb = (ddpm.read_checkpoint(r.cwd[0] / "ckpt" / "posthoc" / "phema-0000008.pth")["ema"] for r in (run, two))
    for x, y in zip(pa, pb):
        assert_same_state(x, y, "post-hoc snapshot at step 8, resumed vs uninterrupted")
    assert [r["loss"] for r in metrics_rows(run.cwd[0] / "ckpt" / "metrics.csv")] == \
        [r["loss"] for r in metrics_rows(two.cwd[0] / "ckpt" / "metrics.csv")][4:]
    assert files(run.cwd[1]) == set()


def test_sampling_on_two_processes_writes_the_same_files(two, runs, tmp_path):
    ckpt = str(two.cwd[0] / "ckpt" / "ckpt-1.pth")
    run = runs["sample"]
    assert [run.rc(0), run.rc(1)] == [0, 0], run.report()
    assert run_here(tmp_path / "one", ["--loadckpt", ckpt, *SAMPLE]) == 0
    expected = {f"output/ddpm-{i}.png" for i in range(5)} | {"output/ddpm-all.png"}
    assert files(tmp_path / "one") == expected
    assert files(run.cwd[0]) == expected
    assert files(run.cwd[1]) == set(), "rank 1 wrote files"
    for name in sorted(expected):
        assert (run.cwd[0] / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name
    assert run.out(1) == "" and run.err(1) == "", run.report()


def edit_flags(box: Path) -> list:
    """Inpainting of two images, 3 variations each, at batch 4: 6 images over 2 ranks."""
    return ["--init-images", str(box / "face0.png"), str(box / "face1.png"), "--mask", str(box / "mask.png"),
            "--num-samples", "3", "--batch-size", "4", "--steps", "10", "--sampler", "ddpm", "--seed", "7",
            "--device", "cpu"]


def test_editing_on_two_processes_writes_the_same_files(two, runs, tmp_path):
    box = two.cwd[0].parent.parent
    run = runs["edit"]
    assert [run.rc(0), run.rc(1)] == [0, 0], run.report()
    ckpt = str(two.cwd[0] / "ckpt" / "ckpt-1.pth")
    assert run_here(tmp_path / "one", ["--loadckpt", ckpt, *edit_flags(box)]) == 0
    expected = {f"output/edit-{j}-{v}.png" for j in range(2) for v in range(3)} | {"output/edit-grid.png"}
    assert files(tmp_path / "one") == expected
    assert files(run.cwd[0]) == expected
    assert files(run.cwd[1]) == set(), "rank 1 wrote files"
    for name in sorted(expected):
        assert (run.cwd[0] / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name


def test_indivisible_global_batch_is_refused(runs):
    run = runs["indivisible"]
    assert [run.rc(0), run.rc(1)] == [2, 2], run.report()
    lines = run.err(0).strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ddpm.py: error: --batch-size 3 "), run.report()
    assert "2 processes" in lines[0]
    assert run.err(1) == "", run.report()
    assert files(run.cwd[0]) == files(run.cwd[1]) == set()


def test_sigterm_to_one_rank_stops_every_rank_with_one_checkpoint(runs):
    run = runs["sigterm"]
    assert [run.rc(0), run.rc(1)] == [0, 0], run.report()
    d0, d1 = run.dump(0), run.dump(1)
    assert (d0["step"], d1["step"]) == (3, 3)
    assert (d0["reason"], d1["reason"]) == ("stop on another process", "SIGTERM")
    assert_same_state(d0["model"], d1["model"], "model after the stop")
    assert sorted(p.name for p in (run.cwd[0] / "ckpt").glob("*.pth")) == ["ckpt-0.pth"]
    ckpt = ddpm.read_checkpoint(run.cwd[0] / "ckpt" / "ckpt-0.pth")
    assert ckpt["step"] == 3 and ckpt["epoch_step"] == 3
    assert_same_state(ckpt["model"], d0["model"], "checkpoint after the stop")
    events = metrics_rows(run.cwd[0] / "ckpt" / "events.csv")
    assert [(e["step"], e["event"]) for e in events] == [("3", "checkpoint")]
    assert "stopped (stop on another process) at step 3" in run.out(0)
    assert "SIGTERM" in run.err(1)
    assert files(run.cwd[1]) == set()
