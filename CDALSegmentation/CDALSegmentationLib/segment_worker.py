"""Child process for the Slicer module: segment one exported image file, write the outputs as files.

Run as ``python -m CDALSegmentationLib.segment_worker --input in.nrrd --model M --output-dir DIR ...`` with
``cdal_core`` importable. Prints one JSON object per line on stdout:
``{"event": "progress", "fraction": f, "message": m}`` ... ``{"event": "done", "seconds": s, ...}``;
on a user-facing problem ``{"event": "error", "message": m}`` and exit status 2.
Writes into the output folder, all on the input grid: ``labels.nrrd`` (UInt8), ``uncertainty.nrrd`` and
``attention.nrrd`` (Float32), ``sides.nrrd`` (UInt8: 1 left, 2 right, 3 unknown, 0 background) and
``report.json`` (per-structure volumes, localisation). A volume larger than the model's crop (a whole brain)
is localised by ``cdal_core.scan.segment_scan``; an ROI crop from the GUI arrives already cropped, with
``--localise off`` (the user's box wins). A 2D image model (card ``input.image_size``) segments a single-slice
image (a PNG/TIFF as Slicer loads it) through ``cdal_core.predict2d``, as ``cdal predict`` does.
"""
import argparse
import errno
import json
import os
import sys
import tempfile
import time

OUTPUT_FILES = {"labels": "labels.nrrd", "uncertainty": "uncertainty.nrrd", "attention": "attention.nrrd",
                "sides": "sides.nrrd"}
REPORT_FILE = "report.json"


class Outputs(object):
    """SimpleITK images and report of one run, whichever cdal_core entry point produced them."""

    def __init__(self, labels, uncertainty, attention, sides, report, notes, seconds):
        self.labels, self.uncertainty, self.attention, self.sides = labels, uncertainty, attention, sides
        self.report, self.notes, self.seconds = report, list(notes or []), float(seconds or 0.0)


def isImageModel(card):
    """A 2D image model: its card has ``input.image_size`` (what ``cdal_core.predict2d.model_sizes`` requires)."""
    return "image_size" in card["input"]


def segmentImage(image, model, samples=5, steps=None, seed=None, device="cpu", progress=None, localise="auto"):
    """Segment a SimpleITK image with a loaded model (``cdal_core.scan.segment_scan``: a whole brain is localised
    unless ``localise`` is "off", which the GUI passes for a user's ROI crop: the user's box wins). A 2D image
    model segments a single-slice image instead (``segmentSlice``)."""
    if isImageModel(model.card):
        return segmentSlice(image, model, samples=samples, steps=steps, seed=seed, device=device, progress=progress)
    from cdal_core.scan import segment_scan

    r = segment_scan(image, model, steps=steps, samples=samples, seed=seed, device=device, progress=progress,
                     localise=localise)
    return Outputs(r.labels, r.uncertainty, r.attention, r.sides, r.report, r.notes, r.seconds)


def segmentSlice(image, model, samples=5, steps=None, seed=None, device="cpu", progress=None):
    """A single-slice image (how Slicer holds a PNG/TIFF: size (W, H, 1), grey or RGB) with a 2D model
    (``cdal_core.predict2d``, as ``cdal predict`` runs it); outputs on the image's grid, no sides."""
    import SimpleITK as sitk
    from cdal_core.predict2d import image_array_2d, model_sizes, segment_image_2d

    if progress is not None:
        progress(0.0, "Segmenting the image")
    array = image_array_2d(image, model.config.image_channels, "input")
    onSamples = None if progress is None else (lambda done: progress(0.95 * done, "Segmenting the image"))
    r = segment_image_2d(array, model, steps=steps, samples=samples, seed=seed, device=device, progress=onSamples)

    def onImageGrid(values):
        out = sitk.GetImageFromArray(values.reshape(tuple(reversed(image.GetSize()))))
        out.CopyInformation(image)
        return out

    imageSize, window = model_sizes(model)
    report = {"method": "2D image model", "image_size": list(imageSize), "window": list(window),
              "seconds": round(r.seconds, 2)}
    if progress is not None:
        progress(1.0, "Segmented")
    return Outputs(onImageGrid(r.labels), onImageGrid(r.uncertainty),
                   None if r.attention is None else onImageGrid(r.attention), None, report, [], r.seconds)


def writeOutputs(outputs, folder):
    import SimpleITK as sitk

    os.makedirs(folder, exist_ok=True)
    for key, name in OUTPUT_FILES.items():
        image = getattr(outputs, key)
        if image is not None:
            sitk.WriteImage(image, os.path.join(folder, name), True)
    with open(os.path.join(folder, REPORT_FILE), "w") as f:
        json.dump(outputs.report or {}, f, indent=1)


def readOutputs(folder):
    """(arrays, report) from a finished run's folder: arrays in (K, J, I) order, missing optional ones None."""
    import numpy as np
    import SimpleITK as sitk

    arrays = {}
    for key, name in OUTPUT_FILES.items():
        path = os.path.join(folder, name)
        if key != "labels" and key != "uncertainty" and not os.path.exists(path):
            arrays[key] = None
            continue
        array = sitk.GetArrayFromImage(sitk.ReadImage(path))
        arrays[key] = array.astype(np.float32) if key in ("uncertainty", "attention") else array.astype(np.uint8)
    report = {}
    if os.path.exists(os.path.join(folder, REPORT_FILE)):
        with open(os.path.join(folder, REPORT_FILE)) as f:
            report = json.load(f)
    return arrays, report


NO_GPU_MESSAGE = ("no CUDA GPU is available to Slicer: set Device (under Advanced) to Auto or CPU, or install a "
                  "CUDA build of torch on a machine with an NVIDIA GPU")


def moduleDevice(requested):
    # type: (str) -> str
    """The torch device for the module's Device choice. A missing GPU is worded for that choice: the core's
    message names the command line's --device flag."""
    import torch
    from cdal_core.errors import CDALError
    from cdal_core.inference import resolve_device
    if (requested or "auto").lower() in ("cuda", "gpu") and not torch.cuda.is_available():
        raise CDALError(NO_GPU_MESSAGE)
    return str(resolve_device(requested))


def _emit(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _fail(message):
    _emit({"event": "error", "message": message})
    sys.stderr.write(message + "\n")
    return 2


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--samples", type=int, default=5)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--localise", default="auto", choices=("auto", "on", "off"))
    args = parser.parse_args(argv)

    from cdal_core.errors import CDALError

    try:
        _emit({"event": "progress", "fraction": 0.0, "message": "Loading model"})
        import SimpleITK as sitk
        from cdal_core.model_io import load_model

        device = moduleDevice(args.device)  # probed here, never in the GUI process
        model = load_model(args.model, device=device)
        image = sitk.ReadImage(args.input)
        last = [0.0]

        def progress(fraction, message):
            now = time.time()
            if now - last[0] > 0.2 or fraction >= 1.0:
                last[0] = now
                _emit({"event": "progress", "fraction": 0.05 + 0.9 * float(fraction), "message": str(message)})

        outputs = segmentImage(image, model, samples=args.samples, steps=args.steps, seed=args.seed,
                               device=device, progress=progress, localise=args.localise)
        _emit({"event": "progress", "fraction": 0.97, "message": "Writing results"})
        writeOutputs(outputs, args.output_dir)
        _emit({"event": "done", "seconds": outputs.seconds, "device": device, "notes": outputs.notes})
        return 0
    except CDALError as exc:
        return _fail(str(exc))
    except MemoryError:
        return _fail("out of memory: use an ROI to segment a smaller region, or fewer samples")
    except (RuntimeError, OSError) as exc:
        text = str(exc)
        if "out of memory" in text.lower():
            return _fail("GPU out of memory: choose Device CPU, use an ROI, or fewer samples")
        if "no space" in text.lower() or getattr(exc, "errno", None) == errno.ENOSPC:
            return _fail("the disk is full (%s): free disk space in %s, or point TMPDIR at a disk with room, and "
                         "run again" % (informativeLine(exc), tempfile.gettempdir()))
        _emit({"event": "error", "message": informativeLine(exc)})
        raise


def informativeLine(exc):
    """The line of an exception's text that says what went wrong: ITK's multi-line errors open with a source
    location and end in an "ITK ERROR" line (a failed write: "... No space left on device")."""
    lines = [l.strip() for l in str(exc).splitlines() if l.strip()]
    for words in (("No space", "Permission denied"), ("ITK ERROR",)):  # the cause first, then ITK's summary
        for line in lines:
            if any(w in line for w in words):
                return line
    return lines[-1] if lines else exc.__class__.__name__


if __name__ == "__main__":
    sys.exit(main())
