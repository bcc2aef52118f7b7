"""Does averaging the x0 predictions of every denoising step help, at no extra cost? (issues 15 and 16)

Algorithm 2 keeps only the last step's prediction of x0; the earlier steps' predictions are computed anyway (the
sampler needs them for the posterior draw) and thrown away. This runs ``cdal evaluate`` once per weighting of the
steps (``--weights``, one weight per step from T down to 1, ``0,1`` being Algorithm 2) with the same seed, so the
noise draws are identical and only the pooling differs, and writes one report per weighting. Compare them paired
with ``tools/compare_reports.py``.

    python benchmarks/step_pooling_experiment.py --model runs/s7 --data ../shared/data/Task04_Hippocampus \\
        --cases configs/hippocampus_val.txt --weights 0,1 1,1 1,2 --out docs/results/session23_pool_s7
"""

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cdal_core.cli import main as cdal  # noqa: E402
from cdal_core.model_io import LoadedModel  # noqa: E402
from cdal_core.sampler import STEP_POOLING, step_pooling_weights  # noqa: E402


def fixed_weights(w):
    """A stand-in for ``LoadedModel.step_weights`` that always gives ``w`` (None for the last step alone)."""
    last_only = all(v == 0 for v in w[:-1])
    return lambda self, steps=None, pooling=None: None if last_only else w


def label(path: Path, w) -> None:
    """The report says which weights made it (evaluate writes the card's pooling, which the stand-in bypassed)."""
    report = json.loads(path.read_text())
    named = {name: step_pooling_weights(name, len(w)) for name in STEP_POOLING}
    named["last"] = [0.0] * (len(w) - 1) + [1.0]
    report["step_pooling"] = next((n for n, v in named.items() if v == w), "custom")
    report["step_weights"] = w
    path.write_text(json.dumps(report, indent=1) + "\n")


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--cases", default=None)
    p.add_argument("--weights", nargs="+", required=True, help="per weighting: weights from step T down to 1")
    p.add_argument("--out", required=True, help="report prefix: <out>_w<weights>.json")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--symmetries", default="off")
    args = p.parse_args()
    for weights in args.weights:
        w = [float(v) for v in weights.split(",")]
        # any weights, not only the named poolings: the model answers every segment call with these
        LoadedModel.step_weights = fixed_weights(w)
        out = f"{args.out}_w{weights.replace(',', '-')}.json"
        argv = ["evaluate", "--model", args.model, "--data", args.data, "--json", out, "--overwrite",
                "--precision", args.precision, "--symmetries", args.symmetries]
        if args.cases:
            argv += ["--cases", args.cases]
        print(f"weights {w} -> {out}", flush=True)
        if cdal(argv) != 0:
            return 1
        label(Path(out), w)
    return 0


if __name__ == "__main__":
    sys.exit(main())
