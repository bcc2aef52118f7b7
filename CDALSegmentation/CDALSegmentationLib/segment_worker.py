"""Child process for the Slicer module: segment one exported image file, write the outputs as files.

Run as ``python -m CDALSegmentationLib.segment_worker --input in.nrrd --model M --output-dir DIR ...`` with
``cdal_core`` importable. Prints one JSON object per line on stdout:
``{"event": "progress", "fraction": f, "message": m}`` ... ``{"event": "done", "seconds": s, ...}``;
on a user-facing problem ``{"event": "error", "message": m}`` and exit status 2.
Writes ``labels.nrrd`` (UInt8), ``uncertainty.nrrd`` and ``attention.nrrd`` (Float32) on the input grid.
"""
import argparse
import json
import os
import sys
import time


def _emit(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--samples", type=int, default=5)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)

    from cdal_core.errors import CDALError

    try:
        _emit({"event": "progress", "fraction": 0.0, "message": "Loading model"})
        import SimpleITK as sitk
        from cdal_core.inference import resolve_device, segment_image
        from cdal_core.model_io import load_model

        device = str(resolve_device(args.device))
        model = load_model(args.model, device=device)
        image = sitk.ReadImage(args.input)
        last = [0.0]

        def progress(fraction, message):
            now = time.time()
            if now - last[0] > 0.2 or fraction >= 1.0:
                last[0] = now
                _emit({"event": "progress", "fraction": 0.05 + 0.9 * float(fraction), "message": str(message)})

        result = segment_image(image, model, steps=args.steps, samples=args.samples, seed=args.seed,
                               device=device, progress=progress)
        _emit({"event": "progress", "fraction": 0.97, "message": "Writing results"})
        os.makedirs(args.output_dir, exist_ok=True)
        sitk.WriteImage(result.labels, os.path.join(args.output_dir, "labels.nrrd"), True)
        sitk.WriteImage(result.uncertainty, os.path.join(args.output_dir, "uncertainty.nrrd"), True)
        if result.attention is not None:
            sitk.WriteImage(result.attention, os.path.join(args.output_dir, "attention.nrrd"), True)
        _emit({"event": "done", "seconds": float(result.seconds), "device": device,
               "notes": list(getattr(result, "notes", []) or [])})
        return 0
    except CDALError as exc:
        _emit({"event": "error", "message": str(exc)})
        sys.stderr.write(str(exc) + "\n")
        return 2
    except MemoryError:
        msg = "out of memory: use an ROI to segment a smaller region, or fewer samples"
        _emit({"event": "error", "message": msg})
        sys.stderr.write(msg + "\n")
        return 2
    except RuntimeError as exc:
        text = str(exc)
        if "out of memory" in text.lower():
            text = "GPU out of memory: choose Device CPU, use an ROI, or fewer samples"
        _emit({"event": "error", "message": text.splitlines()[0] if text else exc.__class__.__name__})
        raise


if __name__ == "__main__":
    sys.exit(main())
