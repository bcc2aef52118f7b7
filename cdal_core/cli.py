"""The ``cdal`` command line: train, finetune, predict, evaluate, info, demo.

Every user error prints one line ``cdal: error: <problem>: <fix>`` on stderr and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from .errors import CDALError

OUTPUT_KINDS = ("seg", "uncertainty", "attention")


def _add_common_sampling(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=int, default=None, help="denoising steps T (default: the model card's)")
    p.add_argument("--samples", type=int, default=5, help="ensemble size K (default 5)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"),
                   help="network arithmetic: auto = bf16 where the CPU/GPU has it natively, else fp32")
    p.add_argument("--full-sampling", action="store_true",
                   help="run every denoising step on every slice (default: slices that are surely background "
                        "after the first step stop there)")
    p.add_argument("--symmetries", default="auto", choices=("auto", "on", "off"),
                   help="2D images: spread the samples over flips and transposes of the image (on for tissue, "
                        "whose orientation carries no meaning); volumes: part of the samples see the scan's "
                        "left-right mirror (for models trained on mirrored slices); auto: as the model card says")
    # the choices are sampler.STEP_POOLING, written out: the CLI starts without importing torch
    p.add_argument("--step-pooling", default="auto", choices=("auto", "last", "mean", "linear"),
                   help="what each sample keeps of its denoising steps: last = the last step's prediction "
                        "(the paper's Algorithm 2), mean = the mean of every step's prediction (free: they are "
                        "computed anyway), linear = the same weighted towards the first step; auto: as the model "
                        "card says")


def ensure_writable_folder(folder: Path, option: str) -> None:
    """Create ``folder`` if needed and write a probe file there: an output folder that cannot be written is
    refused before any work, not after minutes of segmenting or training."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise CDALError(f"{folder}: exists and is not a folder: choose another {option}")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".cdal-write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise CDALError(f"{folder}: cannot write there ({exc.strerror or exc}): choose another {option}") from None


def keep_outputs_apart(source: Path, out_dir: Path, inputs: Iterable[Path], outputs: Iterable[Path]) -> None:
    """Outputs never replace an input, and never go into the input folder itself: a later run over that folder
    would read them as scans (``x_seg_seg.nii.gz``), and ``--overwrite`` would replace a user's own ``x_seg``."""
    source, out_dir, inputs = Path(source), Path(out_dir), [Path(p) for p in inputs]
    # a folder run: the folder given, and the folders its inputs were read from (a 2D dataset's images/); a single
    # file may have its outputs beside it
    folders = [source] + [p if p.is_dir() else p.parent for p in inputs] if source.is_dir() else []  # DICOM: series
    if out_dir.exists() and out_dir.resolve() in {f.resolve() for f in folders}:
        held = source if out_dir.resolve() == source.resolve() else out_dir
        raise CDALError(f"{out_dir}: --output is the folder the inputs are read from, so the next run over it would "
                        f"take these outputs for inputs: choose another folder, e.g. {held.name}-cdal beside it")
    taken = {p.resolve() for p in inputs}
    for path in outputs:
        if Path(path).resolve() in taken:
            raise CDALError(f"{path}: is an input and would be replaced by an output: choose another --output")


def keep_report_apart(report: Optional[str], data: Path, cases: Sequence, case_list: Optional[str]) -> None:
    """``evaluate --json`` never replaces what it reads, ``--overwrite`` or not: a case's image or label, the
    dataset's dataset.json, or the ``--cases`` list."""
    if not report:
        return
    reads = [Path(data) / "dataset.json"] + [Path(p) for c in cases for p in (c.image, c.label) if p is not None]
    if case_list:
        reads.append(Path(case_list))
    target = Path(report).resolve()
    for path in reads:
        if path.exists() and path.resolve() == target:
            raise CDALError(f"{report}: --json would replace {path}, which this evaluation reads: "
                            "write the report elsewhere, e.g. report.json beside the data folder")


def remove_empty_folders(folders: Sequence[Path]) -> None:
    """Remove each of ``folders`` (deepest first) that is still empty; stop at the first that is not."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


def check_output_file(path: Path, option: str, overwrite: bool) -> None:
    """A file the command will write: not a folder, not an existing file unless ``overwrite``, and its folder
    writable (created if needed), all checked before any work."""
    path = Path(path)
    if path.is_dir():
        raise CDALError(f"{path}: is a folder: give {option} a file name, e.g. {path / 'report.json'}")
    if path.exists() and not overwrite:
        raise CDALError(f"{path}: already exists: pass --overwrite to replace it, or choose another {option}")
    ensure_writable_folder(path.parent, option)


def step_pooling_choice(args) -> Optional[str]:
    """``--step-pooling`` as the segment functions take it (None = the card's default)."""
    choice = getattr(args, "step_pooling", "auto")
    return None if choice == "auto" else choice


def symmetries_choice(args) -> Optional[bool]:
    """``--symmetries`` as segment_image_2d and segment_image (``mirror``) take it (None = the card's default)."""
    return {"auto": None, "on": True, "off": False}[getattr(args, "symmetries", "auto")]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cdal", description="cDAL segmentation with uncertainty")
    sub = parser.add_subparsers(dest="command", required=True)

    for name, help_text in (("train", "train a model on an MSD-style folder (re-run to resume)"),
                            ("finetune", "train starting from an existing model (an ensemble: from one of its generators)")):
        p = sub.add_parser(name, help=help_text)
        if name == "finetune":
            p.add_argument("--model", required=True, help="model folder or shipped model name")
            p.add_argument("--generator", type=int, default=1,
                           help="which generator of an ensemble to start from (default 1, the primary)")
        p.add_argument("--data", required=True, help="MSD folder (dataset.json, imagesTr/, labelsTr/) or images/+masks/")
        p.add_argument("--out", required=True, help="run folder: checkpoints, log.jsonl and model/")
        p.add_argument("--config", default=None, help="JSON training config")
        p.add_argument("--max-steps", type=int, default=None)
        p.add_argument("--max-minutes", type=float, default=None)
        p.add_argument("--device", default="auto")
        p.add_argument("--json-progress", action="store_true", help="print progress as JSON lines (for GUIs)")

    p = sub.add_parser("predict", help="segment volumes or 2D images: writes <stem>_seg/_uncertainty/_attention "
                                       "(.nii.gz for volumes, .png/.tif for images), and <stem>_report.json for volumes")
    p.add_argument("--model", required=True, help="a shipped model (hippocampus, cxr or monuseg) or a model "
                                                  "folder")
    p.add_argument("--input", required=True,
                   help="a volume (.nii.gz, .nii, .nrrd, .mha, .mhd), a folder of them, a folder holding one DICOM "
                        "series, or a folder of such series folders; for a 2D model, an image (.png, .jpg, .tif, "
                        ".bmp; grey or RGB), a folder of them, or a folder with images/")
    p.add_argument("--output", required=True, help="output folder")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument("--roi", default=None, metavar="R1,A1,S1,R2,A2,S2",
                   help="segment only this box: two opposite corners in RAS mm (as Slicer shows them)")
    p.add_argument("--localise", default="auto", choices=("auto", "on", "off"),
                   help="auto (default): on a whole brain or head, find both hippocampi first; "
                        "off: segment the whole input as it is")
    p.add_argument("--allow-thick-slices", action="store_true",
                   help="segment scans with slices thicker than 2 mm anyway (coarse results)")
    p.add_argument("--no-attention", action="store_true",
                   help="skip the discriminator's attention map (no _attention output): about a tenth less "
                        "work per input; the labels and the uncertainty are the same")
    _add_common_sampling(p)

    p = sub.add_parser("evaluate", help="Dice/IoU/precision/recall/HD95 and uncertainty quality on labelled data")
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True, help="MSD-style folder with labels (dataset.json, imagesTr/, "
                                                 "labelsTr/), or for a 2D model images/ + masks/")
    p.add_argument("--cases", default=None, help="text file of case names to evaluate (default: all)")
    p.add_argument("--json", default=None, help="write the report here")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --json report")
    _add_common_sampling(p)

    p = sub.add_parser("crop", help="cut a labelled MSD folder of whole heads into the boxes a model segments "
                                    "(one per hippocampus): training data for train / finetune")
    p.add_argument("--model", required=True, help="the model whose boxes to cut (e.g. hippocampus)")
    p.add_argument("--data", required=True, help="MSD folder (dataset.json, imagesTr/, labelsTr/) of whole heads")
    p.add_argument("--out", required=True, help="a new MSD folder for the crops")

    p = sub.add_parser("info", help="print a model card")
    p.add_argument("model")

    p = sub.add_parser("demo", help="segment the demo MRI (both hippocampi of the ICBM152 template)")
    p.add_argument("--output", default="cdal-demo", help="output folder (default ./cdal-demo)")
    p.add_argument("--overwrite", action="store_true", help="replace the outputs of an earlier demo run there")
    p.add_argument("--device", default="auto")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="monai")
    try:
        return COMMANDS[args.command](args) or 0
    except CDALError as exc:
        print(f"cdal: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a disk that filled up, or a folder that stopped being writable, after the checks
        print(f"cdal: error: {os_error_message(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if args.command in ("train", "finetune"):
            print("cdal: interrupted (re-run the same command to resume from the run's last checkpoint)",
                  file=sys.stderr)
        else:
            print("cdal: interrupted (outputs are written whole or not at all: re-run to finish)", file=sys.stderr)
        return 130


def os_error_message(exc: OSError) -> str:
    """One line for a failed read or write: which file, what the system said, what to do."""
    import errno
    where = f"{exc.filename}: " if exc.filename else ""
    if exc.errno == errno.ENOSPC:
        fix = "free some space on that disk, or write to another folder, then re-run"
    elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        fix = "choose a folder you can write to, then re-run"
    else:
        fix = "check the file and the disk, then re-run"
    return f"{where}{exc.strerror or exc}: {fix}"


def cmd_train(args) -> int:
    from .config import TrainConfig
    from .trainer import train
    init = getattr(args, "model", None)
    if init is not None and args.config is None:
        from .model_io import read_card, resolve_model
        config = TrainConfig.for_finetuning(read_card(resolve_model(init)))
    else:
        config = TrainConfig.load(args.config)
    out = Path(args.out)
    created = [f for f in (out, *out.parents) if not f.exists()]  # the folders this command makes, deepest first
    ensure_writable_folder(out, "--out")
    try:
        model_dir = train(args.data, args.out, config, max_steps=args.max_steps, max_minutes=args.max_minutes,
                          device=args.device, init_model=init, json_progress=args.json_progress,
                          init_generator=getattr(args, "generator", 1) - 1)
    except BaseException:
        remove_empty_folders(created)  # a refused run leaves no empty folders behind
        raise
    if not args.json_progress:
        print(f"model: {model_dir}")
    return 0


def _is_2d_request(path: str) -> bool:
    """PNG/JPEG/TIFF images, or a folder of them (or images/ + masks/), go to the 2D path."""
    from .data import PNG_SUFFIXES
    p = Path(path)
    if p.is_file():
        return p.name.lower().endswith(PNG_SUFFIXES)
    if p.is_dir():
        if (p / "images").is_dir():
            return True
        return any(q.name.lower().endswith(PNG_SUFFIXES) for q in p.iterdir() if q.is_file())
    return False


def cmd_predict(args) -> int:
    if _is_2d_request(args.input):
        from .predict2d import predict_images
        return predict_images(args)
    from .inference import check_takes_volumes, mirror_axis_for, resolve_device
    from .inputs import list_inputs
    from .model_io import load_model
    from .scan import parse_roi

    device = resolve_device(args.device)
    roi = parse_roi(args.roi) if args.roi else None
    inputs = list_inputs(Path(args.input))
    out_dir = Path(args.output)
    if out_dir.exists() and not out_dir.is_dir():
        raise CDALError(f"{out_dir}: exists and is not a folder: choose another --output")
    stems = [item.stem for item in inputs]
    if len(set(stems)) != len(stems):
        twice = sorted({s for s in stems if stems.count(s) > 1})[0]
        raise CDALError(f"two inputs would both write {twice}_seg.nii.gz: rename one, or run them separately")
    planned = {item.stem: {**{k: out_dir / f"{item.stem}_{k}.nii.gz" for k in OUTPUT_KINDS},
                           "report": out_dir / f"{item.stem}_report.json"} for item in inputs}
    outputs = [f for files in planned.values() for f in files.values()]
    keep_outputs_apart(Path(args.input), out_dir, [item.path for item in inputs], outputs)
    existing = [str(f) for f in outputs if f.exists()]
    if existing and not args.overwrite:
        raise CDALError(f"{existing[0]} already exists ({len(existing)} outputs would be replaced): "
                        "pass --overwrite or choose another --output")
    model = load_model(args.model, device=str(device))
    mirror_axis_for(model, symmetries_choice(args))  # refuses a mirror the model cannot take, before any work
    check_takes_volumes(model, str(inputs[0].path) if len(inputs) == 1 else f"{args.input} (volumes)")
    ensure_writable_folder(out_dir, "--output")
    run_each(inputs, lambda item, bar: _predict_one(item, model, planned[item.stem], roi, str(device), args,
                                                   progress_bar=bar), device, item_name=lambda item: item.stem)
    return 0


def run_each(inputs: Sequence, segment_one: Callable, device, item_name: Callable = str) -> None:
    """``segment_one(item, progress_bar) -> message`` over ``inputs``, a few at a time on the CPU
    (``inference.parallel_map``), each message printed in input order. In a folder, one bad input gets its own
    error line and costs the others nothing; the run then ends with one error naming the failed inputs."""
    from tqdm import tqdm
    from .inference import parallel_map
    failed = []  # in input order

    def one(item, progress_bar: bool) -> Tuple[bool, str]:
        """(segmented?, what to print)."""
        try:
            return True, segment_one(item, progress_bar)
        except CDALError as exc:
            if len(inputs) == 1:
                raise
            return False, f"cdal: error: {exc}"

    bar = tqdm(total=len(inputs), desc="inputs", unit="file", disable=len(inputs) < 2 or not on_terminal())
    with parallel_map(len(inputs), device) as (workers, mapped):
        for item, (ok, message) in zip(inputs, mapped(lambda item: one(item, workers == 1), inputs)):
            if not ok:
                failed.append(item_name(item))
            print(message, file=sys.stdout if ok else sys.stderr, flush=True)
            bar.update(1)
    bar.close()
    if failed:
        raise CDALError(f"{len(failed)} of {len(inputs)} inputs were not segmented ({', '.join(failed)}; reasons "
                        "above): fix or remove them and run again")


def _predict_one(item, model, files, roi, device: str, args, progress_bar: bool = True) -> str:
    """Read, check, segment and write one input (see cmd_predict); returns what to print about it. Warnings go
    to stderr at once."""
    from tqdm import tqdm
    from .data import check_volume
    from .inference import check_takes_volumes
    from .inputs import read_scan
    from .localise import expects_thin_slices
    from .model_io import json_bytes
    from .scan import format_report, segment_scan

    scan = read_scan(item, allow_thick_slices=args.allow_thick_slices,
                     thin_slices_expected=expects_thin_slices(model.card))
    for warning in scan.warnings:
        print(f"cdal: warning: {warning}", file=sys.stderr)
    # segment_scan checks again; these run before the progress bar opens, so a bad scan gets one clean line
    check_takes_volumes(model, str(item.path))
    check_volume(scan.image, model.config.image_channels, name=str(item.path))
    with tqdm(total=100, desc=item.stem, unit="%", leave=False, disable=not progress_bar or not on_terminal()) as bar:
        def progress(fraction, message):
            bar.n = int(100 * fraction)
            bar.set_postfix_str(message[:40], refresh=True)
        result = segment_scan(scan.image, model, roi=roi, localise=args.localise, steps=args.steps,
                              samples=args.samples, seed=args.seed, device=device, progress=progress,
                              precision=args.precision, early_exit=not args.full_sampling,
                              mirror=symmetries_choice(args), step_pooling=step_pooling_choice(args),
                              with_attention=not args.no_attention)
    report = {"input": str(item.path), "model": str(model.path), "warnings": scan.warnings,
              "attention_map": result.attention is not None, **result.report}
    images = [(result.labels, files["seg"]), (result.uncertainty, files["uncertainty"])]
    if result.attention is not None:
        images.append((result.attention, files["attention"]))
    write_outputs_together(images, {files["report"]: json_bytes(report, indent=1)})
    written = [path for _, path in images] + [files["report"]]
    stale = drop_stale(files.values(), written)
    notes = [f"{', '.join(stale)} of an earlier run removed"] if stale else []
    notes += result.report["notes"]  # review notes: after the table
    notes_text = f" ({'; '.join(notes)})" if notes else ""
    return (f"{item.path.name}: {', '.join(p.name for p in written)} in {result.seconds:.2f} s{notes_text}\n"
            f"{format_report(result.report)}")


def drop_stale(planned: Iterable[Path], written: Sequence[Path]) -> List[str]:
    """Remove the ``planned`` outputs this run did not write (e.g. the attention map under ``--no-attention``) that
    an earlier run left in the folder, which ``--overwrite`` allowed to replace: they would no longer match the new
    labels. Returns the names removed."""
    stale = [path for path in planned if path not in written and path.exists()]
    for path in stale:
        path.unlink()
    return [path.name for path in stale]


def on_terminal() -> bool:
    """Progress bars only where someone watches them: in a log file (``> run.log``, CI) a redrawn bar leaves
    hundreds of carriage-return frames, so there each command prints a few plain lines instead, or none."""
    return sys.stderr.isatty()


def write_outputs_together(images, texts) -> None:
    """Write one input's outputs as a set: every file under a temporary name first, then all renamed. An
    interrupt or a full disk while writing leaves none of them (and the previous set, if any, untouched), so a
    re-run never meets half a set."""
    import SimpleITK as sitk
    from .model_io import make_readable
    staged = []  # (temporary, final)
    try:
        for content, path in [*images, *((text, path) for path, text in texts.items())]:
            path = Path(path)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix="-" + path.name)
            os.close(fd)
            staged.append((tmp, path))
            if isinstance(content, bytes):
                Path(tmp).write_bytes(content)
            else:
                sitk.WriteImage(content, tmp, True)
                check_written_nifti(Path(tmp), path, content)
            make_readable(tmp)
        for tmp, path in staged:
            os.replace(tmp, path)
    except BaseException:
        for tmp, _ in staged:
            Path(tmp).unlink(missing_ok=True)
        raise


def check_written_nifti(written: Path, path: Path, image) -> None:
    """ITK's NIfTI writer only prints a warning when the disk fills up (NRRD, MHA, PNG raise): check the file
    (the whole compressed stream of a .nii.gz, the size of a .nii) before it is renamed into place."""
    import errno
    import SimpleITK as sitk
    from .inputs import GZIP_ERRORS, read_whole_gzip
    name = path.name.lower()
    try:
        if name.endswith(".nii.gz"):
            read_whole_gzip(written)
        elif name.endswith(".nii"):
            needed = 352 + sitk.GetArrayViewFromImage(image).nbytes  # header + voxels
            if written.stat().st_size < needed:
                raise EOFError(f"{written.stat().st_size} of {needed} bytes")
    except GZIP_ERRORS as exc:
        raise OSError(errno.ENOSPC, f"written incompletely ({exc}), is the disk full?", str(path)) from None


def write_image_atomic(image, path: Path) -> None:
    """Write next to the target under a temporary name, then rename: readers never see a partial file."""
    write_outputs_together([(image, path)], {})


def cmd_evaluate(args) -> int:
    if args.json:
        check_output_file(Path(args.json), "--json", args.overwrite)
    if _is_2d_request(args.data) and not (Path(args.data) / "imagesTr").is_dir():
        from .predict2d import evaluate_images
        return evaluate_images(args)
    from tqdm import tqdm
    from .data import read_case_list, read_msd_cases, select_cases
    from .evaluation import evaluate_cases, format_table
    from .inference import mirror_axis_for, resolve_device
    from .model_io import load_model

    device = resolve_device(args.device)
    model = load_model(args.model, device=str(device), with_discriminator=False)
    mirror_axis_for(model, symmetries_choice(args))  # refuses a mirror the model cannot take, before any work
    cases, _ = read_msd_cases(args.data)
    if args.cases:
        cases = select_cases(cases, read_case_list(args.cases), args.cases, args.data)
    keep_report_apart(args.json, Path(args.data), cases, args.cases)
    progress = {"bar": None, "done": 0}  # the bar opens with the first finished volume: a refusal before any
    # work stays one clean line

    def on_volume(i, n, name):
        if progress["bar"] is None:
            progress["bar"] = tqdm(total=n, desc="evaluating", unit="vol", disable=not on_terminal())
        progress["bar"].update(1)
        progress["done"] += 1
        done = progress["done"]
        if not on_terminal() and done * 10 // n > (done - 1) * 10 // n:  # in a log: a line every tenth
            print(f"evaluating: {done}/{n} volumes", file=sys.stderr, flush=True)
    report = evaluate_cases(model, cases, steps=args.steps, samples=args.samples, seed=args.seed,
                            device=str(device), on_volume=on_volume,
                            precision=args.precision, early_exit=not args.full_sampling, parallel=True,
                            mirror=symmetries_choice(args), step_pooling=step_pooling_choice(args))
    if progress["bar"] is not None:
        progress["bar"].close()
    return finish_evaluation(report, model, args, format_table)


def finish_evaluation(report, model, args, table) -> int:
    """Shared end of ``cdal evaluate`` (3D and 2D): settings into the report, the table, ``--json``."""
    from .model_io import atomic_write_bytes, json_bytes
    from .evaluation import cases_trained_on
    report["model"] = str(model.path)
    report["steps"], report["samples"] = args.steps or model.default_steps, args.samples
    names = [row["case"] for row in report.get("per_volume") or report.get("per_image") or []]
    seen, folder = cases_trained_on(model.card, args.data, names)
    if seen:
        report["trained_on_cases"] = seen
    print(table(report))
    if seen:
        print(f"note: the model trained on {len(seen)} of these {len(names)} cases ({folder}, outside the held-out "
              "lists in its card): if this is that data, their scores are not held-out", file=sys.stderr)
    if args.json:
        atomic_write_bytes(Path(args.json), json_bytes(report))
        print(f"report: {args.json}")
    return 0


def cmd_crop(args) -> int:
    """``cdal crop``: each labelled scan cut as inference cuts it (``crop_dataset``)."""
    from .localise import region_specs
    from .model_io import read_card, resolve_model
    card = read_card(resolve_model(args.model))
    if not region_specs(card):
        raise CDALError(f"{args.model}: names no template boxes to cut (only the hippocampus models do): "
                        "crop the scans around the structure yourself")
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise CDALError(f"{out}: exists and is not empty: choose a new --out (a folder without dataset.json is "
                        "what an interrupted cdal crop leaves: delete it and run again)")
    count, cases = crop_dataset(
        Path(args.data), out, card,
        on_case=lambda i, n, name, sides: print(f"{name}: " + (", ".join(sides) or "nothing kept")),
        on_warning=lambda note: print(f"cdal: warning: {note}", file=sys.stderr))
    print(f"{count} crops from {cases} scans in {out}: train on it with --data {out}")
    return 0


def crop_dataset(source: Path, out: Path, card: Dict,
                 on_case: Optional[Callable[[int, int, str, List[str]], None]] = None,
                 on_warning: Optional[Callable[[str], None]] = None) -> Tuple[int, int]:
    """A labelled MSD folder cut as inference cuts it (``localise.training_crops``), written as a new MSD folder
    ``out`` with ``<case>_left`` / ``<case>_right`` and the source's dataset.json; crop-sized scans are copied as
    they are. One case's files are written together, the dataset.json last. ``on_case(i, n, name, sides)`` after
    each case (sides: "left", "right" or "whole (crop-sized)"), ``on_warning(text)`` for what a case leaves out.
    Returns (crops written, cases read). Used by ``cdal crop`` and by Slicer's fine-tuning child."""
    from .data import read_msd_cases
    from .model_io import atomic_write_bytes
    cases, _ = read_msd_cases(source)
    for folder in ("imagesTr", "labelsTr"):
        ensure_writable_folder(out / folder, "--out")
    training = []
    try:
        _crop_cases(cases, out, card, training, on_case, on_warning)
    except BaseException:  # a refused case: remove this run's crops, so that the corrected re-run can use ``out``
        for entry in training:
            for key in ("image", "label"):
                (out / entry[key]).unlink(missing_ok=True)
        _remove_if_empty(out)
        raise
    if not training:  # the warnings said why per scan; without this the trainer would only say "no cases"
        _remove_if_empty(out)
        raise CDALError(f"{source}: none of its {len(cases)} scans has labels inside the boxes the model segments, "
                        "so there is nothing to train on: label the hippocampi (anterior and posterior) first")
    meta = json.loads((source / "dataset.json").read_text()) if (source / "dataset.json").exists() else {
        "name": source.name, "labels": {str(c["index"]): c["name"] for c in card["classes"]}}
    meta.update(training=training, numTraining=len(training), test=[], numTest=0)
    atomic_write_bytes(out / "dataset.json", (json.dumps(meta, indent=1) + "\n").encode())
    return len(training), len(cases)


def _remove_if_empty(out: Path) -> None:
    for folder in (out / "imagesTr", out / "labelsTr", out):  # empty: a corrected re-run may use them
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()


def _crop_cases(cases, out: Path, card: Dict, training: List[Dict], on_case, on_warning) -> None:
    """``crop_dataset``'s loop: each case's crops written together, appended to ``training`` as they are."""
    import numpy as np
    import SimpleITK as sitk
    from .data import check_volume, read_image, read_label_map
    from .localise import training_crops
    for number, case in enumerate(cases):
        image = read_image(case.image)
        check_volume(image, int(card["input"].get("image_channels", 1)), name=str(case.image))
        labels = sitk.GetImageFromArray(read_label_map(case.label, image, len(card["classes"])).astype(np.uint8))
        labels.CopyInformation(image)
        crops, notes = training_crops(image, labels, card, name=case.name)
        for note in notes:
            if on_warning is not None:
                on_warning(note)
        for crop in crops:
            name = case.name if crop.side is None else f"{case.name}_{crop.side}"
            files = {"image": out / "imagesTr" / f"{name}.nii.gz", "label": out / "labelsTr" / f"{name}.nii.gz"}
            write_outputs_together([(crop.image, files["image"]), (crop.labels, files["label"])], {})
            training.append({"image": f"./imagesTr/{name}.nii.gz", "label": f"./labelsTr/{name}.nii.gz"})
        if on_case is not None:
            on_case(number + 1, len(cases), case.name, [c.side or "whole (crop-sized)" for c in crops])


def cmd_info(args) -> int:
    from .model_io import read_card, resolve_model
    print(json.dumps(read_card(resolve_model(args.model)), indent=2))
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo
    return run_demo(Path(args.output), device=args.device, overwrite=args.overwrite)


COMMANDS = {"train": cmd_train, "finetune": cmd_train, "predict": cmd_predict, "evaluate": cmd_evaluate,
            "crop": cmd_crop, "info": cmd_info, "demo": cmd_demo}


if __name__ == "__main__":
    sys.exit(main())
