"""Training and inference throughput of the hippocampus recipe on a GPU (or any device), bf16 against fp32,
measured side by side in one process.

Rows:
- training: full Algorithm-1 steps (D step with R1 on its schedule, attention, G step, EMA) of
  ``configs/hippocampus.json``'s networks at ``--batch`` slices, in slices/s, with the per-slice MONAI
  augmentation (on the CPU) and with the batched one (on the device); plus each data pipeline alone (batch
  draw + augmentation), which bounds what any device can reach;
- inference: ``segment_image`` (T=2 x 5 samples, the defaults) on hippocampus-sized volumes, in volumes/s.

Data: ``--data`` (an MSD folder such as ../shared/data/Task04_Hippocampus) or, by default, synthetic
hippocampus-sized volumes made on the fly, so that the script runs on a bare GPU machine with the project alone.
The issue's target: >= 5,000 training slices/s on an H100 in bf16.

Usage: python benchmarks/bench_gpu.py [--device cuda] [--batch 128] [--steps 30] [--json out.json]
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cdal_core.config import TrainConfig  # noqa: E402
from cdal_core.data import read_image, read_msd_cases  # noqa: E402
from cdal_core.inference import resolve_device, segment_image  # noqa: E402
from cdal_core.model_io import load_model  # noqa: E402
from cdal_core.synthetic import make_msd_dataset  # noqa: E402
from cdal_core.trainer import Trainer  # noqa: E402


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def training_throughput(data: Path, config: Path, device: torch.device, batch: int, steps: int, warmup: int,
                        amp: bool, augmentation: str) -> dict:
    """Slices per second of whole training steps, and of the batch pipeline alone (draw + augmentation)."""
    cfg = TrainConfig.load(str(config))
    cfg.batch_size, cfg.amp, cfg.val_cases, cfg.val_every, cfg.checkpoint_every = batch, amp, None, 10**9, 10**9
    if cfg.augmentation is not None:
        cfg.augmentation = {**cfg.augmentation, "backend": augmentation}
    with tempfile.TemporaryDirectory() as run:
        trainer = Trainer(str(data), str(Path(run) / "run"), cfg, device=str(device))
        for _ in range(warmup):
            trainer.train_step()
        synchronize(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            trainer.train_step()
        synchronize(device)
        step_seconds = (time.perf_counter() - t0) / steps
        t0 = time.perf_counter()
        for step in range(steps):
            trainer._batch(step)
        synchronize(device)
        data_seconds = (time.perf_counter() - t0) / steps
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"slices_per_s": batch / step_seconds, "seconds_per_step": step_seconds,
            "data_pipeline_slices_per_s": batch / data_seconds, "data_seconds_per_step": data_seconds,
            "batch": batch, "steps": steps, "peak_gpu_memory_gib": peak}


def inference_throughput(images, model, device: torch.device, precision: str, repeats: int) -> dict:
    segment_image(images[0], model, device=str(device), precision=precision, seed=0)  # warm-up
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        for image in images:
            segment_image(image, model, device=str(device), precision=precision, seed=0, with_attention=False)
    synchronize(device)
    seconds = (time.perf_counter() - t0) / (repeats * len(images))
    return {"volumes_per_s": 1 / seconds, "seconds_per_volume": seconds, "volumes": len(images) * repeats}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda", help="cuda (default), cpu or auto")
    p.add_argument("--data", default=None, help="MSD folder; default: synthetic hippocampus-sized volumes")
    p.add_argument("--config", default=str(ROOT / "configs" / "hippocampus.json"))
    p.add_argument("--model", default="hippocampus")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--volumes", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    device = resolve_device(args.device)  # 'cuda' without a GPU stops here with the fix
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(args.data) if args.data else make_msd_dataset(Path(tmp) / "data", num_volumes=max(args.volumes, 4))
        cases, _ = read_msd_cases(str(data))
        images = [read_image(c.image) for c in cases[: args.volumes]]
        rows = {}
        # the trainer autocasts to bf16 on CUDA only
        precisions = [("bf16", True)] if device.type == "cuda" and torch.cuda.is_bf16_supported() else []
        for augmentation in ("batched", "monai"):
            for precision, amp in precisions + [("fp32", False)]:
                rows[f"training, {precision}, {augmentation} augmentation"] = training_throughput(
                    data, Path(args.config), device, args.batch, args.steps, args.warmup, amp, augmentation)
        model = load_model(args.model, device=str(device))
        for precision in ("bf16", "fp32"):
            rows[f"inference T=2 x 5, {precision}"] = inference_throughput(images, model, device, precision,
                                                                         args.repeats)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    result = {"device": name, "torch": torch.__version__, "threads": torch.get_num_threads(),
              "data": str(args.data or "synthetic"), "rows": rows}
    print(f"{name}, torch {torch.__version__}; training batch {args.batch}")
    for row, r in rows.items():
        if "slices_per_s" in r:
            print(f"{row:<42} {r['slices_per_s']:9.0f} slices/s  (data pipeline alone: "
                  f"{r['data_pipeline_slices_per_s']:.0f} slices/s)")
        else:
            print(f"{row:<42} {r['volumes_per_s']:9.2f} volumes/s ({r['seconds_per_volume']:.3f} s/volume)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
