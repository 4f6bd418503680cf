"""The speed paths compute the same thing: bf16 autocast, torch.compile, and checkpoints of compiled
models. torch.compile runs with the aot_eager backend here (it traces the model with dynamo and
AOTAutograd like inductor does, without spending minutes generating C++ on a 2-core CPU)."""
import torch

import ddpm
from conftest import MODEL

TINY = [*MODEL, "--device", "cpu", "--batch-size", "4", "--seed", "5"]


def tiny_diffusion(seed=0):
    torch.manual_seed(seed)
    return ddpm.GaussianDiffusion(ddpm.UNet(3, 32, (1, 2), (False, True), 1, dropout=0.0), 50)


def test_bf16_loss_agrees_with_fp32_within_rounding():
    model = tiny_diffusion()
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(8, 3, 8, 8, generator=g) * 2 - 1
    t = torch.randint(0, 50, (8,), generator=g)
    noise = torch.randn(8, 3, 8, 8, generator=g)
    fp32 = model(x0, t, noise)
    rt = ddpm.Runtime(torch.device("cpu"), "bf16")
    with rt.autocast():
        bf16 = model(x0, t, noise)
        eps = model.eps_model(model.q_sample(x0, t, noise), t)
    assert eps.dtype == torch.bfloat16  # autocast really ran the network in bf16 ...
    assert bf16.dtype == torch.float32  # ... and the loss stays in fp32
    assert abs(bf16.item() - fp32.item()) / fp32.item() < 0.03  # bf16 has 8 bits of mantissa
    assert bf16.item() != fp32.item()


def test_compiled_model_gives_the_same_outputs_and_gradients():
    eager = tiny_diffusion()
    compiled = torch.compile(eager.eps_model, backend="aot_eager")
    x = torch.randn(4, 3, 8, 8)
    t = torch.tensor([0, 10, 30, 49])
    y_e = eager.eps_model(x, t)
    y_c = compiled(x, t)
    torch.testing.assert_close(y_c, y_e, rtol=1e-5, atol=1e-5)
    g_e = torch.autograd.grad(y_e.square().sum(), list(eager.eps_model.parameters()))
    g_c = torch.autograd.grad(compiled(x, t).square().sum(), list(eager.eps_model.parameters()))
    for a, b in zip(g_c, g_e):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def _trainer(argv, rt=None):
    job = ddpm.parse_command_line(["--train", "--demo", "--demo-images", "8", *TINY, *argv])
    rt = rt or ddpm.Runtime(torch.device("cpu"), "fp32", compile="--compile" in argv)
    return ddpm.Trainer(job.train, rt, job.cfg.validate(), ddpm.Batches(ddpm.demo_faces(8, 8), rt.device, 5), 5)


def test_compiled_training_matches_eager_and_its_checkpoint_loads_uncompiled(monkeypatch, tmp_path):
    real_compile = torch.compile
    monkeypatch.setattr(ddpm.torch, "compile", lambda fn, **kw: real_compile(fn, backend="aot_eager"))
    runs = {}
    for name, extra in (("eager", ["--no-compile"]), ("compiled", ["--compile"])):
        tr = _trainer(extra)
        assert (tr.compiled_model is not tr.train_model) == (name == "compiled")
        for _ in range(3):
            tr.train_step()
        runs[name] = tr
    for (k, a), b in zip(runs["compiled"].model.state_dict().items(), runs["eager"].model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=k)
    path = tmp_path / "ckpt-0.pth"
    runs["compiled"].save(path)
    state = ddpm.read_checkpoint(path)
    assert not [k for k in state["model"] if "_orig_mod" in k or k.startswith("module.")]
    plain = ddpm.load_model(path, use_ema=False)  # an ordinary, uncompiled GaussianDiffusion
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([5, 25])
    runs["compiled"].model.eval()
    torch.testing.assert_close(plain.eps_model(x, t), runs["compiled"].model.eps_model(x, t))


def test_compile_falls_back_to_eager_with_one_warning(monkeypatch, capsys):
    monkeypatch.setattr(ddpm, "compile_available", lambda device: (False, "Triton is not installed"))
    monkeypatch.setattr(ddpm, "_warned", set())
    assert ddpm.resolve_compile(True, torch.device("cuda")) is False
    assert ddpm.resolve_compile(True, torch.device("cuda")) is False
    assert ddpm.resolve_compile(False, torch.device("cuda")) is False
    err = capsys.readouterr().err
    assert err.count("torch.compile unavailable (Triton is not installed); running in eager mode") == 1
    rt = ddpm.setup_runtime("cpu", "fp32", True, training=True)  # the runtime records the decision
    assert rt.compile is False
    tr = _trainer([], rt)
    assert tr.compiled_model is tr.train_model  # eager
    monkeypatch.setattr(ddpm, "compile_available", lambda device: (True, ""))
    assert ddpm.resolve_compile(True, torch.device("cuda")) is True


def test_the_private_torch_helpers_and_their_public_fallbacks_agree(tmp_path, monkeypatch):
    """Each private torch function on the hot path sits behind one function with a public fallback
    (ddpm.PRIVATE_TORCH = False): the same results, helper by helper and over a run with a skipped step."""
    g = torch.Generator().manual_seed(0)
    ts = [torch.randn(5, 3, generator=g), torch.randn(7, generator=g)]
    results = {}
    for private in (True, False):
        monkeypatch.setattr(ddpm, "PRIVATE_TORCH", private)
        dst = [t.clone() for t in ts]
        ddpm.lerp_all(dst, [t * 2 for t in ts], torch.tensor(0.25))
        found = torch.zeros(1)
        ddpm.flag_nonfinite([ts[0], ts[1] * float("nan")], found, torch.ones(1))
        clean = torch.zeros(1)
        ddpm.flag_nonfinite(ts, clean, torch.ones(1))
        results[private] = (dst, ddpm.all_finite(ts), ddpm.all_finite([ts[0], ts[1] / 0]), found, clean)
    (a, fa, ia, na, ca), (b, fb, ib, nb, cb) = results[True], results[False]
    assert all(torch.allclose(x, y, rtol=0, atol=1e-6) for x, y in zip(a, b))
    assert (fa, ia, float(na), float(ca)) == (fb, ib, float(nb), float(cb)) == (True, False, 1.0, 0.0)
    # a whole tiny run, one of whose steps is skipped as non-finite: the same weights either way
    weights, real, calls = [], ddpm.GaussianDiffusion.forward, []

    def forward(self, *a, **k):
        calls.append(1)
        loss, per = real(self, *a, **k)  # the trainer asks for each image's loss too
        return (loss * float("nan") if len(calls) % 3 == 2 else loss), per  # the second step of each run
    monkeypatch.setattr(ddpm.GaussianDiffusion, "forward", forward)
    for private in (True, False):
        monkeypatch.setattr(ddpm, "PRIVATE_TORCH", private)
        root = tmp_path / str(private)
        assert ddpm.main(["--train", "--demo", "--demo-images", "8", *TINY, "--batch-size", "4", "--max-steps", "3",
                          "--seed", "1", "--no-run-pictures", "--sample-every", "0", "--eval-every", "0",
                          "--ckpt-save-dir", str(root / "ckpt"), "--save-dir", str(root / "out")]) == 0
        weights.append(ddpm.read_checkpoint(ddpm.newest_checkpoint(root / "ckpt")))
    for part in ("model", "ema"):
        for k in weights[0][part]:
            torch.testing.assert_close(weights[0][part][k], weights[1][part][k], rtol=0, atol=1e-6)
