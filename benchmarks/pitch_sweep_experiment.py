"""Session 16 experiment: fold-0 Dice when each held-out crop is turned by d degrees about its left-right axis
(negative: the hippocampus dips more), segmented, and its probabilities mapped back to its own grid.

    python benchmarks/pitch_sweep_experiment.py runs/s7 0,-14,-7,7,14 out.json
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
from box_pitch_check import class_scores, probabilities_back, turned  # noqa: E402
model = load_model(sys.argv[1]); pitches = [float(v) for v in sys.argv[2].split(',')]
cases = [l.strip() for l in open('configs/hippocampus_val.txt') if l.strip() and not l.startswith('#')]
D = '../shared/data/Task04_Hippocampus'
rows = []
for c in cases:
    img = sitk.ReadImage(f'{D}/imagesTr/{c}.nii.gz', sitk.sitkFloat32)
    r = sitk.GetArrayFromImage(sitk.ReadImage(f'{D}/labelsTr/{c}.nii.gz'))
    row = {'case': c}
    for d in pitches:
        t = turned(img, d)
        x = sitk.Resample(img, img, t, sitk.sitkLinear, 0.0, sitk.sitkFloat32) if d else img
        back = probabilities_back(model, x, img, t if d else None)
        scores = class_scores(back.argmax(0), r, back[0] >= 0)
        for k, name in ((1, 'ant'), (2, 'post')):
            row[f'{d:g}_{name}_dice'], row[f'{d:g}_{name}_ratio'] = scores[k]
    rows.append(row); print(json.dumps(row), flush=True)
json.dump(rows, open(sys.argv[3], 'w'), indent=0)
for d in pitches:
    for name in ('ant', 'post'):
        v = np.array([r[f'{d:g}_{name}_dice'] for r in rows]) * 100; b = np.array([r[f'0_{name}_dice'] for r in rows]) * 100
        q = np.array([r[f'{d:g}_{name}_ratio'] for r in rows])
        print(f'pitch {d:+5g} {name:4s} dice {v.mean():.2f} ± {v.std(ddof=1)/np.sqrt(len(v)):.2f}  paired vs 0: {np.mean(v-b):+.2f} ± {np.std(v-b, ddof=1)/np.sqrt(len(v)):.2f}  volume ratio {q.mean():.3f}')
