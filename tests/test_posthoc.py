"""EDM2's post-hoc EMA (Karras et al. 2024, Sec. 3): the power-function profiles against their closed
form, the least-squares rebuild of a profile from snapshots, and --posthoc-ema / --ema-length from the
command line (rebuilt weights, refused widths, snapshots across --resume)."""
import math

import pytest
import torch

import ddpm
from conftest import MODEL, QUIET, dirs, error_line


def test_the_power_profile_matches_its_closed_form():
    for sigma_rel in (0.03, 0.05, 0.10, 0.2, 0.28):
        g = ddpm.power_gamma(sigma_rel)
        # the profile p(u) = (g + 1) u^g on [0, 1]: its deviation is sigma_rel (integrated numerically here)
        u = torch.linspace(0, 1, 200_001, dtype=torch.float64)[1:]
        p = (g + 1) * u ** g
        mean = torch.trapezoid(u * p, u)
        std = torch.sqrt(torch.trapezoid((u - mean) ** 2 * p, u))
        assert float(std) == pytest.approx(sigma_rel, rel=1e-3), sigma_rel
    # the discrete update averages theta(n) = n into (g + 1) / (g + 2) n, the integral's value, up to O(1/n)
    net = torch.nn.Linear(1, 1, bias=False)
    ema = ddpm.PowerEMA(net, widths=(0.05, 0.2))
    for n in range(1, 2001):
        net.weight.data.fill_(float(n))
        ema.update()
    for g, avg in zip(ema.gammas, ema.avgs):
        assert float(avg[0]) == pytest.approx((g + 1) / (g + 2) * 2000, rel=2e-3)


def test_a_tracked_profile_is_rebuilt_from_snapshots_exactly_and_others_closely():
    torch.manual_seed(0)
    net = torch.nn.Linear(8, 8)
    both, third = ddpm.PowerEMA(net), ddpm.PowerEMA(net, widths=(0.08,))
    snaps = []
    for n in range(1, 401):  # a random walk of the weights, snapshots every 25 updates
        with torch.no_grad():
            for q in net.parameters():
                q.add_(torch.randn_like(q) * 0.1)
        both.update()
        third.update()
        if n % 25 == 0:
            snaps.append((n, [[a.clone() for a in avg] for avg in both.avgs]))
    sources = [(n, g) for n, _ in snaps for g in both.gammas]

    def rebuild(width):
        x, err = ddpm.posthoc_fit(sources, (400.0, ddpm.power_gamma(width)))
        out = [sum(x[2 * i + j] * snaps[i][1][j][k] for i in range(len(snaps)) for j in range(2)) for k in range(2)]
        return out, err
    for j, width in enumerate(ddpm.POSTHOC_WIDTHS):  # a profile that was tracked: its last snapshot, exactly
        got, err = rebuild(width)
        assert err < 1e-6
        for a, b in zip(got, both.avgs[j]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    got, err = rebuild(0.08)  # one that was not: within the fit's error of the one tracked alongside
    assert err < 0.01
    spread = float(torch.cat([(a - b).flatten() for a, b in zip(both.avgs[0], both.avgs[1])]).norm())
    miss = float(torch.cat([(a - b).flatten() for a, b in zip(got, third.avgs[0])]).norm())
    assert miss < 0.05 * spread, (miss, spread)


def train(root, *flags) -> int:
    return ddpm.main(["--train", "--demo", "--demo-images", "16", *MODEL, "--batch-size", "4", "--seed", "0", *QUIET,
                      *dirs(root), "--posthoc-ema", "--posthoc-snapshots", "4", *flags])


def test_posthoc_ema_from_the_command_line_survives_resume(tmp_path, capsys):
    one, two = tmp_path / "one", tmp_path / "two"
    assert train(one, "--epochs", "4") == 0  # 16 steps, a snapshot every 4
    assert "post-hoc EMA: widths 0.05 and 0.1, a snapshot of both every 4 steps" in capsys.readouterr().out
    snaps = sorted((one / "ckpt" / "posthoc").glob("phema-*.pth"))
    assert [p.name for p in snaps] == [f"phema-{s:07d}.pth" for s in (4, 8, 12, 16)]
    # the same run stopped at step 6 and resumed: the snapshots already written stay as they were
    assert train(two, "--epochs", "4", "--max-steps", "6") == 0
    first = {p.name: p.read_bytes() for p in (two / "ckpt" / "posthoc").glob("*.pth")}
    assert sorted(first) == ["phema-0000004.pth", "phema-0000006.pth"]  # every 4 steps, and where it stopped
    assert ddpm.main(["--train", "--resume", *dirs(two)]) == 0
    after = {p.name: p.read_bytes() for p in (two / "ckpt" / "posthoc").glob("*.pth")}
    assert {k: after[k] for k in first} == first
    for s in (8, 12, 16):  # and the resumed run's are the uninterrupted run's
        a = ddpm.read_checkpoint(two / "ckpt" / "posthoc" / f"phema-{s:07d}.pth")["ema"]
        b = ddpm.read_checkpoint(one / "ckpt" / "posthoc" / f"phema-{s:07d}.pth")["ema"]
        for x, y in zip(a, b):
            assert all(torch.equal(x[k], y[k]) for k in x), s
    # --ema-length: a tracked width is its last snapshot; others rebuilt; a width the snapshots cannot rebuild is
    # refused in one line, nothing written
    model = ddpm.load_model(one / "ckpt", ema_length=0.10)
    last = ddpm.read_checkpoint(snaps[-1])["ema"][1]
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, last[k], rtol=1e-5, atol=1e-6)
    capsys.readouterr()
    out = tmp_path / "out"
    assert ddpm.main(["--loadckpt", str(one / "ckpt"), "--ema-length", "0.08", "--num-samples", "2", "--device", "cpu",
                      "--save-dir", str(out)]) == 0
    assert "post-hoc EMA of relative width 0.08 at step 16, from 4 snapshots" in capsys.readouterr().out
    assert ddpm.main(["--loadckpt", str(one / "ckpt"), "--ema-length", "0.01", "--device", "cpu", "--save-dir",
                      str(tmp_path / "o2")]) == 2
    assert "--ema-length 0.01: the 4 post-hoc snapshots of this run up to step 16 rebuild it only to" in error_line(capsys)
    assert not (tmp_path / "o2").exists()
    assert ddpm.main(["--loadckpt", str(one / "ckpt"), "--eval", "swd", "--ema-length", "0.05", "0.1", "--num-samples",
                      "4", "--device", "cpu", "--seed", "0"]) == 0
    assert "post-hoc EMA, SWD x1e3 by --ema-length: 0.05: " in capsys.readouterr().out
    assert not math.isnan(ddpm.power_gamma(0.05))



def test_posthoc_snapshots_that_do_not_fit_on_the_disk_are_refused_before_anything_is_written(tmp_path, capsys,
                                                                                               monkeypatch):
    assert train(tmp_path / "roomy", "--epochs", "4") == 0
    snaps = sorted((tmp_path / "roomy" / "ckpt" / "posthoc").glob("phema-*.pth"))
    assert len(snaps) == 4
    size = sum(4 * v.numel() for avg in ddpm.read_checkpoint(snaps[0])["ema"] for v in avg.values())
    real = ddpm.shutil.disk_usage
    monkeypatch.setattr(ddpm.shutil, "disk_usage", lambda p: real(p)._replace(free=3 * size))  # room for 3 of 4
    capsys.readouterr()
    assert train(tmp_path / "tight", "--epochs", "4") == 2
    line = error_line(capsys)
    assert "--posthoc-ema: 4 more snapshots of" in line and "lower --posthoc-snapshots" in line, line
    assert not (tmp_path / "tight" / "ckpt" / "posthoc").exists()
    assert not list((tmp_path / "tight" / "ckpt").glob("ckpt-*.pth"))
