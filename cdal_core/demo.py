"""``cdal demo``: segment both hippocampi of a real whole-brain T1 MRI, offline.

The MRI is the ICBM152 2009a template shipped inside the ``nilearn`` wheel. A box around each hippocampus
(MNI coordinates) is cropped, segmented with the shipped ``hippocampus`` model, and pasted back so that every
output lies in the template's own geometry. Writes NIfTI outputs, a PNG figure and prints a summary.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Dict, Tuple

import numpy as np
import SimpleITK as sitk

from .errors import CDALError

TEMPLATE = "datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
# Box centres (MNI / RAS mm) and size (mm, x y z) like the MSD Task04 crops around one hippocampus.
HIPPOCAMPUS_CENTRES = {"left": (-26.0, -23.0, -13.0), "right": (26.0, -23.0, -13.0)}
BOX_MM = (36, 52, 36)


def template_path() -> Path:
    try:
        import nilearn
    except ImportError:
        raise CDALError("the demo MRI comes with the 'nilearn' package, which is not installed: "
                        "pip install nilearn (or pip install -e '.[demo]')")
    path = Path(nilearn.__file__).parent / TEMPLATE
    if not path.exists():
        raise CDALError(f"{path}: the ICBM152 template is missing from this nilearn install: reinstall nilearn")
    return path


def crop_box(image: sitk.Image, centre_ras, size_mm) -> Tuple[sitk.Image, Tuple[int, int, int]]:
    """Axis-aligned crop of ``size_mm`` around an RAS point; returns the crop and its start index."""
    centre_lps = (-centre_ras[0], -centre_ras[1], centre_ras[2])
    centre = np.asarray(image.TransformPhysicalPointToIndex(centre_lps))
    size = np.round(np.asarray(size_mm) / np.asarray(image.GetSpacing())).astype(int)
    start = np.clip(centre - size // 2, 0, np.asarray(image.GetSize()) - size)
    return sitk.RegionOfInterest(image, size.tolist(), start.tolist()), tuple(int(s) for s in start)


def run_demo(out_dir: Path, device: str = "auto") -> int:
    from .inference import resolve_device, segment_image
    from .model_io import list_models, load_model

    out_dir = Path(out_dir)
    if "hippocampus" not in list_models():
        return _synthetic_demo(out_dir, device)
    start = time.perf_counter()
    dev = str(resolve_device(device))
    image = sitk.ReadImage(str(template_path()))
    model = load_model("hippocampus", device=dev)
    full = sitk.GetArrayFromImage(image)
    labels, unc, att = (np.zeros(full.shape, np.uint8), np.zeros(full.shape, np.float32),
                        np.zeros(full.shape, np.float32))
    names = model.class_names
    summary: Dict[str, Dict] = {}
    crops = {}
    from tqdm import tqdm
    for side, centre in tqdm(HIPPOCAMPUS_CENTRES.items(), desc="segmenting", unit="side", leave=False):
        crop, (i0, j0, k0) = crop_box(image, centre, BOX_MM)
        res = segment_image(crop, model, samples=5, seed=0, device=dev)
        lab, u, a = (sitk.GetArrayFromImage(x) for x in (res.labels, res.uncertainty, res.attention))
        region = (slice(k0, k0 + lab.shape[0]), slice(j0, j0 + lab.shape[1]), slice(i0, i0 + lab.shape[2]))
        side_labels = np.where(lab > 0, lab + (len(names) - 1 if side == "right" else 0), 0)
        labels[region] = np.where(side_labels > 0, side_labels, labels[region])
        unc[region], att[region] = np.maximum(unc[region], u), np.maximum(att[region], a)
        voxel_mm3 = float(np.prod(image.GetSpacing()))
        summary[side] = {names[c]: round(float((lab == c).sum()) * voxel_mm3, 1) for c in range(1, len(names))}
        inside = lab > 0
        summary[side]["mean_uncertainty_in_mask"] = round(float(u[inside].mean()), 5) if inside.any() else None
        summary[side]["seconds"] = round(res.seconds, 2)
        crops[side] = (sitk.GetArrayFromImage(crop), lab, u, a)
    out_dir.mkdir(parents=True, exist_ok=True)
    from .cli import write_image_atomic
    for name, array in (("seg", labels), ("uncertainty", unc), ("attention", att)):
        img = sitk.GetImageFromArray(array)
        img.CopyInformation(image)
        write_image_atomic(img, out_dir / f"icbm152_{name}.nii.gz")
    label_names = {0: "background"}
    for s, side in enumerate(("left", "right")):
        for c in range(1, len(names)):
            label_names[c + s * (len(names) - 1)] = f"{names[c]} ({side})"
    (out_dir / "icbm152_seg_labels.json").write_text(json.dumps(label_names, indent=1))
    figure = out_dir / "icbm152_hippocampus.png"
    _figure(crops, names, figure)
    total = time.perf_counter() - start
    print(f"ICBM152 2009a T1 template ({template_path().name}), model 'hippocampus', T={model.default_steps}, "
          f"5 samples, {dev}")
    for side, row in summary.items():
        vols = ", ".join(f"{k} {v:.0f} mm³" for k, v in row.items() if k in names)
        print(f"  {side:5s} hippocampus: {vols}; mean uncertainty inside the mask "
              f"{row['mean_uncertainty_in_mask']}; {row['seconds']:.2f} s")
    print(f"outputs in {out_dir}/: icbm152_seg.nii.gz (labels: {label_names}), icbm152_uncertainty.nii.gz, "
          f"icbm152_attention.nii.gz, {figure.name}; total {total:.1f} s")
    (out_dir / "summary.json").write_text(json.dumps({"volumes_mm3": summary, "seconds": round(total, 2)}, indent=1))
    return 0


def _figure(crops, names, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(crops) * 2, 3, figsize=(9, 6.2 * len(crops)), dpi=110)
    colours = ["none", "#f1d691", "#6fb8d2", "#d8654f"]
    for r, (side, (img, lab, u, a)) in enumerate(crops.items()):
        fg = np.argwhere(lab > 0)
        centre = fg.mean(axis=0).round().astype(int) if len(fg) else np.array(lab.shape) // 2
        views = [("axial", lambda x: x[centre[0]]), ("coronal", lambda x: x[:, centre[1]][::-1]),
                 ("sagittal", lambda x: x[:, :, centre[2]][::-1])]
        for c, (view, cut) in enumerate(views):
            ax = axes[2 * r, c]
            ax.imshow(cut(img), cmap="gray")
            for k in range(1, len(names)):
                m = cut(lab) == k
                if m.any():
                    ax.contour(m, levels=[0.5], colors=[colours[k % len(colours)]], linewidths=1.2)
            ax.set_title(f"{side} {view}: segmentation", fontsize=8)
            ax.axis("off")
            ax = axes[2 * r + 1, c]
            ax.imshow(cut(img), cmap="gray")
            ax.imshow(np.ma.masked_less(cut(u), 1e-3), cmap="inferno", alpha=0.8, vmin=0,
                      vmax=max(float(u.max()), 1e-3))
            ax.contour(cut(a), levels=[0.5], colors=["cyan"], linewidths=0.8)
            ax.set_title(f"{side} {view}: uncertainty (inferno), attention>0.5 (cyan)", fontsize=7)
            ax.axis("off")
    handles = [plt.Line2D([], [], color=colours[k % len(colours)], label=names[k]) for k in range(1, len(names))]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles))
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    tmp = path.with_name("." + path.name + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)


def _synthetic_demo(out_dir: Path, device: str) -> int:
    """Fallback while no hippocampus model is installed: train briefly on generated data and segment it."""
    from .cli import main as cli_main
    from .synthetic import make_msd_dataset
    print("No shipped 'hippocampus' model found: training a small model on generated data for ~1 minute instead.")
    data = make_msd_dataset(out_dir / "synthetic_data", num_volumes=12, seed=0)
    config = Path(__file__).resolve().parent.parent / "configs" / "synthetic.json"
    args = ["train", "--data", str(data), "--out", str(out_dir / "synthetic_run"), "--max-minutes", "1",
            "--max-steps", "150", "--device", device] + (["--config", str(config)] if config.exists() else [])
    cli_main(args)
    return cli_main(["predict", "--model", str(out_dir / "synthetic_run" / "model"), "--input",
                     str(data / "imagesTr" / "case_000.nii.gz"), "--output", str(out_dir), "--overwrite",
                     "--device", device])
