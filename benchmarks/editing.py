"""The README's editing figures and pictures, from the demo checkpoint, with the commands the README shows.

    python ddpm.py --train --demo          # first: the demo model in ckpt/
    python benchmarks/editing.py           # then: the inversion PSNR at 25 and 100 steps, and
                                           # docs/edit-inpaint.png, edit-img2img.png, edit-interpolate.png

Inputs (written to data/edit/): demo faces the model never saw (seed 1; the demo trains on seed 0),
a mask over the lower half of the face, and a rough sketch drawn from a few flat shapes.
"""
import shlex
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import ddpm  # noqa: E402

DATA, OUT, DOCS = Path("data/edit"), Path("output/edit"), ROOT / "docs"


def sketch(size: int = 32) -> torch.Tensor:
    """A child's drawing of a face: hair, skin, two eyes, a mouth; flat colours, no shading."""
    from PIL import Image, ImageDraw

    s = 4 * size
    img = Image.new("RGB", (s, s), (255, 255, 255))
    d = ImageDraw.Draw(img)
    d.ellipse([s * 0.12, s * 0.05, s * 0.88, s * 0.75], fill=(120, 60, 160))     # hair
    d.ellipse([s * 0.22, s * 0.25, s * 0.78, s * 0.92], fill=(250, 220, 200))    # face
    d.rectangle([s * 0.2, s * 0.1, s * 0.8, s * 0.35], fill=(120, 60, 160))      # fringe
    for x in (0.3, 0.56):                                                      # eyes
        d.ellipse([s * x, s * 0.45, s * (x + 0.14), s * 0.62], fill=(40, 110, 200))
    d.line([s * 0.44, s * 0.78, s * 0.56, s * 0.78], fill=(200, 60, 60), width=3)  # mouth
    img = img.resize((size, size), Image.LANCZOS)
    return torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(size, size, 3).permute(2, 0, 1)


def read_png(path: Path) -> torch.Tensor:
    from PIL import Image

    with Image.open(path) as img:
        img = img.convert("RGB")
        w, h = img.size
        return torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(h, w, 3).permute(2, 0, 1)


def run(command: str) -> None:
    print("$", command, flush=True)
    argv = shlex.split(command)[2:]  # drop "python ddpm.py"
    if ddpm.main(argv) != 0:
        sys.exit(f"failed: {command}")


def main() -> None:
    size = ddpm.load_model(Path("ckpt")).config.img_size
    for i, face in enumerate(ddpm.demo_faces(4, size, seed=1)):
        ddpm.save_png(face, DATA / f"face{i}.png")
    mask = torch.zeros(1, size, size, dtype=torch.uint8)
    mask[:, size // 2:, :] = 255  # white: redraw the lower half (mouth and chin)
    ddpm.save_png(mask, DATA / "mask.png")
    ddpm.save_png(sketch(size), DATA / "sketch.png")

    for steps in (25, 100):  # the reconstruction PSNR of each face is printed
        faces = " ".join(f"{DATA}/face{i}.png" for i in range(4))
        run(f"python ddpm.py --loadckpt ckpt --invert {faces} --steps {steps} --save-dir {OUT}/invert-{steps}")

    run(f"python ddpm.py --loadckpt ckpt --init-images {DATA}/face0.png --mask {DATA}/mask.png "
        f"--num-samples 3 --sampler ddpm --steps 100 --resample-jumps 4 --seed 0 --save-dir {OUT}/inpaint")
    (DOCS / "edit-inpaint.png").write_bytes((OUT / "inpaint" / "edit-grid.png").read_bytes())

    columns = [read_png(DATA / "sketch.png").expand(3, -1, -1, -1)]  # the input, then 3 variations per strength
    for s in (0.3, 0.5, 0.7):
        run(f"python ddpm.py --loadckpt ckpt --init-images {DATA}/sketch.png --strength {s} --num-samples 3 "
            f"--seed 0 --save-dir {OUT}/img2img-{s}")
        columns.append(torch.stack([read_png(OUT / f"img2img-{s}" / f"edit-0-{v}.png") for v in range(3)]))
    rows = torch.stack(columns, 1).flatten(0, 1)  # row v: the input, then variation v at 0.3, 0.5, 0.7
    ddpm.save_png(ddpm.upscale(ddpm.image_grid(rows, nrow=4), 2), DOCS / "edit-img2img.png")

    run(f"python ddpm.py --loadckpt ckpt --interpolate {DATA}/face2.png {DATA}/face3.png --num-samples 1 "
        f"--seed 0 --save-dir {OUT}/interpolate")
    ends = ddpm.load_image_files([DATA / "face2.png", DATA / "face3.png"], size, 3, (255, 255, 255), "face")
    path = read_png(OUT / "interpolate" / "interpolate.png")  # one row of 8 images, no padding
    frames = [path[:, :, j * size:(j + 1) * size] for j in range(path.shape[2] // size)]
    row = torch.stack([ends[0]] + frames + [ends[1]])  # the real faces at both ends, the path between
    ddpm.save_png(ddpm.upscale(ddpm.image_grid(row, nrow=len(row)), 2), DOCS / "edit-interpolate.png")

if __name__ == "__main__":
    main()
