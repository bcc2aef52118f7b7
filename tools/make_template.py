"""Make ``Resources/Templates/icbm152_brain_3mm.nii.gz``: the localisation template (cdal_core/localise.py).

The ICBM152 2009a symmetric T1 template (inside the ``nilearn`` wheel), skull removed with its own grey + white
matter maps (> 0.3, dilated by 3 mm), averaged down to 3 mm and scaled to [0, 1]. Registration runs at this
resolution, so shipping it saves loading three 1 mm maps (and nilearn) on every run. Licence: see NOTICE there.

    python tools/make_template.py
"""
import os
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

OUT = Path(__file__).resolve().parent.parent / "Resources" / "Templates" / "icbm152_brain_3mm.nii.gz"


def main() -> int:
    import nilearn
    data = Path(nilearn.__file__).parent / "datasets" / "data"
    read = lambda name: sitk.ReadImage(str(data / f"mni_icbm152_{name}_tal_nlin_sym_09a_converted.nii.gz"),
                                       sitk.sitkFloat32)
    t1, gm, wm = read("t1"), read("gm"), read("wm")
    brain = sitk.BinaryDilate(sitk.Cast((gm + wm) > 0.3, sitk.sitkUInt8), [3, 3, 3])
    small = sitk.BinShrink(sitk.Mask(t1, brain), [3, 3, 3])
    array = sitk.GetArrayFromImage(small)
    top = float(np.percentile(array[array > 0], 99.5))
    out = sitk.GetImageFromArray(np.clip(array / top, 0, 1).astype(np.float32))
    out.CopyInformation(small)
    sitk.WriteImage(out, str(OUT), True)
    print(f"{OUT}: {out.GetSize()} at {out.GetSpacing()} mm, {os.path.getsize(OUT) / 1e3:.0f} kB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
