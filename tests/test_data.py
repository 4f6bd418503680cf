"""Messy image folders: every decodable image becomes a correct (C, H, W) uint8 image, everything
else is skipped and counted by reason; training on such a folder works; bad folders fail early
with one line; a run writes only under --ckpt-save-dir and --save-dir.

All images are generated here with PIL. Expected pixels come from how the files were built (flat
colour regions, read at their corners, away from the resampling at region borders) and, for EXIF
and CMYK, from PIL's own ImageOps.exif_transpose / convert applied by hand.
"""
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

import ddpm
from conftest import MODEL

S = 8  # --img-size
RUN = ["--batch-size", "4", "--device", "cpu", "--seed", "0"]
RED, BLUE, GREEN, WHITE, BLACK = (255, 0, 0), (0, 0, 255), (0, 255, 0), (255, 255, 255), (0, 0, 0)
BOMB_LIMIT = 4096  # Image.MAX_IMAGE_PIXELS during these tests: 64 x 64


@pytest.fixture
def bomb_limit(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", BOMB_LIMIT)


# -- image writers: each writes one file and returns its path ------------------------------------

def halves(mode, size, left, right):
    """An image whose left half is `left` and right half is `right`."""
    img = Image.new(mode, size, left)
    img.paste(Image.new(mode, (size[0] - size[0] // 2, size[1]), right), (size[0] // 2, 0))
    return img


def palette_png(path):
    """P mode, index 0 (black) fully transparent on the left, index 1 (red) opaque on the right."""
    img = Image.new("P", (16, 16), 0)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    img.paste(1, (8, 0, 16, 16))
    img.save(path, transparency=0)
    return path


def rgba_png(path):
    """RGBA quadrants: transparent black | opaque blue / half-transparent red | opaque green."""
    img = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    img.paste((0, 0, 255, 255), (16, 0, 32, 16))
    img.paste((255, 0, 0, 128), (0, 16, 16, 32))
    img.paste((0, 255, 0, 255), (16, 16, 32, 32))
    img.save(path)
    return path


def la_png(path):
    halves("LA", (16, 16), (0, 0), (100, 255)).save(path)
    return path


def gray16_png(path):
    """16-bit grayscale: 32768 on the left half, 65535 on the right."""
    arr = np.full((16, 16), 32768, dtype=np.uint16)
    arr[:, 8:] = 65535
    Image.fromarray(arr).save(path)
    return path


def cmyk_jpg(path):
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(path, quality=95)
    return path


def exif6_jpg(path):
    """Left half red, right half blue, stored with EXIF orientation 6 (display rotated 90 degrees)."""
    exif = Image.Exif()
    exif[0x0112] = 6
    halves("RGB", (16, 16), RED, BLUE).save(path, quality=95, exif=exif.tobytes())
    return path


def truncated_jpg(path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path, quality=95)
    data = path.read_bytes()
    path.write_bytes(data[:len(data) * 6 // 10])  # headers intact, scan data cut
    return path


def small_png(path):
    Image.new("RGB", (4, 4), GREEN).save(path)
    return path


def solid_png(path, size=12, colour=(10, 20, 30)):
    Image.new("RGB", (size, size), colour).save(path)
    return path


def bomb_png(path, side):
    Image.new("RGB", (side, side), RED).save(path)
    return path


def decode_one(tmp_path, name, writer, **kw):
    """load_images on a folder holding one file: its (C, S, S) image."""
    folder = tmp_path / Path(name).stem
    folder.mkdir()
    writer(folder / name)
    out = ddpm.load_images([folder], S, quiet=True, **kw)
    assert out.shape[0] == 1 and out.dtype == torch.uint8
    return out[0]


def px(img, row, col):
    return tuple(int(v) for v in img[:, row, col])


def near(a, b, tol):
    return all(abs(int(x) - int(y)) <= tol for x, y in zip(a, b))


def fit(img):
    return ImageOps.fit(img, (S, S), Image.BICUBIC)


# -- one image at a time ------------------------------------------------------------------------

def test_transparency_is_composited_onto_the_background(tmp_path):
    img = decode_one(tmp_path, "p.png", palette_png)
    assert img.shape == (3, S, S)
    assert px(img, 0, 0) == WHITE and px(img, 7, 0) == WHITE  # a fully transparent pixel becomes white
    assert px(img, 0, 7) == RED and px(img, 7, 7) == RED
    img = decode_one(tmp_path, "p-black.png", palette_png, background=BLACK)
    assert px(img, 0, 0) == BLACK and px(img, 0, 7) == RED

    img = decode_one(tmp_path, "rgba.png", rgba_png)
    assert px(img, 0, 0) == WHITE and px(img, 0, 7) == BLUE and px(img, 7, 7) == GREEN
    a = 128 / 255  # red at alpha 128 over white, then over black
    assert near(px(img, 7, 0), (255, 255 * (1 - a), 255 * (1 - a)), 2)
    img = decode_one(tmp_path, "rgba-black.png", rgba_png, background=BLACK)
    assert px(img, 0, 0) == BLACK and px(img, 0, 7) == BLUE and near(px(img, 7, 0), (255 * a, 0, 0), 2)

    img = decode_one(tmp_path, "la.png", la_png)
    assert px(img, 0, 0) == WHITE and px(img, 0, 7) == (100, 100, 100)
    img = decode_one(tmp_path, "la-gray.png", la_png, img_channels=1)
    assert img.shape == (1, S, S) and px(img, 0, 0) == (255,) and px(img, 0, 7) == (100,)

    job = ddpm.parse_command_line(["--train", "--demo", "--background", "black"])
    assert tuple(job.data.background) == BLACK
    assert tuple(ddpm.parse_command_line(["--train", "--demo"]).data.background) == WHITE


def test_16_bit_grayscale_is_scaled_not_clipped(tmp_path):
    path = gray16_png(tmp_path / "probe.png")
    with Image.open(path) as im:
        assert im.mode in ("I;16", "I")  # the file really is 16-bit
    img = decode_one(tmp_path, "g16.png", gray16_png)
    assert img.shape == (3, S, S)
    assert near(px(img, 0, 0), (128, 128, 128), 1)  # 32768 / 65535 * 255 = 127.5
    assert px(img, 0, 7) == WHITE
    img = decode_one(tmp_path, "g16-gray.png", gray16_png, img_channels=1)
    assert img.shape == (1, S, S) and near(px(img, 7, 0), (128,), 1) and px(img, 7, 7) == (255,)


def test_cmyk_jpeg_is_converted(tmp_path):
    path = cmyk_jpg(tmp_path / "probe.jpg")
    with Image.open(path) as im:
        assert im.mode == "CMYK"
        ref = np.asarray(fit(im.convert("RGB"))).transpose(2, 0, 1)
    img = decode_one(tmp_path, "cmyk.jpg", cmyk_jpg)
    assert img.shape == (3, S, S)
    assert near(px(img, 4, 4), RED, 30)
    assert np.abs(img.numpy().astype(int) - ref.astype(int)).max() <= 2


def test_exif_orientation_is_applied(tmp_path):
    path = exif6_jpg(tmp_path / "probe.jpg")
    with Image.open(path) as im:
        assert im.getexif().get(0x0112) == 6
        stored = np.asarray(fit(im.convert("RGB"))).transpose(2, 0, 1)
        ref = np.asarray(fit(ImageOps.exif_transpose(im).convert("RGB"))).transpose(2, 0, 1)
    # as stored: red left, blue right; as displayed (the reference): red on top, blue at the bottom
    assert near(tuple(stored[:, 0, 0]), RED, 40) and near(tuple(stored[:, 0, 7]), BLUE, 40)
    assert near(tuple(ref[:, 0, 7]), RED, 40) and near(tuple(ref[:, 7, 0]), BLUE, 40)
    img = decode_one(tmp_path, "exif.jpg", exif6_jpg)
    for r, c in ((0, 0), (0, 7), (7, 0), (7, 7)):
        assert near(px(img, r, c), tuple(int(v) for v in ref[:, r, c]), 2), (r, c)
    assert near(px(img, 0, 7), RED, 40) and near(px(img, 7, 0), BLUE, 40)


def test_grayscale_channels(tmp_path):
    ref = Image.new("RGB", (1, 1), RED).convert("L").getpixel((0, 0))
    img = decode_one(tmp_path, "red.png", lambda p: solid_png(p, 12, RED), img_channels=1)
    assert img.shape == (1, S, S) and set(img.flatten().tolist()) == {ref}


def test_small_image_is_upscaled_with_a_warning(tmp_path, capsys):
    folder = tmp_path / "small"
    folder.mkdir()
    small_png(folder / "s.png")
    out = ddpm.load_images([folder], S)
    assert out.shape == (1, 3, S, S) and (out[0] == torch.tensor(GREEN, dtype=torch.uint8).view(3, 1, 1)).all()
    assert "warning: 1 smaller than 8px were upscaled" in capsys.readouterr().out


# -- the messy folder ---------------------------------------------------------------------------

def make_messy(folder: Path) -> dict:
    """A folder of everything; returns the names expected to decode and the skip counts."""
    folder.mkdir(parents=True)
    (folder / "sub" / "deeper").mkdir(parents=True)
    good = [palette_png(folder / "a_palette.png"), rgba_png(folder / "b_rgba.png"), la_png(folder / "c_la.png"),
            gray16_png(folder / "d_gray16.png"), cmyk_jpg(folder / "e_cmyk.JPG"), exif6_jpg(folder / "f_exif6.jpeg"),
            small_png(folder / "j_small.png"), solid_png(folder / "sub" / "nested.png"),
            solid_png(folder / "sub" / "deeper" / "nested2.webp", 20, BLUE)]
    truncated_jpg(folder / "g_truncated.jpg")
    (folder / "h_empty.png").write_bytes(b"")
    (folder / "i_text.png").write_text("this is not a png\n")
    bomb_png(folder / "k_bomb.png", 100)       # 10000 pixels: over twice the limit (PIL raises)
    bomb_png(folder / "k_bomb_warn.png", 80)   # 6400 pixels: between 1x and 2x the limit (PIL warns)
    (folder / "notes.txt").write_text("hello")
    (folder / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1" + b"\x00" * 100)
    (folder / "sub" / "._nested.png").write_bytes(b"\x00\x05\x16\x07" + b"\x00" * 60)  # macOS AppleDouble
    return {"good": good, "skipped": {"not an image file": 3, "unreadable or not an image": 2,
                                      "truncated or corrupt": 1, "over the decompression-bomb limit": 2},
            "upscaled": 1}


def parse_summary(out: str):
    line = [ln for ln in out.splitlines() if ln.startswith("data: ")]
    assert len(line) == 1, out
    m = re.match(r"data: (\d+) images from .*; skipped (\d+) \(([^)]*)\)(?:; warning: (\d+) smaller than \d+px "
                 r"were upscaled)?$", line[0])
    assert m, line[0]
    reasons = {}
    for part in m.group(3).split(", "):
        n, why = part.split(" ", 1)
        reasons[why] = int(n)
    return int(m.group(1)), int(m.group(2)), reasons, int(m.group(4) or 0)


def test_messy_folder_is_decoded_and_counted(tmp_path, capsys, bomb_limit):
    spec = make_messy(tmp_path / "messy")
    filters = list(warnings.filters)
    out = ddpm.load_images([tmp_path / "messy"], S)
    assert warnings.filters == filters  # no warning filter left behind
    n, skipped, reasons, upscaled = parse_summary(capsys.readouterr().out)
    assert n == len(spec["good"]) == out.shape[0]
    assert out.shape == (len(spec["good"]), 3, S, S) and out.dtype == torch.uint8
    assert reasons == spec["skipped"] and skipped == sum(spec["skipped"].values())
    assert upscaled == spec["upscaled"]
    # each decodable file, read on its own, is the same image as in the batch, in sorted path order
    for i, path in enumerate(sorted(spec["good"])):
        one = path.parent / "alone"
        one.mkdir()
        path.rename(one / path.name)
        alone = ddpm.load_images([one], S, quiet=True)[0]
        assert torch.equal(out[i], alone), path.name
        (one / path.name).rename(path)
        one.rmdir()
    gray = ddpm.load_images([tmp_path / "messy"], S, img_channels=1, quiet=True)
    assert gray.shape == (len(spec["good"]), 1, S, S)


def test_bomb_limit_holds_under_threads(tmp_path, bomb_limit):
    """Many over-the-limit files decoded by 8 threads at once: every one is skipped."""
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(24):
        bomb_png(folder / f"w{i:02d}.png", 80)  # the warning range, where PIL does not raise by itself
        solid_png(folder / f"n{i:02d}.png", 16, (i, 0, 0))
    filters = list(warnings.filters)
    for _ in range(3):
        out = ddpm.load_images([folder], S, workers=8, quiet=True)
        assert out.shape[0] == 24
        assert sorted(out[:, 0, 0, 0].tolist()) == list(range(24))  # exactly the small ones
        assert warnings.filters == filters


def test_training_on_the_messy_folder(tmp_path, capsys, bomb_limit):
    make_messy(tmp_path / "messy")
    argv = ["--train", "--data-folders", str(tmp_path / "messy"), *MODEL, *RUN, "--max-steps", "2",
            "--no-run-pictures", "--sample-every", "0", "--ckpt-save-dir", str(tmp_path / "ck"),
            "--save-dir", str(tmp_path / "out")]
    assert ddpm.main(argv) == 0
    n, _, _, _ = parse_summary(capsys.readouterr().out)
    assert n == 9
    obj = ddpm.read_checkpoint(ddpm.newest_checkpoint(tmp_path / "ck"))
    assert obj["step"] == 2 and obj["train"]["data_folders"] == [str(tmp_path / "messy")]


# -- bad folders --------------------------------------------------------------------------------

def test_missing_empty_and_unreadable_folders_fail_before_the_model(tmp_path, capsys, monkeypatch):
    def no_model(*a, **k):
        raise AssertionError("a model was built")

    monkeypatch.setattr(ddpm, "build_diffusion", no_model)
    monkeypatch.setattr(ddpm.UNet, "__init__", no_model)
    (tmp_path / "empty").mkdir()
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "readme.txt").write_text("no images here")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "a.png").write_bytes(b"")
    (tmp_path / "broken" / "b.jpg").write_text("not a jpeg")
    for name in ("missing", "empty", "texts", "broken"):
        folder = tmp_path / name
        argv = ["--train", "--data-folders", str(folder), *MODEL, *RUN, "--ckpt-save-dir", str(tmp_path / "ck"),
                "--save-dir", str(tmp_path / "out")]
        assert ddpm.main(argv) == 2, name
        lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
        assert len(lines) == 1 and str(folder) in lines[0], (name, lines)
        assert not (tmp_path / "ck").exists() and not (tmp_path / "out").exists()
    # a second, good folder does not hide a missing one
    good = tmp_path / "good"
    good.mkdir()
    solid_png(good / "x.png")
    argv = ["--train", "--data-folders", str(good), str(tmp_path / "missing"), *MODEL, *RUN,
            "--ckpt-save-dir", str(tmp_path / "ck")]
    assert ddpm.main(argv) == 2
    assert str(tmp_path / "missing") in capsys.readouterr().err
    with pytest.raises(ddpm.DDPMError, match=re.escape(str(tmp_path / "empty"))):
        ddpm.load_images([tmp_path / "empty"], S)


# -- where files are written --------------------------------------------------------------------

def test_writes_only_under_the_two_folders(tmp_path, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    for i in range(8):
        solid_png(data / f"{i}.png", 12, (30 * i, 200 - 20 * i, 90))
    before = {p: p.read_bytes() for p in data.iterdir()}
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    ck, pics = tmp_path / "runs" / "ck", tmp_path / "runs" / "pics"
    # pictures on, a preview each step, a metrics row each step (so loss.png is drawn too)
    argv = ["--train", "--data-folders", str(data), *MODEL, *RUN, "--max-steps", "2", "--sample-every", "1",
            "--log-every", "1", "--num-samples", "4", "--ckpt-save-dir", str(ck), "--save-dir", str(pics)]
    assert ddpm.main(argv) == 0
    assert ddpm.main(["--loadckpt", str(ck), "--num-samples", "2", "--steps", "2", "--device", "cpu",
                      "--save-dir", str(pics / "samples"), "--seed", "0"]) == 0
    assert list(cwd.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cwd", "data", "runs"]
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["ck", "pics"]
    assert {p: p.read_bytes() for p in data.iterdir()} == before
    assert {"metrics.csv", "events.csv"} <= {p.name for p in ck.iterdir()} and list(ck.glob("ckpt-*.pth"))
    written = {p.relative_to(pics).as_posix() for p in pics.rglob("*") if p.is_file()}
    assert {"run-before.png", "run-after.png", "final-grid.png", "samples/ddpm-0.png",
            "samples/ddpm-all.png"} <= written
    assert any(w.startswith("preview/") for w in written)
