"""The UNet: size, per-image independence, the original script's attention (legacy mode), the
state_dict layout of the original, configuration errors and the command line's help.

References are written here from the spec's description, not taken from ddpm.py: attention is
recomputed with torch's own nn.MultiheadAttention on the same weights.
"""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import ddpm

REPO = Path(__file__).resolve().parent.parent
TINY = dict(img_channels=3, num_channels=32, channel_multiples=(1, 2), has_attn=(False, True), num_blocks=1,
            dropout=0.0)


def tiny_unet(legacy: bool, seed: int = 0) -> ddpm.UNet:
    torch.manual_seed(seed)
    return ddpm.UNet(legacy_attention=legacy, **TINY).eval()


def batch(n: int = 5, size: int = 8, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, size, size, generator=g)
    t = torch.randint(0, 1000, (n,), generator=g)
    return x, t


def attention_blocks(model: nn.Module):
    blocks = [m for m in model.modules() if isinstance(m, ddpm.AttentionBlock)]
    assert blocks, "the tiny UNet must contain attention for these tests to mean anything"
    return blocks


# -- size -------------------------------------------------------------------------------------------

def test_default_unet_has_54_56m_parameters():
    n = sum(p.numel() for p in ddpm.UNet().parameters())
    assert abs(n - 54.56e6) / 54.56e6 < 0.01, n


# -- batch independence -----------------------------------------------------------------------------

@torch.no_grad()
def test_an_image_does_not_depend_on_its_batch_mates():
    model = tiny_unet(legacy=False)
    x, t = batch(5)
    alone = model(x[:1], t[:1])
    together = model(x, t)[:1]
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=0)
    # and with other batch-mates than before
    x2, t2 = batch(5, seed=2)
    x2[0], t2[0] = x[0], t[0]
    torch.testing.assert_close(model(x2, t2)[:1], alone, atol=1e-5, rtol=0)


@torch.no_grad()
def test_legacy_attention_mixes_the_batch_so_the_check_above_can_fail():
    model = tiny_unet(legacy=True)
    x, t = batch(5)
    diff = (model(x, t)[:1] - model(x[:1], t[:1])).abs().max().item()
    assert diff > 1e-3, diff


# -- attention against torch's MultiheadAttention ---------------------------------------------------

def original_attention(block: ddpm.AttentionBlock, x: torch.Tensor) -> torch.Tensor:
    """The original script's attention as the spec describes it: GroupNorm, the (B, HW, C) tensor handed
    to the block's own sequence-first nn.MultiheadAttention (so the B axis is the sequence), and the
    residual added to the normalised input."""
    B, C, H, W = x.shape
    assert not block.attn.batch_first
    h = block.norm(x).reshape(B, C, H * W).transpose(1, 2)   # (B, HW, C)
    out, _ = block.attn(h, h, h, need_weights=False)          # read as (L=B, N=HW, C)
    return (h + out).transpose(1, 2).reshape(B, C, H, W)


def per_image_attention(block: ddpm.AttentionBlock, x: torch.Tensor) -> torch.Tensor:
    """Self-attention over the H*W positions of each image, residual on the block's input, computed by a
    batch-first nn.MultiheadAttention that holds a copy of the block's weights."""
    B, C, H, W = x.shape
    mha = nn.MultiheadAttention(C, block.attn.num_heads, batch_first=True).eval()
    mha.load_state_dict(block.attn.state_dict())
    h = block.norm(x).reshape(B, C, H * W).transpose(1, 2)   # (B, HW, C)
    out, _ = mha(h, h, h, need_weights=False)
    return x + out.transpose(1, 2).reshape(B, C, H, W)


def with_reference_attention(model: nn.Module, reference, monkeypatch) -> None:
    for block in attention_blocks(model):
        monkeypatch.setattr(block, "forward", lambda x, block=block: reference(block, x))


@pytest.mark.parametrize("legacy, reference", [(True, original_attention), (False, per_image_attention)],
                         ids=["legacy-vs-original", "new-vs-batch-first-mha"])
@torch.no_grad()
def test_unet_attention_equals_reference(legacy, reference, monkeypatch):
    model = tiny_unet(legacy)
    x, t = batch(4)
    got = model(x, t)
    with_reference_attention(model, reference, monkeypatch)
    want = model(x, t)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    # the two semantics really differ on these weights, so each comparison could fail
    other = original_attention if reference is per_image_attention else per_image_attention
    with_reference_attention(model, other, monkeypatch)
    assert (model(x, t) - got).abs().max().item() > 1e-3


@pytest.mark.parametrize("legacy", [False, True])
@torch.no_grad()
def test_multihead_attention_block_equals_reference(legacy):
    torch.manual_seed(3)
    block = ddpm.AttentionBlock(ddpm.ModelConfig(legacy_attention=legacy), 64, num_heads=4).eval()
    with torch.no_grad():  # non-trivial norm affine parameters and biases
        for p in block.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(3, 64, 4, 4)
    want = (original_attention if legacy else per_image_attention)(block, x)
    torch.testing.assert_close(block(x), want, atol=1e-5, rtol=0)


# -- state_dict layout of the original script -------------------------------------------------------

def test_state_dict_keys_match_the_original_layout():
    """Default model: per resolution 2 DownBlocks (+ DownSample), up path built in the same order:
    UpBlock(out, in), 2 x UpBlock(out, out) (+ UpSample); attention at the two lowest resolutions."""
    sd = ddpm.GaussianDiffusion(ddpm.UNet()).state_dict()
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    expected = {
        "eps_model.time_emb.mlp.0.weight": (256, 64),
        "eps_model.time_emb.mlp.2.weight": (256, 256),
        "eps_model.in_conv.weight": (64, 3, 3, 3),
        "eps_model.down.0.res.conv1.0.weight": (64,),             # GroupNorm
        "eps_model.down.0.res.conv1.2.weight": (64, 64, 3, 3),
        "eps_model.down.0.res.time_emb.1.weight": (64, 256),
        "eps_model.down.0.res.conv2.3.weight": (64, 64, 3, 3),    # after GroupNorm, SiLU, Dropout
        "eps_model.down.2.conv.weight": (64, 64, 3, 3),           # DownSample
        "eps_model.down.3.res.shortcut.weight": (128, 64, 1, 1),
        "eps_model.down.6.attn.norm.weight": (256,),
        "eps_model.down.6.attn.attn.in_proj_weight": (768, 256),
        "eps_model.down.10.attn.attn.out_proj.weight": (512, 512),
        "eps_model.middle.res1.conv1.2.weight": (512, 512, 3, 3),
        "eps_model.middle.attn.attn.in_proj_weight": (1536, 512),
        "eps_model.middle.attn.attn.in_proj_bias": (1536,),
        "eps_model.middle.res2.conv2.3.weight": (512, 512, 3, 3),
        "eps_model.up.0.res.conv1.2.weight": (64, 128, 3, 3),     # UpBlock(64, 64): 64 + 64 in
        "eps_model.up.0.res.shortcut.weight": (64, 128, 1, 1),
        "eps_model.up.3.conv.weight": (64, 64, 4, 4),             # UpSample (transposed conv)
        "eps_model.up.4.res.conv1.2.weight": (64, 192, 3, 3),     # UpBlock(128, 64): 128 + 64 in
        "eps_model.up.14.attn.attn.in_proj_weight": (1536, 512),
        "eps_model.up.14.res.conv1.2.weight": (512, 1024, 3, 3),
        "eps_model.out_conv.0.weight": (64,),
        "eps_model.out_conv.2.weight": (3, 64, 3, 3),
    }
    for key, shape in expected.items():
        assert shapes.get(key) == shape, (key, shapes.get(key), shape)
    for absent in ("eps_model.down.0.res.shortcut.weight", "eps_model.down.0.attn.norm.weight",
                   "eps_model.down.11.res.conv1.0.weight", "eps_model.up.15.res.conv1.0.weight", "beta",
                   "alpha_bar", "eps_model.time_emb.freqs"):
        assert absent not in shapes, absent
    assert all(k.startswith("eps_model.") for k in shapes)
    # 4 time MLP + 2 in_conv + 4 out_conv + 116 down + 26 middle + 186 up (10 or 12 per residual
    # block with a shortcut, 6 per attention block, 2 per resampling conv)
    assert len(shapes) == 338


# -- configuration errors ---------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, flag", [
    (dict(channel_multiples=(1, 2), has_attn=(False, True, True)), "--has-attn"),
    (dict(img_size=20, channel_multiples=(1, 2, 4, 8), has_attn=(False,) * 4), "--img-size"),
    (dict(num_channels=20, channel_multiples=(1, 2), has_attn=(False, True)), "--num-channels"),  # 8 groups
])
def test_bad_configs_fail_with_one_line(kwargs, flag):
    with pytest.raises(ddpm.DDPMError) as e:
        ddpm.ModelConfig(**kwargs).validate()
    assert flag in str(e.value) and "\n" not in str(e.value)


def test_good_config_validates():
    cfg = ddpm.ModelConfig(img_size=16, **{k: v for k, v in TINY.items() if k != "dropout"})
    assert cfg.validate() is cfg
    ddpm.UNet.from_config(cfg, dropout=0.1)


def test_cli_bad_config_exits_2_with_one_line_and_no_files(tmp_path):
    r = subprocess.run([sys.executable, str(REPO / "ddpm.py"), "--train", "--demo", "--has-attn", "t", "f",
                        "--device", "cpu"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "--has-attn" in lines[0], r.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv, flag", [
    (["--img-size", "20"], "--img-size"),
    (["--num-channels", "36"], "--num-channels"),  # not a multiple of the demo's 8 groups
    (["--channel-multiples", "1", "2", "--has-attn", "f", "t", "t"], "--has-attn"),
])
def test_main_bad_config_exits_2_with_one_line_and_no_files(argv, flag, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    rc = ddpm.main(["--train", "--demo", *argv, "--device", "cpu", "--max-steps", "1"])  # short, were it accepted
    err = capsys.readouterr().err
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and flag in lines[0], err
    assert list(tmp_path.iterdir()) == []


def test_help(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:  # what `python ddpm.py --help` runs (the CLI itself is run above)
        ddpm.main(["--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "dpm++" in text and "25 steps" in text
    assert list(tmp_path.iterdir()) == []
