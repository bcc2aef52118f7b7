"""CPU inference benchmark, measured side by side in one process (start-up excluded).

Rows: the cDAL pipeline (T=2 x 5 samples, whole slices, surely-empty slices stopping after the first step; bf16
where the CPU has it, fp32, and with every step on every slice), the reference protocol (32^3 sliding window,
overlap 0.75, 5 samples per window), 100-step sampling (SegDiff-like) and one plain forward pass (the floor), each
with seconds/volume, GFLOP/volume and Dice on the same validation volumes; the machine's measured fp32 (and bf16)
matmul peak and the efficiency achieved against the peak of the row's precision; how many times the reference's
windows cover each voxel (the bound on its FLOP ratio); a 256x256x180 volume with and without an ROI (seconds,
peak RSS).

Usage: python benchmarks/bench_cpu_inference.py [--model hippocampus] [--volumes 8] [--rounds 3] [--json out.json]
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cdal_core.data import read_case_list, read_image, read_msd_cases, select_cases  # noqa: E402
from cdal_core import inference  # noqa: E402
from cdal_core.inference import segment_image  # noqa: E402
from cdal_core.metrics import segmentation_metrics  # noqa: E402
from cdal_core.model_io import load_model  # noqa: E402
from cdal_core.sampler import sample  # noqa: E402


def cpu_info() -> dict:
    """CPU model, the flags that decide the kernels (AVX2/FMA, AVX-512, bf16, AMX) and the load at the time."""
    info = {"model": "unknown", "flags": [], "cores": os.cpu_count()}
    try:
        text = Path("/proc/cpuinfo").read_text()
        info["model"] = next(line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name"))
        # a VM may show only "AMD EPYC": family and model number tell the generation (25/17: Zen 4, Genoa)
        for key, field in (("family", "cpu family"), ("model_number", "model")):
            info[key] = next((line.split(":", 1)[1].strip() for line in text.splitlines()
                              if line.split(":", 1)[0].strip() == field), None)
        flags = set(next(line.split(":", 1)[1] for line in text.splitlines() if line.startswith("flags")).split())
        info["flags"] = sorted(f for f in flags if f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"))
    except (OSError, StopIteration):
        pass
    return info


def load_average() -> list:
    return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]] if Path("/proc/loadavg").exists() else []


def core_peak(dtype: torch.dtype = torch.float32, seconds: float = 3.0) -> float:
    """Best GFLOP/s of one core (1 thread, 1024^2 matmul) per second of this process's CPU time: what the core
    computes while it runs us, whatever else shares the machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    a, b = torch.randn(1024, 1024, dtype=dtype), torch.randn(1024, 1024, dtype=dtype)
    a @ b
    best, end = 0.0, time.time() + seconds
    while time.time() < end:
        t0 = time.process_time()
        for _ in range(4):
            a @ b
        dt = time.process_time() - t0
        if dt > 0:
            best = max(best, 4 * 2 * 1024**3 / dt / 1e9)
    torch.set_num_threads(threads)
    return best


def matmul_peak(seconds: float = 3.0, dtype: torch.dtype = torch.float32) -> float:
    """Best GFLOP/s of a 2048^2 matmul on all threads in ``dtype``."""
    a, b = torch.randn(2048, 2048, dtype=dtype), torch.randn(2048, 2048, dtype=dtype)
    a @ b
    best, end = 0.0, time.time() + seconds
    while time.time() < end:
        t0 = time.perf_counter()
        a @ b
        best = max(best, 2 * 2048**3 / (time.perf_counter() - t0) / 1e9)
    return best


def sliding_window_predict(model, image: sitk.Image, samples: int, seed: int) -> np.ndarray:
    """The reference protocol: 32^3 windows (overlap 0.75), each window sliced and sampled, votes averaged."""
    from monai.inferers import sliding_window_inference
    arr = model.normalisation(sitk.GetArrayFromImage(image).astype(np.float32))
    vol = torch.from_numpy(arr)[None, None] * 2 - 1
    rng = torch.Generator().manual_seed(seed)
    ctx = model.config.context_slices

    def predictor(win: torch.Tensor) -> torch.Tensor:  # (B, 1, 32, 32, 32) -> (B, C, 32, 32, 32)
        outs = []
        for w in win:
            idx = torch.clamp(torch.arange(w.shape[1])[:, None] + torch.arange(-ctx, ctx + 1)[None], 0, w.shape[1] - 1)
            slices = w[0][idx]  # (32, 2c+1, 32, 32)
            out = sample(model.generator, slices, model.schedule(2), samples, rng)
            outs.append(out.probabilities.permute(1, 0, 2, 3))
        return torch.stack(outs)

    with torch.inference_mode():
        probs = sliding_window_inference(vol, (32, 32, 32), 4, predictor, overlap=0.75, mode="constant",
                                         padding_mode="constant", cval=-1.0)
    return probs[0].argmax(0).numpy()


def window_redundancy(image: sitk.Image, model, roi: int = 32, overlap: float = 0.75) -> float:
    """Voxels covered by the reference protocol's windows (MONAI's sliding-window grid) divided by the
    voxels of our slices (each slice padded to the network's size multiple)."""
    from cdal_core.data import round_up
    from cdal_core.geometry import GridMapping
    size = sitk.GetArrayViewFromImage(image).shape
    step = int(roi * (1 - overlap))
    windows = np.prod([1 if s <= roi else -(-(s - roi) // step) + 1 for s in size])
    shape = GridMapping(image, model.grid, fill=0).model_array().shape
    axis, m = model.slice_axis, model.config.size_multiple
    in_plane = [s for i, s in enumerate(shape) if i != axis]
    ours = shape[axis] * round_up(in_plane[0], m) * round_up(in_plane[1], m)
    return float(windows * roi ** 3 / ours)


def timed(fn):
    """Output, seconds and FLOPs (torch's counter: convolutions and matmuls) of one call."""
    with FlopCounterMode(display=False) as fc:
        t0 = time.perf_counter()
        out = fn()
        dt = time.perf_counter() - t0
    return out, dt, fc.get_total_flops()


def peak_rss_child(code: str) -> dict:
    """Run a snippet in a fresh process; return its JSON output plus peak RSS in MB."""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-1500:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


BIG_VOLUME_CODE = r'''
import json, resource, sys, time
import numpy as np, SimpleITK as sitk
sys.path.insert(0, ".")
from cdal_core.inference import segment_image
from cdal_core.model_io import load_model
from cdal_core.demo import template_path
def peak_rss_mb():
    # this process's own high-water mark: ru_maxrss would carry over the benchmark parent's RSS (kept across exec)
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
model = load_model("{model}", device="cpu")
tpl = sitk.ReadImage(str(template_path()))
ref = sitk.Image([256, 256, 180], tpl.GetPixelID()); ref.SetSpacing((1.0, 1.0, 1.0)); ref.SetDirection(tpl.GetDirection())
ref.SetOrigin(tuple(np.asarray(tpl.GetOrigin()) + np.asarray(tpl.GetDirection()).reshape(3, 3) @ ((np.asarray(tpl.GetSize()) - [256, 256, 180]) / 2)))
big = sitk.Resample(tpl, ref)
roi = {roi}
image = big
if roi:
    idx = np.asarray(big.TransformPhysicalPointToIndex((26.0, 23.0, -13.0)))
    image = sitk.RegionOfInterest(big, [36, 52, 36], (idx - [18, 26, 18]).tolist())
t0 = time.perf_counter()
res = segment_image(image, model, samples=5, seed=0, device="cpu")
dt = time.perf_counter() - t0
print(json.dumps({{"seconds": dt, "precision": "auto", "peak_rss_mb": peak_rss_mb(),
                  "size": list(big.GetSize()), "segmented": list(image.GetSize())}}))
'''


WHOLE_BRAIN_CODE = r'''
import time
t0 = time.perf_counter()
import json, sys
from pathlib import Path
sys.path.insert(0, ".")
import torch
from cdal_core import scan as scanmod
from cdal_core.cli import write_image_atomic
from cdal_core.inputs import list_inputs, read_scan
from cdal_core.model_io import load_model
t1 = time.perf_counter()
model = load_model("{model}", device="cpu")
t2 = time.perf_counter()
item = list_inputs(Path("{scan}"))[0]
image = read_scan(item).image
t3 = time.perf_counter()
parts = {{"segment_per_side_s": [], "threads_per_side": []}}
locate, segment = scanmod.locate, scanmod.segment_image
def timed_locate(*a, **k):
    t = time.perf_counter(); out = locate(*a, **k); parts["locate_s"] = time.perf_counter() - t; return out
def timed_segment(*a, **k):
    t = time.perf_counter(); out = segment(*a, **k)
    parts["segment_per_side_s"].append(time.perf_counter() - t); parts["threads_per_side"].append(torch.get_num_threads())
    return out
scanmod.locate, scanmod.segment_image = timed_locate, timed_segment
result = scanmod.segment_scan(image, model, samples=5, seed=0, device="cpu")
t4 = time.perf_counter()
out = Path("{out}"); out.mkdir(parents=True, exist_ok=True)
for kind, im in (("seg", result.labels), ("uncertainty", result.uncertainty), ("attention", result.attention)):
    write_image_atomic(im, out / f"wb_{{kind}}.nii.gz")
t5 = time.perf_counter()
print(json.dumps({{"imports_s": t1 - t0, "model_load_s": t2 - t1, "read_s": t3 - t2, "segment_scan_s": t4 - t3,
                  "write_s": t5 - t4, "in_process_total_s": t5 - t0, "size": list(image.GetSize()),
                  "structures_mm3": {{r["side"] + " " + r["name"]: r["volume_mm3"] for r in result.report["structures"]}},
                  **parts}}))
'''


def whole_brain_row(model: str, scan: str, env_threads: str = "") -> dict:
    """A whole-brain T1 end to end in a fresh process (start-up included): wall time and peak RSS from
    /usr/bin/time, the breakdown from the child itself."""
    import tempfile
    with tempfile.TemporaryDirectory() as out:
        code = WHOLE_BRAIN_CODE.format(model=model, scan=scan, out=out)
        env = dict(os.environ)
        if env_threads:
            env["CDAL_THREADS"] = env_threads
        load = load_average()
        proc = subprocess.run(["/usr/bin/time", "-f", "%M %e", sys.executable, "-c", code], capture_output=True,
                              text=True, cwd=ROOT, env=env)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-1500:])
    rss_kb, wall = proc.stderr.strip().splitlines()[-1].split()
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    row.update({"wall_s": float(wall), "peak_rss_mb": int(rss_kb) / 1024, "scan": scan, "load_before": load,
                "threads": env_threads or "adaptive (cores left free by other processes)"})
    return row


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="hippocampus")
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "Task04_Hippocampus"))
    p.add_argument("--cases", default=str(ROOT / "configs" / "hippocampus_val.txt"))
    p.add_argument("--volumes", type=int, default=8)
    p.add_argument("--skip", default="", help="comma list of rows to skip: reference,steps100,big,wholebrain")
    p.add_argument("--rounds", type=int, default=3, help="timing rounds of the fast rows (median per volume)")
    p.add_argument("--json", default=None)
    p.add_argument("--scan", default=str(ROOT.parent / "shared" / "data" / "T1w_heads" / "sub-01_T1w.nii.gz"),
                   help="the whole-brain T1 of the whole-brain row")
    args = p.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    load_start = load_average()
    # the rows below compare ways at a fixed thread count; the adaptive count is measured in the whole-brain rows
    inference.ADAPT_THREADS = False
    torch.set_num_threads(torch.get_num_threads())
    model = load_model(args.model, device="cpu")
    cases, _ = read_msd_cases(args.data)
    cases = select_cases(cases, read_case_list(args.cases), args.cases, args.data)[: args.volumes]
    images = [read_image(c.image) for c in cases]
    truths = [sitk.GetArrayFromImage(read_image(c.label)) for c in cases]
    segment_image(images[0], model, samples=5, seed=0)  # warm-up (start-up excluded)
    bf16 = inference.cpu_has_native_bf16()
    peaks = {"fp32": matmul_peak()}
    core_peaks = {"fp32": core_peak()}
    if bf16:  # only where the CPU computes bf16 natively: elsewhere torch emulates it, no meaningful peak
        peaks["bf16"] = matmul_peak(dtype=torch.bfloat16)
        core_peaks["bf16"] = core_peak(torch.bfloat16)

    def run(steps, samples, precision="fp32", early_exit=True):
        return lambda im: sitk.GetArrayFromImage(segment_image(
            im, model, steps=steps, samples=samples, seed=0, with_attention=False, precision=precision,
            early_exit=early_exit).labels)

    def way(steps, samples, precision="fp32", early_exit=True):
        """(timed function, its precision, the fp32 function whose FLOPs are counted: a bf16 run does the same
        network work, plus diagonal matmuls standing in for broadcast adds, which are not model FLOPs)"""
        return run(steps, samples, precision, early_exit), precision, run(steps, samples, "fp32", early_exit)

    fast = "bf16" if bf16 else "fp32"
    ours = f"cdal T=2 x 5 samples (ours, {fast})"
    ways = {ours: way(2, 5, fast), f"cdal T=2 x 5, {fast}, every step on every slice": way(2, 5, fast, False)}
    if bf16:
        ways["cdal T=2 x 5 samples (fp32)"] = way(2, 5)
        ways["cdal T=1 x 5 samples (bf16)"] = way(1, 5, "bf16")
    ways["one forward pass (floor, fp32)"] = way(1, 1, early_exit=False)
    if "steps100" not in skip:
        inference.MAX_STEPS = 100
        ways["100-step sampling x 5 (SegDiff-like, fp32)"] = way(100, 5, early_exit=False)
    if "reference" not in skip:
        reference = lambda im: sliding_window_predict(model, im, 5, 0)  # noqa: E731
        ways["reference: 32^3 window, overlap 0.75, 5 samples (fp32)"] = (reference, "fp32", reference)
    # Rows that take seconds run --rounds times, round-robin, and keep each volume's median time: this machine's
    # speed drifts by 10-20 % over minutes, which would otherwise land on whichever row ran at the time.
    slow = {n for n in ways if n.startswith(("100-step", "reference"))}
    secs = {name: [[] for _ in images] for name in ways}
    dice = {name: [] for name in ways}
    for r in range(args.rounds):
        for name, (fn, _, _) in ways.items():
            if r and name in slow:
                continue
            for i, (im, truth) in enumerate(zip(images, truths)):
                t0 = time.perf_counter()
                pred = fn(im)
                secs[name][i].append(time.perf_counter() - t0)
                if r == 0:
                    m = segmentation_metrics(pred, truth, 3)
                    dice[name].append([m[1]["dice"], m[2]["dice"]])
    rows = {}
    for name, (fn, precision, counted) in ways.items():
        per_volume = [float(np.median(v)) for v in secs[name]]
        # FLOPs counted in a separate pass on the first volume: the counter's dispatch overhead stays out of the timings
        _, _, flops0 = timed(lambda: counted(images[0]))
        d = np.mean(dice[name], axis=0)
        rows[name] = {"seconds_per_volume": float(np.mean(per_volume)), "gflop_per_volume": float(flops0 / 1e9),
                      "gflops_achieved": float(flops0 / per_volume[0] / 1e9), "rounds": len(secs[name][0]),
                      "dice_anterior": float(d[0]), "dice_posterior": float(d[1]), "precision": precision}
    for r in rows.values():
        r["time_ratio_vs_ours"] = r["seconds_per_volume"] / rows[ours]["seconds_per_volume"]
        r["flop_ratio_vs_ours"] = r["gflop_per_volume"] / max(rows[ours]["gflop_per_volume"], 1e-9)
        r["efficiency_vs_peak"] = r["gflops_achieved"] / peaks[r["precision"]]
    # The network part on one thread, in this process's CPU seconds (robust to other processes on the machine),
    # against one core's matmul peak: ours at fp32, median over rounds, interleaved with the one-pass floor.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    one_thread = {}
    for name, steps, samples, ee in ((f"cdal T=2 x 5 samples (fp32)", 2, 5, True), ("one forward pass (fp32)", 1, 1, False)):
        one_thread[name] = {"cpu_s": [], "steps": steps, "samples": samples, "early_exit": ee}
    for r in range(args.rounds):
        for name, spec in one_thread.items():
            for im in images:
                t0 = time.process_time()
                segment_image(im, model, steps=spec["steps"], samples=spec["samples"], seed=0, with_attention=False,
                              precision="fp32", early_exit=spec["early_exit"])
                spec["cpu_s"].append(time.process_time() - t0)
    network = {}
    for name, spec in one_thread.items():
        _, _, flops = timed(lambda: [segment_image(im, model, steps=spec["steps"], samples=spec["samples"], seed=0,
                                                   with_attention=False, precision="fp32",
                                                   early_exit=spec["early_exit"]) for im in images])
        cpu = float(np.median(spec["cpu_s"])) * len(images)
        network[name] = {"cpu_s_per_volume": cpu / len(images), "gflop_per_volume": flops / 1e9 / len(images),
                         "gflops_per_core": flops / cpu / 1e9, "fraction_of_core_peak": flops / cpu / 1e9 / core_peaks["fp32"]}
    torch.set_num_threads(threads)
    redundancy = [window_redundancy(im, model) for im in images]
    reference_bound = {"window_voxels_per_sliced_voxel": float(np.mean(redundancy)),
                       "note": "voxels the 32^3 windows (overlap 0.75) cover, per voxel our whole-slice pass covers "
                               "(padded slices): the FLOP ratio the same network can reach on these volumes at equal "
                               "steps and samples"}
    result = {"machine": {"cpu": cpu_info(), "threads": torch.get_num_threads(), "matmul_peak_gflops": peaks["fp32"],
                          "matmul_peak_gflops_bf16": peaks.get("bf16"), "cpu_native_bf16": bf16,
                          "core_peak_gflops_cpu_time": core_peaks, "load_average_start": load_start,
                          "torch": torch.__version__}, "volumes": len(images), "rows": rows,
              "network_one_thread_cpu_time": network, "reference_redundancy": reference_bound}
    if "big" not in skip:
        result["large_volume"] = {
            "256x256x180 whole volume": peak_rss_child(BIG_VOLUME_CODE.format(model=args.model, roi=False)),
            "256x256x180 with ROI around one hippocampus": peak_rss_child(BIG_VOLUME_CODE.format(model=args.model, roi=True)),
        }
    if "wholebrain" not in skip and Path(args.scan).exists():
        result["whole_brain"] = {"adaptive threads": whole_brain_row(args.model, args.scan),
                                 "2 threads fixed": whole_brain_row(args.model, args.scan, "2")}
    result["machine"]["load_average_end"] = load_average()
    cpu = result["machine"]["cpu"]
    print(f"CPU: {cpu['model']} ({', '.join(cpu['flags'])}); load {load_start} -> {result['machine']['load_average_end']}")
    print("one core, CPU time: " + ", ".join(f"{k} {v:.1f} GFLOP/s" for k, v in core_peaks.items()))
    for name, r in network.items():
        print(f"  network part, 1 thread: {name}: {r['cpu_s_per_volume']:.2f} CPU-s/volume, {r['gflops_per_core']:.1f} "
              f"GFLOP/s = {100 * r['fraction_of_core_peak']:.0f} % of the core's fp32 peak")
    print("matmul peak: " + ", ".join(f"{k} {v:.1f} GFLOP/s" for k, v in peaks.items()) +
          f" on {torch.get_num_threads()} threads; {len(images)} volumes; efficiency vs the row's precision")
    print(f"{'way':<50}{'s/vol':>8}{'GFLOP':>9}{'eff.':>7}{'x time':>8}{'x FLOP':>8}{'Dice ant':>10}{'Dice post':>10}")
    for name, r in rows.items():
        print(f"{name:<50}{r['seconds_per_volume']:8.3f}{r['gflop_per_volume']:9.1f}{100 * r['efficiency_vs_peak']:6.1f}%"
              f"{r['time_ratio_vs_ours']:8.2f}{r['flop_ratio_vs_ours']:8.2f}{100 * r['dice_anterior']:10.2f}"
              f"{100 * r['dice_posterior']:10.2f}")
    print(f"reference windows cover {reference_bound['window_voxels_per_sliced_voxel']:.1f}x the voxels of our "
          f"whole-slice pass on these volumes (the bound on the FLOP ratio at equal steps and samples)")
    for name, r in result.get("large_volume", {}).items():
        print(f"{name}: {r['seconds']:.2f} s, peak RSS {r['peak_rss_mb']:.0f} MB")
    for name, r in result.get("whole_brain", {}).items():
        print(f"whole brain ({name}): {r['wall_s']:.1f} s, peak RSS {r['peak_rss_mb']:.0f} MB; imports {r['imports_s']:.1f}, "
              f"model {r['model_load_s']:.1f}, read {r['read_s']:.1f}, locate {r.get('locate_s', 0):.1f}, sides "
              f"{', '.join(f'{v:.1f}' for v in r['segment_per_side_s'])} (threads {r['threads_per_side']}), write {r['write_s']:.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
