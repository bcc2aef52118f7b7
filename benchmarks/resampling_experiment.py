"""Session 16 experiment: what does resampling a crop (as the whole-head path does) cost, on fold 0?

Each held-out crop is moved (``linear``/``bspline``: turned up to 10 degrees about each axis and shifted up to
half a voxel; ``shift_*``: shifted only; ``fine_linear``: first to a 0.87 x 0.87 x 1 mm grid like the real heads)
and segmented. With BACK=1 the probabilities go back to the crop's own grid and are scored against its labels
(what a user's scan goes through); otherwise the labels are moved too (nearest neighbour).

    BACK=1 python benchmarks/resampling_experiment.py runs/s7 native,shift_linear,linear out.json
Results: docs/RESULTS.md, "Session 16".
"""
import os, sys, json
from pathlib import Path
import numpy as np
import SimpleITK as sitk
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.chdir(REPO)
from cdal_core.model_io import load_model
from cdal_core.inference import segment_image
from box_pitch_check import class_scores, probabilities_back  # noqa: E402
model = load_model(sys.argv[1])
modes = sys.argv[2].split(',')
cases = [l.strip() for l in open('configs/hippocampus_val.txt') if l.strip() and not l.startswith('#')]
rng = np.random.default_rng(0)
BACK = os.environ.get('BACK') == '1'
D = '../shared/data/Task04_Hippocampus'
INTERP = {'linear': sitk.sitkLinear, 'bspline': sitk.sitkBSpline, 'sinc': sitk.sitkLanczosWindowedSinc}
rows = []
for c in cases:
    img = sitk.ReadImage(f'{D}/imagesTr/{c}.nii.gz', sitk.sitkFloat32)
    lab = sitk.ReadImage(f'{D}/labelsTr/{c}.nii.gz')
    ang = np.deg2rad(rng.uniform(-10, 10, 3)); shift = rng.uniform(-0.5, 0.5, 3)
    t = sitk.Euler3DTransform(); t.SetCenter(img.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in img.GetSize()]))
    t.SetRotation(*ang); t.SetTranslation(shift.tolist())
    # a finer in-plane grid first, as the real heads (0.87 x 0.87 x 1 mm) would give
    fine = sitk.Image([int(round(s * sp / f)) for s, sp, f in zip(img.GetSize(), img.GetSpacing(), (0.87, 0.87, 1.0))], sitk.sitkFloat32)
    fine.SetSpacing((0.87, 0.87, 1.0)); fine.SetOrigin(img.GetOrigin()); fine.SetDirection(img.GetDirection())
    ref_lab = sitk.Resample(lab, img, t, sitk.sitkNearestNeighbor, 0)
    row = {'case': c}
    for m in modes:
        if m == 'native':
            x, y = img, lab
        elif m.startswith('fine_'):
            f = sitk.Resample(img, fine, sitk.Transform(), sitk.sitkBSpline, 0.0, sitk.sitkFloat32)
            x, y = sitk.Resample(f, img, t, INTERP[m[5:]], 0.0, sitk.sitkFloat32), ref_lab
        elif m.startswith('shift_'):
            ts = sitk.TranslationTransform(3, shift.tolist())
            x, y = sitk.Resample(img, img, ts, INTERP[m[6:]], 0.0, sitk.sitkFloat32), ref_lab
        else:
            x, y = sitk.Resample(img, img, t, INTERP[m], 0.0, sitk.sitkFloat32), ref_lab
        tt = sitk.TranslationTransform(3, shift.tolist()) if m.startswith('shift_') else t
        if m != 'native' and BACK:  # probabilities back onto the crop's own grid, its own labels
            back = probabilities_back(model, x, img, tt)
            p, r, valid = back.argmax(0), sitk.GetArrayFromImage(lab), back[0] >= 0
        else:
            p, r = sitk.GetArrayFromImage(segment_image(x, model, samples=5, seed=0, with_attention=False).labels), sitk.GetArrayFromImage(y)
            # the rotated field of view loses corners: score only where the rotated image has data
            ones = sitk.Image(img.GetSize(), sitk.sitkUInt8) + 1; ones.CopyInformation(img)
            valid = sitk.GetArrayFromImage(sitk.Resample(ones, img, t, sitk.sitkNearestNeighbor, 0)) > 0 if m != 'native' else np.ones_like(p, bool)
        scores = class_scores(p, r, valid)
        for k, name in ((1, 'ant'), (2, 'post')):
            row[f'{m}_{name}_dice'], row[f'{m}_{name}_ratio'] = scores[k]
    rows.append(row); print(json.dumps(row), flush=True)
json.dump(rows, open(sys.argv[3], 'w'), indent=0)
for m in modes:
    for name in ('ant', 'post'):
        d = np.array([r[f'{m}_{name}_dice'] for r in rows]) * 100; q = np.array([r[f'{m}_{name}_ratio'] for r in rows])
        b = np.array([r[f'{modes[0]}_{name}_dice'] for r in rows]) * 100
        print(f'{m:14s} {name:4s} dice {d.mean():.2f} ± {d.std(ddof=1)/np.sqrt(len(d)):.2f} paired vs {modes[0]} {np.mean(d-b):+.2f} ± {np.std(d-b, ddof=1)/np.sqrt(len(d)):.2f}  volume ratio {q.mean():.3f} ± {q.std(ddof=1)/np.sqrt(len(q)):.3f}')
