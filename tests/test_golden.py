"""Behaviour kept through refactoring: a fixed 3-step training run gives the same weights, and a
fixed checkpoint gives the same PNG bytes with every sampler, as recorded in tests/golden.json.

The figures were recorded with the pinned torch of requirements.txt on x86-64, one thread. After a
change that is meant to alter them (a new default, another torch), record them again with
`python tests/test_golden.py --update` and say why in the commit.
"""
import hashlib
import json
import sys
from pathlib import Path

import pytest
import torch

import ddpm
from conftest import MODEL

GOLDEN = Path(__file__).with_name("golden.json")
RUN = ["--train", "--demo", "--demo-images", "8", *MODEL, "--batch-size", "4", "--seed", "3", "--max-steps", "3",
       "--device", "cpu", "--no-run-pictures", "--sample-every", "0",
       "--time-cond", "add", "--norm-groups", "32", "--objective", "eps", "--beta-schedule", "linear"]  # as recorded
SAMPLERS = {"dpm++": [], "ddim-eta": ["--sampler", "ddim", "--eta", "0.5", "--steps", "10"],
            "ddpm": ["--sampler", "ddpm", "--steps", "20"], "ddpm-no-clip": ["--sampler", "ddpm", "--no-clip"]}


def state_hash(state: dict) -> str:
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def record(root: Path) -> dict:
    """The figures, from a run in `root`."""
    assert ddpm.main([*RUN, "--ckpt-save-dir", str(root / "ckpt"), "--save-dir", str(root / "out")]) == 0
    obj = ddpm.read_checkpoint(ddpm.newest_checkpoint(root / "ckpt"))
    out = {"model": state_hash(obj["model"]), "ema": state_hash(obj["ema"]), "step": obj["step"]}
    for name, flags in SAMPLERS.items():
        folder = root / name
        assert ddpm.main(["--loadckpt", str(root / "ckpt"), "--device", "cpu", "--num-samples", "4", "--seed", "11",
                          "--save-dir", str(folder), *flags]) == 0
        out[name] = hashlib.sha256(b"".join((folder / f"ddpm-{i}.png").read_bytes() for i in range(4))).hexdigest()
    return out


@pytest.mark.skipif(not GOLDEN.exists(), reason="no recorded figures")
def test_training_and_sampling_match_the_recorded_figures(tmp_path):
    torch.set_num_threads(1)
    expected = json.loads(GOLDEN.read_text())
    got = record(tmp_path)
    assert got == {k: v for k, v in expected.items() if not k.startswith("_")}


if __name__ == "__main__" and "--update" in sys.argv:
    import tempfile

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        figures = record(Path(tmp))
    figures["_recorded_with"] = f"torch {torch.__version__}"
    GOLDEN.write_text(json.dumps(figures, indent=1) + "\n")
    print(json.dumps(figures, indent=1))
