"""The image encoder's and output layer's group norms, torch's kernel against ``FastGroupNorm``, side by side.

Before (session 20): ``nn.GroupNorm`` in the image encoder and before the output layer. On CPU channels-last maps
torch's kernel is slow for float32 maps and for bf16 maps under 1,024 pixels (the encoder's 28x20 level and below),
which the decoder's AdaGN already avoids. After (the code as it is): ``networks.FastGroupNorm`` takes the same
fused path there. Rounds alternate between the two, per precision; each reports the CPU seconds per volume of
``segment_image`` (T = 2 x 5 samples, with the attention map, as ``cdal predict`` runs it) on one thread, whether
the labels are identical, and the largest probability and uncertainty differences. Whole volumes drift with the
machine, so the encoder alone (one generator, 35 slices of 56x40, 20 passes per round) is also timed, interleaved.
The CPU is named in the JSON.

Usage: python benchmarks/bench_encoder_norm.py [--volumes 8] [--rounds 3] [--precisions fp32,bf16] [--json out.json]
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

FAST_FORWARD = networks.FastGroupNorm.forward


def run(model, images, before: bool, precision: str):
    """(CPU seconds per volume, [(labels, probabilities, uncertainty)]) with torch's or the fused group norm."""
    networks.FastGroupNorm.forward = torch.nn.GroupNorm.forward if before else FAST_FORWARD
    try:
        start = time.thread_time()
        results = [inference.segment_image(image, model, precision=precision, seed=0) for image in images]
        seconds = (time.thread_time() - start) / len(images)
    finally:
        networks.FastGroupNorm.forward = FAST_FORWARD
    return seconds, [(sitk.GetArrayFromImage(r.labels), r.probabilities, sitk.GetArrayFromImage(r.uncertainty))
                     for r in results]


def encoder_rounds(model, precision: str, rounds: int = 5, passes: int = 20):
    """Milliseconds per ``encode`` of 35 slices, torch's norm then the fused one, ``rounds`` times."""
    generator = model.generators[0]
    x = torch.randn(35, generator.cfg.in_channels, 56, 40).contiguous(memory_format=torch.channels_last)
    times = {"before": [], "after": []}
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        for _ in range(rounds):
            for arm, forward in (("before", torch.nn.GroupNorm.forward), ("after", FAST_FORWARD)):
                networks.FastGroupNorm.forward = forward
                generator.encode(x)
                start = time.thread_time()
                for _ in range(passes):
                    generator.encode(x)
                times[arm].append(round(1e3 * (time.thread_time() - start) / passes, 2))
    networks.FastGroupNorm.forward = FAST_FORWARD
    diffs = np.subtract(times["after"], times["before"])
    return {**times, "mean_paired_difference_ms": round(float(diffs.mean()), 2),
            "standard_error_ms": round(float(diffs.std(ddof=1) / np.sqrt(len(diffs))), 2)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "Task04_Hippocampus" / "imagesTr"))
    parser.add_argument("--volumes", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--precisions", default="fp32,bf16")
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
    report = {"cpu": cpu_info(), "torch": torch.__version__, "threads": 1, "volumes": [f.name for f in files]}
    for precision in args.precisions.split(","):
        if precision == "bf16" and not inference.cpu_has_native_bf16():
            print("bf16: this CPU has no native bf16, skipped")
            continue
        enc = encoder_rounds(model, precision)
        print(f"{precision} encoder alone, 35 slices: before {np.median(enc['before']):.1f} ms, after "
              f"{np.median(enc['after']):.1f} ms; paired {enc['mean_paired_difference_ms']:+.1f} ± "
              f"{enc['standard_error_ms']:.1f} ms", flush=True)
        run(model, images[:1], before=False, precision=precision)  # warm-up
        rounds, same_labels, prob_diff, unc_diff = [], True, 0.0, 0.0
        for i in range(args.rounds):
            old, old_out = run(model, images, True, precision)
            new, new_out = run(model, images, False, precision)
            for (l0, p0, u0), (l1, p1, u1) in zip(old_out, new_out):
                same_labels &= bool(np.array_equal(l0, l1))
                prob_diff = max(prob_diff, float(np.abs(p0 - p1).max()))
                unc_diff = max(unc_diff, float(np.abs(u0 - u1).max()))
            rounds.append({"before": round(old, 3), "after": round(new, 3)})
            print(f"{precision} round {i + 1}: before {old:.3f}  after {new:.3f} CPU-s per volume", flush=True)
        before, after = (float(np.median([r[k] for r in rounds])) for k in ("before", "after"))
        diffs = [r["after"] - r["before"] for r in rounds]
        se = float(np.std(diffs, ddof=1) / np.sqrt(len(diffs))) if len(diffs) > 1 else None
        report[precision] = {"encoder_alone_ms_per_35_slices": enc, "rounds": rounds, "median_before": before, "median_after": after,
                             "mean_paired_difference": round(float(np.mean(diffs)), 4), "standard_error": se,
                             "labels_identical": same_labels, "largest_probability_difference": prob_diff,
                             "largest_uncertainty_difference": unc_diff}
        print(f"{precision} median: before {before:.3f}, after {after:.3f} CPU-s per volume; paired "
              f"{np.mean(diffs):+.3f}{f' ± {se:.3f}' if se else ''}; labels identical {same_labels}; "
              f"probabilities within {prob_diff:.1e}, uncertainty within {unc_diff:.1e}", flush=True)
    report["load_average"] = load_average()
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
