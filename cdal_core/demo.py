"""``cdal demo``: segment both hippocampi of a real whole-brain T1 MRI, offline, the way a user's scan is.

The MRI is the whole ICBM152 2009a template shipped inside the ``nilearn`` wheel, handed over uncropped: the
whole-brain path (``scan.segment_scan``) locates both hippocampi, segments each and puts the results back, so
every output lies in the template's own geometry. Writes what ``cdal predict`` writes (NIfTI outputs and the
per-side report), plus a PNG figure, and prints the volume table.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Dict, Tuple

import numpy as np
import SimpleITK as sitk

from .errors import CDALError
from .localise import hippocampus_regions

TEMPLATE = "datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
# Where the localisation looks in template (MNI, RAS mm) space; kept for the screenshot script's ROIs.
HIPPOCAMPUS_CENTRES = {r.side: r.centre_mni for r in hippocampus_regions()}
BOX_MM = tuple(int(v) for v in hippocampus_regions()[0].size_mm)


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


DEMO_OUTPUTS = ("icbm152_seg.nii.gz", "icbm152_uncertainty.nii.gz", "icbm152_attention.nii.gz",
                "icbm152_report.json", "icbm152_hippocampus.png")
#: what the fallback without a shipped model writes instead (it trains on generated data, then segments a case)
SYNTHETIC_DEMO_OUTPUTS = ("synthetic_data", "synthetic_run", "case_000_seg.nii.gz", "case_000_uncertainty.nii.gz",
                          "case_000_attention.nii.gz", "case_000_report.json")


def run_demo(out_dir: Path, device: str = "auto", overwrite: bool = False) -> int:
    from tqdm import tqdm
    from .cli import ensure_writable_folder, on_terminal, write_outputs_together
    from .inference import resolve_device
    from .model_io import json_bytes, list_models, load_model
    from .scan import format_report, segment_scan

    out_dir = Path(out_dir)
    shipped = "hippocampus" in list_models()
    existing = [name for name in (DEMO_OUTPUTS if shipped else SYNTHETIC_DEMO_OUTPUTS) if (out_dir / name).exists()]
    if existing and not overwrite:
        raise CDALError(f"{out_dir / existing[0]}: already exists (an earlier demo run): pass --overwrite to "
                        "replace it, or choose another --output")
    dev = str(resolve_device(device))  # an unusable --device is refused before the output folder appears
    ensure_writable_folder(out_dir, "--output")
    if not shipped:
        return _synthetic_demo(out_dir, device)
    start = time.perf_counter()
    image = sitk.ReadImage(str(template_path()))
    model = load_model("hippocampus", device=dev)
    with tqdm(total=100, desc="whole brain", unit="%", leave=False, disable=not on_terminal()) as bar:
        def progress(fraction, message):
            bar.n = int(100 * fraction)
            bar.set_postfix_str(message[:40], refresh=True)
        result = segment_scan(image, model, samples=5, seed=0, device=dev, progress=progress)
    images = [(output, out_dir / f"icbm152_{name}.nii.gz") for name, output in
              (("seg", result.labels), ("uncertainty", result.uncertainty), ("attention", result.attention))]
    report = {"input": str(template_path()), "model": str(model.path), **result.report}
    write_outputs_together(images, {out_dir / "icbm152_report.json": json_bytes(report, indent=1)})
    figure = out_dir / "icbm152_hippocampus.png"
    _figure(_side_crops(image, result), model.class_names, figure)
    total = time.perf_counter() - start
    print(f"ICBM152 2009a T1 template, whole brain ({template_path().name}), model 'hippocampus', "
          f"T={model.default_steps}, 5 samples, {dev}; hippocampi located automatically "
          f"(registration {result.report['localisation']['seconds']:.1f} s)")
    print(format_report(result.report))
    print(f"outputs in {out_dir}/: icbm152_seg.nii.gz (labels: {dict(enumerate(model.class_names))}), "
          f"icbm152_uncertainty.nii.gz, icbm152_attention.nii.gz, icbm152_report.json, {figure.name}; "
          f"total {total:.1f} s")
    return 0


def _side_crops(image: sitk.Image, result) -> Dict[str, Tuple[np.ndarray, ...]]:
    """Per side, RAS-ordered arrays (image, labels, uncertainty, attention) of the box around its labels."""
    arrays = [sitk.GetArrayFromImage(sitk.DICOMOrient(x, "RAS")) for x in
              (image, result.labels, result.uncertainty, result.attention, result.sides)]
    crops = {}
    for side, code in (("left", 1), ("right", 2)):
        where = np.argwhere(arrays[4] == code)
        if not len(where):
            continue
        lo = np.maximum(where.min(axis=0) - 6, 0)
        hi = where.max(axis=0) + 7
        box = tuple(slice(a, b) for a, b in zip(lo, hi))
        crops[side] = tuple(a[box] for a in arrays[:4])
    return crops


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
