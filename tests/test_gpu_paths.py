"""The CUDA paths, checked on the CPU: what a GPU run would do wrong is reproduced with fakes
(a simulated out-of-memory error, a mocked compute capability, a CUDA generator state, a compiled
model function) and each fix is checked against an independent reference."""
import gc
import weakref

import pytest
import torch

import ddpm
from conftest import MODEL as MODEL_FLAGS
from test_checkpoints import make_trainer, one_step, train

GiB = 2 ** 30
MiB = 2 ** 20


# ----------------------------------------------------------------------------------------------
# out-of-memory retry
# ----------------------------------------------------------------------------------------------

def test_oom_retry_runs_after_the_failed_attempt_is_freed(monkeypatch):
    tr = make_trainer("--dropout", "0")
    real = tr.compiled_model
    failed = []  # weak references to the failed attempt's tensors
    alive_at_retry = []

    def flaky(x, t, noise, w=None, **kw):
        if not failed:
            loss = real(x, t, noise, w)  # a graph with its saved activations, held by this frame
            big = torch.empty(1 << 20)
            failed.extend([weakref.ref(loss), weakref.ref(big)])
            raise torch.OutOfMemoryError("CUDA out of memory (fake)")
        gc.collect()  # what is still alive now is held by something real, not by collectable garbage
        alive_at_retry.append([r() is not None for r in failed])
        return real(x, t, noise, w, **kw)

    monkeypatch.setattr(tr, "compiled_model", flaky)
    tr.train_step()
    assert alive_at_retry and alive_at_retry[0] == [False, False]
    assert (tr.micro, tr.accum, tr.pos.step) == (2, 2, 1)


def test_oom_at_micro_batch_one_is_a_one_line_training_error(monkeypatch):
    tr = make_trainer()
    monkeypatch.setattr(tr, "compiled_model", lambda *a, **k: (_ for _ in ()).throw(torch.OutOfMemoryError("fake")))
    with pytest.raises(ddpm.TrainingError, match="even at micro-batch 1"):
        tr.train_step()
    assert tr.pos.step == 0


# ----------------------------------------------------------------------------------------------
# precision, compile and layout decisions
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("capability, expected", [((7, 5), "fp16"), ((7, 0), "fp16"), ((6, 1), "fp16"),
                                                  ((8, 0), "bf16"), ((8, 9), "bf16"), ((9, 0), "bf16")])
def test_auto_precision_is_bf16_only_where_it_is_native(monkeypatch, capability, expected):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda dev=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # counts emulation too
    precision, why = ddpm.auto_precision(torch.device("cuda", 0))
    assert precision == expected
    assert f"{capability[0]}.{capability[1]}" in why
    assert ddpm.auto_precision(torch.device("cpu"))[0] == "fp32"


def test_channels_last_only_when_compile_really_runs(monkeypatch):
    cuda = ddpm.Runtime(torch.device("cuda"), "fp32")  # never runs a kernel here: only the layout is decided

    def conv_layout(model):
        w = model.eps_model.in_conv.weight
        return "channels_last" if w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous() \
            else "standard"
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)
    for available, compile_, expected in ((True, False, "standard"), (False, True, "standard"),
                                          (True, True, "channels_last")):
        monkeypatch.setattr(ddpm, "compile_available", lambda device, a=available: (a, "no Triton"))
        model = ddpm.build_diffusion(ddpm.ModelConfig(img_size=8, num_channels=32, channel_multiples=(1, 2),
                                                      has_attn=(False, True), num_blocks=1, timesteps=20))
        fn = ddpm.sampling_net(model, cuda, compile_)
        # the compiled network runs in channels_last on a copy: the caller's model is left as it was
        assert conv_layout(model) == "standard" and fn.compiled == (expected == "channels_last")


# ----------------------------------------------------------------------------------------------
# memory plan: micro-batch and the data's place from measured numbers
# ----------------------------------------------------------------------------------------------

# the default 64x64 model in bf16: about 84 MiB of saved activations per image, 54.56M fp32 weights
DEFAULT_PER_IMAGE, DEFAULT_STATE = 84 * MiB, 3 * 4 * 54_560_000


@pytest.mark.parametrize("free_gib, micro, accum", [(6.9, 32, 2), (9.0, 32, 2), (12.0, 64, 1), (79.0, 64, 1),
                                                    (3.5, 16, 4)])
def test_memory_plan_splits_the_batch_on_small_cards(free_gib, micro, accum):
    plan = ddpm.plan_memory(int(free_gib * GiB), DEFAULT_STATE, DEFAULT_PER_IMAGE, 64 * MiB, 64, 1, True, 265 * MiB)
    assert (plan.micro, plan.accum) == (micro, accum)
    need = DEFAULT_STATE + 64 * MiB + ddpm.ACTIVATION_PEAK * micro * DEFAULT_PER_IMAGE
    assert need <= 0.9 * free_gib * GiB  # what was chosen fits
    if micro < 64:  # and twice as much would not have
        assert DEFAULT_STATE + 64 * MiB + ddpm.ACTIVATION_PEAK * 2 * micro * DEFAULT_PER_IMAGE > 0.9 * free_gib * GiB
    assert f"micro-batch {micro}" in plan.note


def test_memory_plan_keeps_typed_grad_accum_and_places_data_last():
    # --grad-accum typed: the flags decide, even when it will not fit (the OOM retry then halves it)
    plan = ddpm.plan_memory(int(6.9 * GiB), DEFAULT_STATE, DEFAULT_PER_IMAGE, 0, 64, 1, False, 0)
    assert (plan.micro, plan.accum) == (64, 1)
    # the data goes on the GPU only if it fits beside one step's activations
    small = ddpm.plan_memory(int(79 * GiB), DEFAULT_STATE, DEFAULT_PER_IMAGE, 0, 64, 1, True, 265 * MiB)
    huge = ddpm.plan_memory(int(79 * GiB), DEFAULT_STATE, DEFAULT_PER_IMAGE, 0, 64, 1, True, 70 * GiB)
    tight = ddpm.plan_memory(int(6.9 * GiB), DEFAULT_STATE, DEFAULT_PER_IMAGE, 0, 64, 1, True, 3 * GiB)
    assert small.data_on_device and not huge.data_on_device and not tight.data_on_device
    assert "in CPU memory" in huge.note and "on the GPU" in small.note


def test_activation_bytes_are_linear_in_the_batch():
    cfg = ddpm.ModelConfig(img_size=16, num_channels=32, channel_multiples=(1, 2), has_attn=(False, True),
                           num_blocks=1, timesteps=50)
    model = ddpm.build_diffusion(cfg).train()
    rt = ddpm.Runtime(torch.device("cpu"), "fp32")
    per_image, fixed = ddpm.activation_bytes(model, rt, cfg)
    # an independent count at batch 4: every saved tensor's storage that is not a weight
    own = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in own:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    x = torch.zeros(4, 3, 16, 16)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x, torch.full((4,), 25), torch.zeros_like(x))
    assert sum(seen.values()) == pytest.approx(fixed + 4 * per_image, rel=0.02)
    # at least the fp32 input of each of the 2 x 16 x 16 x 32 ... feature maps: a sane order of magnitude
    assert 100_000 < per_image < 10 * 2 ** 20


# ----------------------------------------------------------------------------------------------
# resuming on another device type
# ----------------------------------------------------------------------------------------------

def test_resume_of_a_checkpoint_from_another_device_type_reseeds_with_a_note(tmp_path, capsys):
    assert train(tmp_path, "--max-steps", "2") == 0
    ckpt = tmp_path / "ckpt"
    path = ddpm.newest_checkpoint(ckpt)
    obj = ddpm.read_checkpoint(path)
    # as written on a GPU: a CUDA generator's state (16 bytes, not the CPU generator's 5056)
    obj["rng"]["noise"] = torch.zeros(16, dtype=torch.uint8)
    obj["rng"]["device"] = "cuda"
    obj["rng"]["cuda"] = [torch.zeros(16, dtype=torch.uint8)]
    ddpm.save_checkpoint(path, obj)
    capsys.readouterr()
    assert train(tmp_path, "--resume", "--max-steps", "4") == 0
    out = capsys.readouterr().out
    assert "written on cuda and this run is on cpu" in out
    assert ddpm.read_checkpoint(ddpm.newest_checkpoint(ckpt))["step"] == 4
    # an older checkpoint without the device field: told apart by its CUDA states
    obj = ddpm.read_checkpoint(ddpm.newest_checkpoint(ckpt))
    obj["rng"].pop("device")
    obj["rng"]["noise"] = torch.zeros(16, dtype=torch.uint8)
    obj["rng"]["cuda"] = [torch.zeros(16, dtype=torch.uint8)]
    ddpm.save_checkpoint(ddpm.newest_checkpoint(ckpt), obj)
    assert train(tmp_path, "--resume", "--max-steps", "5") == 0
    assert "written on cuda" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------
# sampling: noise drawn ahead, padded last chunk
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return ddpm.build_diffusion(ddpm.ModelConfig(img_size=8, num_channels=32, channel_multiples=(1, 2),
                                                 has_attn=(False, True), num_blocks=1, timesteps=50)).eval()


def reference_images(model, indices, seed, sampler, steps, eta):
    """The images as the sampler made them before noise was drawn ahead: one stack of fresh CPU
    draws per call, from the same per-image generators."""
    gens = [torch.Generator().manual_seed(ddpm.mix_seed(seed, i)) for i in indices]

    def noise():
        return torch.stack([torch.randn(3, 8, 8, generator=g) for g in gens])
    with torch.inference_mode():
        x = model.sample(noise(), ddpm.SampleSpec(sampler, steps, eta), noise_fn=noise,
                         model_fn=lambda x, t: model.eps_model(x, t).float())
    return ddpm.to_uint8(x)


@pytest.mark.parametrize("sampler, eta", [("ddpm", 0.0), ("ddim", 1.0), ("ddim", 0.0), ("dpm++", 0.0)])
def test_noise_drawn_ahead_gives_byte_identical_images(tiny, sampler, eta):
    rt = ddpm.Runtime(torch.device("cpu"), "fp32")
    got = ddpm.generate(tiny, rt, list(range(5)), 11, ddpm.SampleSpec(sampler, 8, eta), batch_size=5,
                        show_progress=False)
    assert torch.equal(got, reference_images(tiny, list(range(5)), 11, sampler, 8, eta))


def test_compiled_sampling_pads_the_last_chunk_and_drops_the_extra_images(tiny):
    rt = ddpm.Runtime(torch.device("cpu"), "fp32")
    shapes = []

    def net(x, t):
        shapes.append(x.shape[0])
        return tiny.eps_model(x, t).float()
    fn = ddpm.SamplingNet(net, compiled=True)  # as sampling_net makes a compiled (CUDA graph) model
    spec = ddpm.SampleSpec("ddim", 4, 0.5)
    got = ddpm.generate(tiny, rt, list(range(10)), 3, spec, batch_size=4, model_fn=fn, show_progress=False)
    assert set(shapes) == {4} and got.shape[0] == 10
    plain = ddpm.generate(tiny, rt, list(range(10)), 3, spec, batch_size=4, show_progress=False)
    assert torch.equal(got, plain)


# ----------------------------------------------------------------------------------------------
# data kept in CPU memory: gathered into a staging buffer, flipped on the device
# ----------------------------------------------------------------------------------------------

def test_batches_gathered_from_cpu_memory_equal_batches_on_the_device():
    data = ddpm.demo_faces(12, 8)
    here = ddpm.Batches(data, torch.device("cpu"), 4)
    staged = ddpm.Batches(data, torch.device("cpu"), 4)
    staged.place(False)  # the path a GPU takes when the data does not fit beside the model
    assert here.on_device and not staged.on_device
    for epoch in (0, 1):
        for start in (0, 4, 8):
            assert torch.equal(here.get(epoch, start, 4), staged.get(epoch, start, 4))
    perm, flip = here.epoch_order(1)
    x = here.get(1, 0, 4)
    ref = ddpm.to_model_range(torch.stack([data[i].flip(2) if f else data[i] for i, f in zip(perm[:4], flip[:4])]))
    assert torch.equal(x, ref)


def test_startup_line_names_the_batch_layout(tmp_path, capsys):
    assert train(tmp_path, "--max-steps", "1") == 0
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.startswith("model:"))
    assert "batch 4 = 1 process(es) x 4 x 1 accumulation" in line


def test_resume_across_memory_layouts_gives_adam_state_in_the_parameters_layout(tmp_path):
    # a compiled CUDA run trains in channels_last; resumed where compile is off (or the reverse), the
    # saved Adam moments must take the new parameters' layout: fused Adam refuses mixed layouts
    first = make_trainer()
    first.model.to(memory_format=torch.channels_last)
    one_step(first)
    first.save(tmp_path / "ckpt-0.pth")
    obj = ddpm.read_checkpoint(tmp_path / "ckpt-0.pth")
    saved = [st["exp_avg"] for st in obj["optimizer"]["state"].values() if st["exp_avg"].dim() == 4]
    assert any(not v.is_contiguous() for v in saved)  # the file keeps the channels_last strides
    resumed = ddpm.Trainer(first.tc, first.rt, first.cfg, ddpm.Batches(ddpm.demo_faces(8, 8), first.rt.device, 0),
                           0, resume=obj)
    for p in resumed.model.parameters():
        for k, v in resumed.opt.state[p].items():
            if v.shape == p.shape:
                assert v.stride() == p.stride(), k
    for (_, a), (_, b) in zip(sorted(resumed.opt.state_dict()["state"].items()), sorted(obj["optimizer"]["state"].items())):
        assert torch.equal(a["exp_avg"], b["exp_avg"])  # same values, new layout
    one_step(resumed)
    assert resumed.pos.step == 2


# ----------------------------------------------------------------------------------------------
# training under CUDA graphs (--compile-mode reduce-overhead): the logic, on the CPU
# ----------------------------------------------------------------------------------------------

def fake_graphs(monkeypatch) -> dict:
    """Run the CUDA-graphs code path on the CPU: the runtime says graphs, torch.compile returns the
    module itself (what matters here is what the trainer does around it), and the calls to
    cudagraph_mark_step_begin and to the compiler's reset are counted."""
    calls = {"mark": 0, "reset": 0, "compile": []}
    monkeypatch.setattr(ddpm.Runtime, "graphs", property(lambda self: self.compile and not self.distributed))
    monkeypatch.setattr(torch, "compile", lambda m, **kw: calls["compile"].append(kw.get("mode")) or m)
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: calls.__setitem__("mark", calls["mark"] + 1))
    monkeypatch.setattr(torch._dynamo, "reset", lambda: calls.__setitem__("reset", calls["reset"] + 1))
    return calls


def graph_trainer(accum: int = 2):
    job = ddpm.parse_command_line(["--train", "--demo", "--demo-images", "8", *MODEL_FLAGS, "--batch-size", "4", "--dropout",
                                   "0", "--grad-accum", str(accum), "--seed", "0"])
    rt = ddpm.Runtime(torch.device("cpu"), "fp32", compile=True, compile_mode="reduce-overhead")
    return ddpm.Trainer(job.train, rt, job.cfg.validate(), ddpm.Batches(ddpm.demo_faces(8, 8), rt.device, 0), 0)


def test_cuda_graph_training_keeps_gradients_in_place_and_matches_eager(monkeypatch):
    plain = make_trainer("--dropout", "0", "--grad-accum", "2")
    for _ in range(3):
        plain.train_step()
    calls = fake_graphs(monkeypatch)
    tr = graph_trainer(accum=2)
    assert tr.graphs and calls["compile"] == ["reduce-overhead"]
    assert all(p.grad is not None for p in tr.model.parameters())  # allocated before the first replay
    where = [p.grad.data_ptr() for p in tr.model.parameters()]
    for _ in range(3):
        tr.train_step()
        assert [p.grad.data_ptr() for p in tr.model.parameters()] == where  # accumulation adds in place
    assert calls["mark"] == 3 * 2  # one replay per micro-batch
    for k, v in plain.model.state_dict().items():  # the same updates as without graphs
        assert torch.equal(v, tr.model.state_dict()[k]), k


def test_cuda_graph_oom_retry_records_new_graphs_and_torchrun_stays_in_default_mode(monkeypatch, capsys):
    calls = fake_graphs(monkeypatch)
    tr = graph_trainer(accum=1)
    real = tr.compiled_model
    failed = []

    def flaky(x, t, noise, w=None, **kw):
        if not failed:
            failed.append(1)
            raise torch.OutOfMemoryError("CUDA out of memory (fake)")
        return real(x, t, noise, w, **kw)
    tr.compiled_model = flaky
    tr.train_step()
    assert calls["reset"] == 1 and calls["compile"] == ["reduce-overhead", "reduce-overhead"]  # the old pool freed
    assert (tr.micro, tr.accum, tr.pos.step) == (2, 2, 1)
    monkeypatch.undo()
    cuda = torch.device("cuda")
    assert ddpm.Runtime(cuda, "bf16", compile=True, compile_mode="reduce-overhead").graphs
    assert not ddpm.Runtime(cuda, "bf16", world=2, compile=True, compile_mode="reduce-overhead").graphs  # DDP hooks
    assert not ddpm.Runtime(cuda, "bf16", compile=True).graphs


def test_cuda_graph_training_resumes_exactly_from_the_command_line(monkeypatch, tmp_path):
    fake_graphs(monkeypatch)
    base = ["--train", "--demo", "--demo-images", "8", *MODEL_FLAGS, "--batch-size", "4", "--seed", "1", "--device", "cpu",
            "--no-run-pictures", "--sample-every", "0", "--eval-every", "0"]
    graphs = [*base, "--compile", "--compile-mode", "reduce-overhead"]
    assert ddpm.main([*graphs, "--max-steps", "5", "--ckpt-save-dir", str(tmp_path / "a"), "--save-dir", str(tmp_path / "o")]) == 0
    assert ddpm.main([*graphs, "--max-steps", "3", "--ckpt-save-dir", str(tmp_path / "b"), "--save-dir", str(tmp_path / "o")]) == 0
    assert ddpm.main(["--train", "--resume", "--max-steps", "5", "--compile", "--compile-mode", "reduce-overhead",
                      "--ckpt-save-dir", str(tmp_path / "b"), "--save-dir", str(tmp_path / "o")]) == 0
    a, b = (ddpm.read_checkpoint(ddpm.newest_checkpoint(tmp_path / r)) for r in ("a", "b"))
    assert a["step"] == b["step"] == 5
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
