"""``cdal predict`` over a folder, end to end, as issue 17 defines it: (many-volume run - 1-volume run) / (n - 1).

Each run is a fresh process (start-up, model loading, reading, sampling with the attention map, writing the three
outputs and the report), T = 2 x 5 samples, on all the machine's cores. Arms: this checkout and, optionally, an
older one (``--baseline``: a ``git worktree`` of an earlier commit), each run with the same model folder. Rounds
interleave arms and precisions, so the machine's drift falls on both; the JSON names the CPU.

Usage: python benchmarks/bench_predict_folder.py [--volumes 20] [--rounds 3] [--precisions fp32,auto]
           [--baseline /tmp/old] [--current-args=--no-attention] [--json out.json]
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_cpu_inference import cpu_info, load_average  # noqa: E402


def timed_predict(repo: Path, model: Path, folder: Path, precision: str, extra=()) -> float:
    """Wall seconds of one ``cdal predict`` process run from ``repo``'s code (``extra``: further options)."""
    out = Path(tempfile.mkdtemp(prefix="cdal-bench-"))
    command = [sys.executable, "-m", "cdal_core.cli", "predict", "--model", str(model), "--input", str(folder),
               "--output", str(out / "out"), "--precision", precision, *extra]
    try:
        start = time.perf_counter()
        subprocess.run(command, cwd=repo, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       env={**os.environ, "PYTHONPATH": str(repo)})
        return time.perf_counter() - start
    finally:
        shutil.rmtree(out, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "Task04_Hippocampus" / "imagesTr"))
    parser.add_argument("--model", default=str(ROOT / "Resources" / "Models" / "hippocampus"))
    parser.add_argument("--volumes", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--precisions", default="fp32,auto")
    parser.add_argument("--baseline", default=None, help="a checkout of older code to compare with")
    parser.add_argument("--current-args", default="",
                        help="further cdal predict options for this checkout's arm, e.g. --current-args=--no-attention "
                             "with --baseline . to time an option against the default")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    files = sorted(Path(args.data).glob("hippocampus_*.nii.gz"))[:args.volumes]
    if len(files) < 2:
        print(f"need at least 2 MSD hippocampus volumes in {args.data}", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="cdal-folders-"))
    many, one = work / "many", work / "one"
    many.mkdir()
    one.mkdir()
    for f in files:
        (many / f.name).symlink_to(f.resolve())
    (one / files[0].name).symlink_to(files[0].resolve())
    arms = {"current": ROOT} | ({"baseline": Path(args.baseline).resolve()} if args.baseline else {})
    precisions = args.precisions.split(",")
    rows = {(a, p): [] for a in arms for p in precisions}
    try:
        for r in range(args.rounds):
            for p in precisions:
                for arm, repo in (arms.items() if r % 2 == 0 else reversed(list(arms.items()))):
                    extra = args.current_args.split() if arm == "current" else []
                    t_many = timed_predict(repo, Path(args.model), many, p, extra)
                    t_one = timed_predict(repo, Path(args.model), one, p, extra)
                    per_volume = (t_many - t_one) / (len(files) - 1)
                    rows[(arm, p)].append({"many_s": round(t_many, 2), "one_s": round(t_one, 2),
                                           "per_volume_s": round(per_volume, 3)})
                    print(f"round {r + 1} {p} {arm}: {len(files)} volumes {t_many:.1f} s, 1 volume {t_one:.1f} s "
                          f"-> {per_volume:.3f} s per volume", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report = {"cpu": cpu_info(), "load_average": load_average(), "volumes": len(files), "model": args.model,
              "arms": {a: str(r) for a, r in arms.items()}, "current_args": args.current_args, "results": {}}
    for p in precisions:
        entry = {a: {"rounds": rows[(a, p)],
                     "mean_per_volume_s": round(float(np.mean([x["per_volume_s"] for x in rows[(a, p)]])), 3)}
                 for a in arms}
        if "baseline" in arms:
            diffs = np.subtract([x["per_volume_s"] for x in rows[("current", p)]],
                                [x["per_volume_s"] for x in rows[("baseline", p)]])
            entry["paired_current_minus_baseline_s"] = round(float(diffs.mean()), 3)
            entry["standard_error_s"] = round(float(diffs.std(ddof=1) / np.sqrt(len(diffs))), 3) if len(diffs) > 1 else None
        report["results"][p] = entry
        print(p, json.dumps(entry if "baseline" not in arms else {k: v for k, v in entry.items() if k != "current"
                                                                   and k != "baseline"}),
              {a: entry[a]["mean_per_volume_s"] for a in arms})
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
