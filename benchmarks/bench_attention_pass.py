"""The discriminator's attention pass, before and after session 20, side by side in one process.

Before: the whole discriminator (all blocks and the head) in the contiguous layout. After (the code as it is):
only the blocks up to the attention block, channels-last like the generators. Rounds alternate between the two;
each reports the CPU seconds per volume of ``segment_image`` (T = 2 x 5 samples, with the attention map, as
``cdal predict`` runs it) on one thread, and the largest attention difference. The CPU is named in the JSON.

Usage: python benchmarks/bench_attention_pass.py [--volumes 8] [--rounds 3] [--precision fp32] [--json out.json]
"""
import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_cpu_inference import cpu_info, load_average  # noqa: E402
from cdal_core import inference, networks  # noqa: E402
from cdal_core.model_io import load_model  # noqa: E402

CURRENT_FEATURES = networks.Discriminator.features


def _whole_discriminator(self, *args, up_to=None, **kwargs):
    return CURRENT_FEATURES(self, *args, up_to=None, **kwargs)


def run(model, images, before: bool, precision: str):
    """(CPU seconds per volume, attention arrays) with the old or the current attention pass."""
    networks.Discriminator.features = _whole_discriminator if before else CURRENT_FEATURES
    model.discriminator.to(memory_format=torch.contiguous_format if before else torch.channels_last)
    try:
        start = time.thread_time()
        results = [inference.segment_image(image, model, precision=precision, seed=0) for image in images]
        seconds = (time.thread_time() - start) / len(images)
    finally:
        networks.Discriminator.features = CURRENT_FEATURES
        model.discriminator.to(memory_format=torch.channels_last)
    return seconds, [sitk.GetArrayFromImage(r.attention) for r in results]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "Task04_Hippocampus" / "imagesTr"))
    parser.add_argument("--volumes", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    files = sorted(Path(args.data).glob("hippocampus_*.nii.gz"))[20:20 + args.volumes]
    if not files:
        print(f"no MSD hippocampus volumes in {args.data}", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    inference.ADAPT_THREADS = False  # one thread, whatever else runs: CPU seconds are the measure
    model = load_model("hippocampus")
    images = [sitk.ReadImage(str(f)) for f in files]
    run(model, images[:1], before=False, precision=args.precision)  # warm-up
    rounds, largest = [], 0.0
    for i in range(args.rounds):
        old, old_attention = run(model, images, True, args.precision)
        new, new_attention = run(model, images, False, args.precision)
        largest = max([largest] + [float(np.abs(a - b).max()) for a, b in zip(old_attention, new_attention)])
        rounds.append({"before": round(old, 3), "after": round(new, 3)})
        print(f"round {i + 1}: before {old:.3f}  after {new:.3f} CPU-s per volume", flush=True)
    before, after = (float(np.median([r[k] for r in rounds])) for k in ("before", "after"))
    report = {"cpu": cpu_info(), "load_average": load_average(), "torch": torch.__version__,
              "precision": args.precision, "threads": 1, "volumes": [f.name for f in files], "rounds": rounds,
              "median_before": before, "median_after": after, "ratio_after_before": round(after / before, 3),
              "largest_attention_difference": largest}
    print(f"median: before {before:.3f}, after {after:.3f} CPU-s per volume ({after / before:.2f}x); "
          f"attention within {largest:.1e}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
