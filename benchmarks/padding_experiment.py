"""Does padding each slice to at least the training slice size help? (issue 15, session 24)

Training fits every slice to exactly ``train_size`` (56 x 40 for hippocampus): centre-padded with background,
then centre-cropped. Inference pads only to the next multiple of 8, so a 48 x 36 plane is seen with 0 / 4 rows
of background where training showed it 8 / 4. This runs ``cdal evaluate`` with inference padding every slice to at
least ``--min-size`` (the card's ``input.train_size`` by default) and writes the report; compare it, paired, with a
plain ``cdal evaluate`` of the same model, cases and seed (``tools/compare_reports.py``). Volumes whose slices are
at least that large already give bit-identical results.

    python benchmarks/padding_experiment.py --model runs/s7 --data ../shared/data/Task04_Hippocampus \\
        --cases configs/hippocampus_val.txt --seed 2 --json runs/pad/s7_padmin_s2.json
"""

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cdal_core import inference  # noqa: E402
from cdal_core.cli import main as cdal  # noqa: E402


def at_least(min_size):
    """A stand-in for ``inference.pad_to`` that also pads up to ``min_size`` (centred, as training does)."""
    plain = inference.pad_to

    def pad_to(array, size, value=0.0):
        return plain(array, tuple(max(s, m) for s, m in zip(size, min_size)), value)
    return pad_to


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--cases", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", required=True)
    p.add_argument("--min-size", default=None, help="H,W (default: the card's input.train_size)")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="further cdal evaluate options")
    args = p.parse_args()
    card = json.loads((Path(args.model) / "model.json").read_text())
    min_size = [int(v) for v in args.min_size.split(",")] if args.min_size else card["input"]["train_size"]
    inference.pad_to = at_least(min_size)
    cdal(["evaluate", "--model", args.model, "--data", args.data, "--cases", args.cases, "--seed", str(args.seed),
          "--json", args.json, "--overwrite", "--precision", "fp32", *args.extra])
    report = json.loads(Path(args.json).read_text())
    report["padded_to_at_least"] = min_size
    Path(args.json).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
