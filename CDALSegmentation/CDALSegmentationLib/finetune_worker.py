"""Child process for fine-tuning: probes the device here (never in Slicer's GUI process, where importing torch
freezes the GUI for seconds), reports it as ``{"event": "device", "device": ..., "warning": ...}``, then runs
``cdal finetune ... --json-progress`` in this same process.

With ``--cut-heads FOLDER`` it first cuts the labelled whole heads exported there into the boxes inference
segments (``cdal_core.cli.crop_dataset``: a registration of some seconds per head, which would freeze the GUI)
and writes them to the ``--data`` folder, reporting ``{"event": "cropping", ...}`` per head and its warnings as
``{"event": "note", ...}``.

Run as ``python -m CDALSegmentationLib.finetune_worker --device auto [--cut-heads FOLDER] <cdal finetune arguments>``.
"""
import json
import sys

CPU_WARNING = ("No CUDA GPU in use: fine-tuning runs on the CPU and will be slow; keep the number of steps small "
               "or set a time limit")


def chooseDevice(requested, cudaAvailable):
    """(device, warning or None, error or None) for a requested 'auto' / 'cpu' / 'cuda'."""
    requested = (requested or "auto").lower()
    if requested in ("cuda", "gpu"):
        if not cudaAvailable:
            return None, None, "no CUDA GPU is available for fine-tuning: choose device CPU (slow) or auto"
        return "cuda", None, None
    if requested == "cpu" or not cudaAvailable:
        return "cpu", CPU_WARNING, None
    return "cuda", None, None


def _emit(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _takeOption(argv, name, default=None):
    """The value of ``name`` in ``argv``, removed from it (both the option and its value)."""
    if name not in argv:
        return default
    at = argv.index(name)
    value = argv[at + 1]
    del argv[at:at + 2]
    return value


def cutHeads(source, argv):
    """Cut the heads in ``source`` into the ``--data`` folder of the ``cdal finetune`` arguments ``argv``, with
    the boxes of its ``--model``. Returns an error message, or None."""
    from pathlib import Path

    from cdal_core.cli import crop_dataset
    from cdal_core.errors import CDALError
    from cdal_core.model_io import read_card, resolve_model

    def onCase(number, cases, name, sides):
        _emit({"event": "cropping", "case": number, "cases": cases, "name": name, "sides": sides})

    try:
        card = read_card(resolve_model(argv[argv.index("--model") + 1]))
        crop_dataset(Path(source), Path(argv[argv.index("--data") + 1]), card, on_case=onCase,
                     on_warning=lambda note: _emit({"event": "note", "message": note}))
    except CDALError as exc:  # the export folder is a temporary one: name what the user chose instead
        return str(exc).replace(str(source), "the volumes chosen for fine-tuning")
    return None


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    requested = _takeOption(argv, "--device", "auto")
    heads = _takeOption(argv, "--cut-heads")
    import torch

    device, warning, error = chooseDevice(requested, bool(torch.cuda.is_available()))
    if error:
        _emit({"event": "error", "message": error})
        return 2
    _emit({"event": "device", "device": device, "warning": warning})
    if heads:
        error = cutHeads(heads, argv)
        if error:
            _emit({"event": "error", "message": error})
            return 2
    from cdal_core.cli import main as cdalMain

    return cdalMain(["finetune"] + argv + ["--device", device])


if __name__ == "__main__":
    sys.exit(main())
