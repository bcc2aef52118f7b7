"""Do small rotations and zooms at test time help a 2D model whose images have an orientation? (issue 16)

MoNuSeg spreads its 5 samples over flips and transposes of the tile (+1.35 Dice). A chest X-ray has a left and a
right (the mirror costs 3 points, session 13), but a model trained with small rotations and zooms can be shown
its image slightly rotated or zoomed and the maps warped back. This script spreads the 5 samples over 5 views
fixed before any result was seen: identity, rotations of -5 and +5 degrees, zooms of 0.95 and 1.05 (inside the
training augmentation's 10 degrees and 0.1) and scores the 26 validation images against the plain run (same
seeds as ``cdal evaluate``: seed + index), paired, with the standard error over images.

It reuses ``predict2d``'s symmetry machinery with these views in place of the dihedral ones (patched here only):
the same cost as 5 samples, and the variance then includes the disagreement between views::

    python benchmarks/affine_tta_2d.py --model cxr --data ../shared/data/CXR --val-cases configs/cxr_val.txt \
        --out docs/results/session26_cxr_affine_tta.json

Rule (written before the run): a lead worth building into ``predict2d`` if Dice gains >= +0.20 and more than 2
paired standard errors; otherwise reported only.
"""

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import cdal_core.predict2d as p2d  # noqa: E402
from cdal_core.augment import affine_theta  # noqa: E402
from cdal_core.model_io import load_model  # noqa: E402
from threshold_experiment_2d import dice, train_and_val  # noqa: E402

VIEWS = [(0.0, 1.0), (-5.0, 1.0), (5.0, 1.0), (0.0, 0.95), (0.0, 1.05)]   # (degrees, zoom)
ORIGINAL = (p2d.DIHEDRAL, p2d._to_view, p2d._from_view)                   # restored after each patched run


def warp(maps: torch.Tensor, degrees: float, zoom: float) -> torch.Tensor:
    """(N, C, h, w) -> the same seen rotated by ``degrees`` and zoomed by ``zoom`` about the centre (border
    padding, bilinear); ``warp(warp(x, a, z), -a, 1 / z)`` is ``x`` up to interpolation."""
    n, _, h, w = maps.shape
    angle = torch.full((n,), math.radians(degrees))
    theta = affine_theta(angle, torch.full((n, 2), float(zoom)), torch.zeros(n, 2), h, w)
    grid = F.affine_grid(theta.to(maps.dtype), list(maps.shape), align_corners=False)
    return F.grid_sample(maps, grid, mode="bilinear", padding_mode="border", align_corners=False)


def to_view(image: torch.Tensor, view) -> torch.Tensor:
    degrees, zoom = view
    return image if view == VIEWS[0] else warp(image.float(), degrees, zoom).to(image.dtype)


def from_view(maps, view):
    if maps is None or view == VIEWS[0]:
        return maps
    degrees, zoom = view
    t = torch.from_numpy(np.ascontiguousarray(maps, np.float32))
    flat = t.reshape(1, -1, *t.shape[-2:])
    return warp(flat, -degrees, 1.0 / zoom).reshape(t.shape).numpy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="cxr")
    ap.add_argument("--data", required=True)
    ap.add_argument("--val-cases", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    model = load_model(args.model)
    _, val = train_and_val(args.data, args.val_cases, model.card)
    rows = []
    for i, case in enumerate(val):
        array = p2d.read_image_2d(case.image, model.config.image_channels)
        truth = p2d.read_mask_2d(case.label, array.shape[-2:], 2) > 0
        plain = p2d.segment_image_2d(array, model, seed=args.seed + i, with_attention=False, symmetries=False)
        p2d.DIHEDRAL, p2d._to_view, p2d._from_view = VIEWS, to_view, from_view
        try:
            views = p2d.segment_image_2d(array, model, seed=args.seed + i, with_attention=False, symmetries=True)
        finally:
            p2d.DIHEDRAL, p2d._to_view, p2d._from_view = ORIGINAL
        rows.append({"case": case.name, "plain": 100 * dice(plain.labels > 0, truth),
                     "views": 100 * dice(views.labels > 0, truth)})
        print(f"{case.name}: plain {rows[-1]['plain']:.2f}  views {rows[-1]['views']:.2f}", flush=True)
    diff = np.array([r["views"] - r["plain"] for r in rows])
    summary = {"views": VIEWS, "cases": len(rows), "plain_dice": float(np.mean([r["plain"] for r in rows])),
               "views_dice": float(np.mean([r["views"] for r in rows])), "paired_mean": float(diff.mean()),
               "paired_se": float(diff.std(ddof=1) / math.sqrt(len(diff))),
               "improved": int((diff > 0).sum()), "per_case": rows}
    print(f"plain {summary['plain_dice']:.2f}  views {summary['views_dice']:.2f}  paired "
          f"{summary['paired_mean']:+.2f} ± {summary['paired_se']:.2f}  ({summary['improved']} of {len(rows)} up)")
    Path(args.out).write_text(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    main()
