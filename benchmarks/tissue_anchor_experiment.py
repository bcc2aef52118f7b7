"""Session 16 experiment (not adopted): does matching tissue classes, not only percentiles, change real-head volumes?

Runs the ``cdal`` CLI with the hippocampus normalisation patched. After the usual percentile scaling and
histogram standardisation, a 3-class Gaussian mixture (CSF-like, grey, white) is fitted to each crop and mapped
onto the classes' mean positions in the model's training crops:
  NORM_MODE=peaks3  piecewise-linear through (0, CSF, GM, WM, 1);  peaks2  linear through GM and WM;
  nyul              unchanged.  ANCHOR_SET=cv0 takes the class means from the 146 non-fold-0 volumes.

    NORM_MODE=peaks3 ANCHOR_SET=cv0 python benchmarks/tissue_anchor_experiment.py evaluate --model runs/s7 \
        --data ../shared/data/Task04_Hippocampus --cases configs/hippocampus_val.txt --json out.json
(``benchmarks/wholebrain_check.py`` with its ``-m cdal_core.cli`` replaced by this file gives the real heads.)
Results: docs/RESULTS.md, "Session 16".
"""
import os, sys, json, glob, tempfile
from pathlib import Path
import numpy as np
import SimpleITK as sitk
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.chdir(REPO)
from cdal_core import data as D  # noqa: E402
MODE = os.environ.get('NORM_MODE', 'nyul')

def em(x, mu=(0.2, 0.5, 0.8), it=50):
    x = x[:: max(1, x.size // 40000)]
    mu = np.array(mu, float); sd = np.full(3, 0.1); w = np.full(3, 1 / 3)
    for _ in range(it):
        p = w * np.exp(-0.5 * ((x[:, None] - mu) / sd) ** 2) / sd
        r = p / np.maximum(p.sum(1, keepdims=True), 1e-300)
        n = r.sum(0) + 1e-9; w = n / n.sum(); mu = (r * x[:, None]).sum(0) / n
        sd = np.sqrt((r * (x[:, None] - mu) ** 2).sum(0) / n) + 1e-3
    return mu

def tissue_means(norm, array):
    params = orig_fit(norm, array)
    s = orig_apply(norm, np.asarray(array, np.float32), params)
    return params, em(s[(s > 0.02) & (s < 0.98)].ravel())

orig_fit, orig_apply = D.Normalisation.fit, D.Normalisation.apply

def anchors_for(norm, cases):
    key = json.dumps(norm.landmarks)[:60] + str(len(cases))
    cache = os.path.join(tempfile.gettempdir(), 'cdal_tissue_anchors.json')
    c = json.load(open(cache)) if os.path.exists(cache) else {}
    if key not in c:
        ms = [tissue_means(norm, sitk.GetArrayFromImage(sitk.ReadImage(f'../shared/data/Task04_Hippocampus/imagesTr/{n}.nii.gz', sitk.sitkFloat32)))[1] for n in cases]
        c[key] = np.mean(ms, 0).tolist(); json.dump(c, open(cache, 'w'))
    return np.array(c[key])

def new_fit(self, array):
    params = orig_fit(self, array)
    if MODE != 'nyul':
        s = orig_apply(self, np.asarray(array, np.float32), params)
        params.tissue = em(s[(s > 0.02) & (s < 0.98)].ravel())
    return params

def new_apply(self, array, params):
    s = orig_apply(self, array, params)
    if MODE == 'nyul':
        return s
    a, t = ANCHORS, params.tissue
    if MODE == 'peaks2':  # linear through GM and WM
        slope = (a[2] - a[1]) / max(t[2] - t[1], 1e-3)
        return np.clip(a[1] + (s - t[1]) * slope, 0, 1).astype(np.float32)
    src = np.maximum.accumulate(np.r_[0.0, t, 1.0]) + np.arange(5) * 1e-6
    return np.interp(s, src, np.r_[0.0, a, 1.0]).astype(np.float32)

all_cases = [os.path.basename(p)[:-7] for p in sorted(glob.glob('../shared/data/Task04_Hippocampus/imagesTr/*.nii.gz'))]
fold0 = set(json.load(open('configs/hippocampus_folds.json'))['folds'][0])
TRAIN = [c for c in all_cases if c not in fold0] if os.environ.get('ANCHOR_SET') == 'cv0' else all_cases
ANCHORS = None
D.Normalisation.fit = new_fit
D.Normalisation.apply = new_apply
orig_from = D.Normalisation.from_dict.__func__
def from_dict(cls, d):
    global ANCHORS
    n = orig_from(cls, d)
    if MODE != 'nyul' and n.landmarks is not None:
        ANCHORS = anchors_for(n, TRAIN)
        print('anchors', ANCHORS, file=sys.stderr)
    return n
D.Normalisation.from_dict = classmethod(from_dict)
from cdal_core.cli import main
sys.exit(main(sys.argv[1:]))
