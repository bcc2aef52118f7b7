"""README figure for a shipped 2D model: image, reference and cDAL outlines, uncertainty, attention.

    python tools/example_figure_2d.py monuseg ../shared/data/MoNuSeg/train/images/X.png \
        ../shared/data/MoNuSeg/train/masks/X.png Resources/Models/monuseg/example.png [--crop 0,0,500,500]

Use a validation image (one the model did not train on); the title gives its Dice.
"""

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cdal_core.model_io import load_model  # noqa: E402
from cdal_core.predict2d import read_image_2d, read_mask_2d, segment_image_2d  # noqa: E402


def outline(mask: np.ndarray) -> np.ndarray:
    """Pixels of ``mask`` with a 4-neighbour outside it."""
    m = np.pad(mask, 1)
    inner = m[1:-1, 1:-1] & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]
    return mask & ~inner


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("image", type=Path)
    ap.add_argument("mask", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--crop", help="row0,col0,row1,col1 of the panel (default: whole image)")
    ap.add_argument("--note", default="validation image",
                    help="what the title says of the image and the model (default: validation image)")
    a = ap.parse_args()
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    model = load_model(a.model)
    array = read_image_2d(a.image, model.config.image_channels)
    result = segment_image_2d(array, model, seed=0)
    truth = read_mask_2d(a.mask, array.shape[-2:], model.config.num_classes) > 0
    pred = result.labels > 0
    dice = 200 * (pred & truth).sum() / max(pred.sum() + truth.sum(), 1)
    r0, c0, r1, c1 = [int(v) for v in a.crop.split(",")] if a.crop else (0, 0, *array.shape[-2:])
    view = np.moveaxis(array, 0, -1)[r0:r1, c0:c1]
    view = (view - view.min()) / max(float(np.ptp(view)), 1e-6)
    shown = np.repeat(view, 3, -1) if view.shape[-1] == 1 else view
    over = shown.copy()
    over[outline(truth[r0:r1, c0:c1])] = (0.0, 1.0, 0.0)
    over[outline(pred[r0:r1, c0:c1])] = (1.0, 0.9, 0.0)
    panels = [(shown, "image", None), (over, "reference (green), cDAL (yellow)", None),
              (result.uncertainty[r0:r1, c0:c1], "uncertainty (variance over 5 samples)", "magma")]
    if result.attention is not None:
        panels.append((result.attention[r0:r1, c0:c1], "discriminator attention", "viridis"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4.3))
    for ax, (img, title, cmap) in zip(axes, panels):
        ax.imshow(img, cmap=cmap)
        ax.set_title(title, fontsize=10)
        ax.axis("off")
    fig.suptitle(f"{model.card['name']}: {a.image.name} ({a.note}), Dice {dice:.1f}", fontsize=11)
    fig.tight_layout()
    a.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(a.out, dpi=80)
    print(f"{a.out}: Dice {dice:.2f}, {result.seconds:.1f} s")


if __name__ == "__main__":
    main()
