"""Each setting is declared once, beside its dataclass field (ddpm.setting): its flag, help and --help
group, type and range, the demo preset's value, where it acts, and what --resume does with it. The
parser, the checks, the resume rules and the job builders are read from the declarations; these
tests walk them, and resume a run with every stored setting changed on the command line."""
from dataclasses import fields

import pytest

import ddpm
from conftest import MODEL, QUIET, copy_run, dirs, error_line, one_line

HOMES = (ddpm.ModelConfig, ddpm.SampleSpec, ddpm.DataFlags, ddpm.TrainConfig, ddpm.LoadSpec, ddpm.RuntimeFlags,
         ddpm.Outputs, ddpm.ModelJob, ddpm.SampleJob, ddpm.EditJob, ddpm.InvertJob, ddpm.EvalJob, ddpm.TrainJob,
         ddpm.InfoJob, ddpm.ExportJob)


def test_every_field_declares_its_setting_or_says_where_it_comes_from():
    for cls in HOMES:
        for f in fields(cls):
            s, why = f.metadata.get("setting"), f.metadata.get("derived")
            assert s is not None or why, f"{cls.__name__}.{f.name}: no flag, and no word on where it comes from"
            if s is not None:
                assert s in ddpm.DECLARED, f"{cls.__name__}.{f.name}"
                assert s.flag.startswith("--") and s.help and s.group in ddpm.GROUPS, s.flag
                assert s.resume in (ddpm.RUN, ddpm.MODEL, ddpm.NOW) and s.commands <= ddpm.EVERY, s.flag
    names = [s.name for s in ddpm.DECLARED]
    assert len(set(names)) == len(names) and len({s.flag for s in ddpm.DECLARED}) == len(names)
    parser = ddpm.build_parser()
    assert {a.dest for a in parser._actions if a.dest != "help"} == set(names)  # the parser is the declarations
    # what --resume keeps from the run is what a checkpoint stores
    stored = ddpm.TrainConfig().to_dict()
    for cls, where in ((ddpm.TrainConfig, stored), (ddpm.SampleSpec, stored["preview"])):
        for name, s in ddpm.settings_of(cls).items():
            assert s.resume != ddpm.RUN or name in where, s.flag
    assert set(ddpm.MODEL_FLAGS) == {n for n, s in ddpm.settings_of(ddpm.ModelConfig).items() if s.resume == ddpm.MODEL}


# a value other than the run's for every setting of TrainConfig and SampleSpec that --resume keeps; the
# samplers' own knobs are tried with their samplers, EDM's noise levels on the run's v objective
CHANGED = {
    "batch_size": ["--batch-size", "2"], "grad_accum": ["--grad-accum", "2"], "lr": ["--lr", "0.002"],
    "lr_schedule": ["--lr-schedule", "cosine"], "warmup_steps": ["--warmup-steps", "3"], "epochs": ["--epochs", "7"],
    "ema_decay": ["--ema-decay", "0.99"], "precision": ["--precision", "fp32"], "holdout": ["--holdout", "0.5"],
    "max_nonfinite": ["--max-nonfinite", "5"], "log_every": ["--log-every", "2"], "sample_every": ["--sample-every", "5"],
    "tensorboard": ["--tensorboard"], "pictures": ["--run-pictures"], "guide_snapshot": ["--guide-snapshot", "0.9"],
    "dropout": ["--dropout", "0.2"], "loss_weight": ["--loss-weight", "min-snr"], "min_snr_gamma": ["--min-snr-gamma", "3"],
    "eval_every": ["--eval-every", "3"], "eval_samples": ["--eval-samples", "2"], "posthoc_ema": ["--posthoc-ema"],
    "posthoc_snapshots": ["--posthoc-snapshots", "4"],
    "sampler": ["--sampler", "ddim"], "steps": ["--steps", "4"], "eta": ["--eta", "0.5"], "grid": ["--grid", "uniform"],
    "clip": ["--no-clip"],
}
BY_SAMPLER = {"churn": ["--sampler", "heun", "--churn", "2"], "variance": ["--sampler", "ddpm", "--ddpm-variance", "small"]}
REFUSED = {"edm_p_mean": ["--edm-p-mean", "-1"], "edm_p_std": ["--edm-p-std", "1"]}


def test_resume_says_each_stored_setting_typed_again_and_keeps_it(tiny_run, tmp_path, capsys):
    kept = {n for cls in (ddpm.TrainConfig, ddpm.SampleSpec) for n, s in ddpm.settings_of(cls).items()
            if s.resume == ddpm.RUN}
    assert kept == set(CHANGED) | set(BY_SAMPLER) | set(REFUSED), "a setting --resume keeps has no case here"
    ckpt = copy_run(tiny_run, tmp_path)
    run = ["--train", "--resume", *dirs(tmp_path)]
    capsys.readouterr()
    flags = [a for v in CHANGED.values() for a in v]
    assert ddpm.main([*run, *flags, "--max-steps", "4"]) == 0
    out = capsys.readouterr().out
    settings = {**ddpm.settings_of(ddpm.TrainConfig), **ddpm.settings_of(ddpm.SampleSpec)}
    for name in CHANGED:
        assert f"resume: {settings[name].flag} " in out, name
    # a plain --resume keeps them: they are the run's now
    assert ddpm.main([*run, "--max-steps", "5"]) == 0
    stored = ddpm.read_checkpoint(ddpm.newest_checkpoint(ckpt))["train"]
    assert (stored["lr"], stored["tensorboard"], stored["pictures"], stored["loss_weight"]) == (0.002, True, True,
                                                                                               "min-snr")
    assert stored["preview"] == {**stored["preview"], "sampler": "ddim", "steps": 4, "eta": 0.5, "grid": "uniform",
                                 "clip": False}
    assert "resume: --" not in capsys.readouterr().out
    for name, typed in BY_SAMPLER.items():
        assert ddpm.main([*run, *typed, "--max-steps", "5"]) == 0
        assert f"resume: {settings[name].flag} " in capsys.readouterr().out, name
    # typed where they cannot act, they are refused in one line and the run is left as it was
    for name, typed in REFUSED.items():
        assert ddpm.main([*run, *typed]) == 2
        assert f"{settings[name].flag} goes with --objective edm, and the run has v" in error_line(capsys)
    for typed, message in ((["--num-channels", "16"], "checkpoint config disagrees with the model flags"),
                           (["--demo-images", "16"], "add --resume-with-new-data")):
        assert ddpm.main([*run, *typed]) == 2
        assert message in error_line(capsys)
    assert ddpm.main([*run, "--seed", "9", "--max-steps", "6"]) == 0
    assert "resume: --seed 9 (the run used 0)" in capsys.readouterr().out


@pytest.mark.parametrize("flags, message", [
    (["--sampler", "heun", "--eta", "0.5"], "--eta goes with --sampler ddim, not heun"),
    (["--eta", "0.3"], "--eta goes with --sampler ddim, not dpm++"),
    (["--sampler", "heun", "--ddpm-variance", "small"], "--ddpm-variance goes with --sampler ddpm or --eval nll"),
    (["--churn", "2"], "--churn goes with --sampler heun, not dpm++"),
    (["--guide-snapshot", "0.5"], "--guide-snapshot goes with --train, not with sampling"),
    (["--eval-samples", "8"], "--eval-samples goes with --train, not with sampling"),
    (["--num-samples", "4", "--index", "3"], "--index makes one image"),
    (["--eval", "swd", "--holdout", "0.1"], "--holdout goes with --train, not with --eval"),
])
def test_every_typed_flag_acts_or_is_refused(tiny_run, tmp_path, capsys, flags, message):
    assert ddpm.main(["--loadckpt", str(tiny_run / "ckpt"), "--device", "cpu", "--save-dir", str(tmp_path / "o"),
                      *flags]) == 2
    assert message in error_line(capsys)
    assert not (tmp_path / "o").exists()


def test_training_settings_that_need_another_are_refused_before_any_work(tmp_path, capsys):
    train = ["--train", "--demo", "--demo-images", "8", *MODEL, "--batch-size", "4", *QUIET, *dirs(tmp_path)]
    for flags, message in ((["--edm-p-std", "2"], "--edm-p-std goes with --objective edm"),
                           (["--min-snr-gamma", "2"], "--min-snr-gamma goes with --loss-weight min-snr"),
                           (["--eval-folders", str(tmp_path)], "--eval-folders names held-out images")):
        assert ddpm.main([*train, *flags]) == 2
        assert message in one_line(capsys.readouterr().err)
    assert not (tmp_path / "ckpt").exists()
