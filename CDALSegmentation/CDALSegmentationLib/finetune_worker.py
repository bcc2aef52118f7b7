"""Child process for fine-tuning: probes the device here (never in Slicer's GUI process, where importing torch
freezes the GUI for seconds), reports it as ``{"event": "device", "device": ..., "warning": ...}``, then runs
``cdal finetune ... --json-progress`` in this same process.

Run as ``python -m CDALSegmentationLib.finetune_worker --device auto <cdal finetune arguments>``.
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


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    requested = "auto"
    if "--device" in argv:
        at = argv.index("--device")
        requested = argv[at + 1]
        del argv[at:at + 2]
    import torch

    device, warning, error = chooseDevice(requested, bool(torch.cuda.is_available()))
    if error:
        _emit({"event": "error", "message": error})
        return 2
    _emit({"event": "device", "device": device, "warning": warning})
    from cdal_core.cli import main as cdalMain

    return cdalMain(["finetune"] + argv + ["--device", device])


if __name__ == "__main__":
    sys.exit(main())
