"""The command-line contract, run as a user runs it (a subprocess), bad inputs included."""

import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from cdal_core.synthetic import make_volume, to_image


def cdal(*args, check=True):
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    proc = subprocess.run([sys.executable, "-m", "cdal_core.cli", *map(str, args)], capture_output=True,
                          text=True, encoding="utf-8", errors="replace", env=env, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"cdal {args} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return proc


def assert_clean_error(proc, *words):
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("cdal: error:"), proc.stderr
    assert "Traceback" not in proc.stderr
    for w in words:
        assert w.lower() in lines[0].lower(), lines[0]


@pytest.fixture(scope="module")
def volume_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("in") / "scan.nii.gz"
    img, _ = make_volume(np.random.default_rng(7))
    image = to_image(img.astype(np.float32))
    image.SetOrigin((10.0, -5.0, 3.0))
    sitk.WriteImage(image, str(path))
    return path


def test_predict_writes_three_outputs_in_input_geometry(tiny_model, volume_file, tmp_path):
    out = tmp_path / "out"
    proc = cdal("predict", "--model", tiny_model, "--input", volume_file, "--output", out, "--samples", 3,
                "--device", "cpu")
    assert "scan_seg.nii.gz" in proc.stdout
    ref = nib.load(volume_file)
    for kind, kinds_dtype in (("seg", np.uint8), ("uncertainty", np.float32), ("attention", np.float32)):
        img = nib.load(out / f"scan_{kind}.nii.gz")
        assert img.shape == ref.shape and np.allclose(img.affine, ref.affine)
        assert img.get_data_dtype() == kinds_dtype
    seg = np.asarray(nib.load(out / "scan_seg.nii.gz").dataobj)
    assert set(np.unique(seg)) <= {0, 1, 2}
    assert not list(out.glob(".tmp-*"))  # atomic writes leave no partial files


def test_predict_is_seeded(tiny_model, volume_file, tmp_path):
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        cdal("predict", "--model", tiny_model, "--input", volume_file, "--output", tmp_path / name,
             "--samples", 2, "--seed", seed, "--device", "cpu")
    read = lambda n: np.asarray(nib.load(tmp_path / n / "scan_uncertainty.nii.gz").dataobj)
    assert np.array_equal(read("a"), read("b"))
    assert not np.array_equal(read("a"), read("c"))


def test_a_folder_segmented_volumes_in_parallel_matches_one_at_a_time(tiny_model, tmp_path):
    """Several volumes at once (one thread each) write what one at a time writes; a bad scan in the folder
    gets its own error line and costs the others nothing."""
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(3):
        img, _ = make_volume(np.random.default_rng(20 + i))
        sitk.WriteImage(to_image(img.astype(np.float32)), str(folder / f"scan{i}.nii.gz"))
    sitk.WriteImage(to_image(np.zeros((20, 24, 20), np.float32)), str(folder / "blank.nii.gz"))  # constant
    outputs = {}
    for threads in ("1", "2"):
        out = tmp_path / f"out{threads}"
        proc = subprocess.run([sys.executable, "-m", "cdal_core.cli", "predict", "--model", str(tiny_model),
                               "--input", str(folder), "--output", str(out), "--samples", "2", "--device", "cpu"],
                              capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=600,
                              env={**os.environ, "CDAL_THREADS": threads})
        assert proc.returncode == 2 and "1 of 4 inputs were not segmented (blank" in proc.stderr, proc.stderr
        assert "%|" not in proc.stderr  # a pipe, as a log file: no progress-bar frames
        assert [ln.split(":")[0] for ln in proc.stdout.splitlines() if "_seg.nii.gz" in ln] == \
            [f"scan{i}.nii.gz" for i in range(3)]  # reported in input order
        outputs[threads] = {f.name: sitk.GetArrayFromImage(sitk.ReadImage(str(f))) for f in out.glob("scan*.nii.gz")}
    assert len(outputs["1"]) == 9 and outputs["1"].keys() == outputs["2"].keys()
    for name, array in outputs["1"].items():
        assert np.array_equal(array, outputs["2"][name]), name


def test_parallel_runs_follow_the_free_cores(monkeypatch):
    import torch
    import cdal_core.inference as inf
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    before = torch.get_num_threads()

    def plan(runs, device):  # (workers, torch threads while they run)
        with inf.parallel_runs(runs, device) as workers:
            return workers, torch.get_num_threads(), inf.ADAPT_THREADS

    monkeypatch.setenv("CDAL_THREADS", "8")
    assert plan(20, cpu) == (inf.MAX_PARALLEL_VOLUMES, 2, False) and plan(3, cpu) == (3, 2, False)
    assert plan(1, cpu) == (1, before, True) and plan(20, gpu) == (1, before, True)
    monkeypatch.setenv("CDAL_THREADS", "1")
    assert plan(20, cpu) == (1, before, True)
    monkeypatch.setenv("CDAL_THREADS", "4")
    monkeypatch.setenv("CDAL_PARALLEL_VOLUMES", "2")
    assert plan(20, cpu) == (2, 2, False)
    with inf.parallel_runs(2, cpu):
        assert plan(2, cpu) == (1, 2, False)  # nested: the outer split stands
    assert torch.get_num_threads() == before and inf.ADAPT_THREADS
    import threading
    here = threading.current_thread()
    for threads, elsewhere in (("1", False), ("2", True)):  # one at a time: on the caller's own thread
        monkeypatch.setenv("CDAL_THREADS", threads)
        with inf.parallel_map(3, cpu) as (workers, mapped):
            ran_on = list(mapped(lambda i: threading.current_thread(), range(3)))
        assert workers == int(threads) and any(t is not here for t in ran_on) == elsewhere


def test_predict_never_overwrites_silently(tiny_model, volume_file, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "scan_seg.nii.gz").write_bytes(b"precious")
    assert_clean_error(cdal("predict", "--model", tiny_model, "--input", volume_file, "--output", out,
                            check=False), "already exists", "--overwrite")
    assert (out / "scan_seg.nii.gz").read_bytes() == b"precious"
    cdal("predict", "--model", tiny_model, "--input", volume_file, "--output", out, "--overwrite",
         "--samples", 1)
    assert (out / "scan_seg.nii.gz").read_bytes() != b"precious"


def test_no_attention_leaves_the_map_out_and_changes_nothing_else(tiny_model, volume_file, tmp_path):
    """--no-attention skips the discriminator pass: the same labels and uncertainty (D draws no noise), no
    _attention file, and one left in the folder by an earlier run goes with --overwrite (it would no longer
    match), said in the output line."""
    out = tmp_path / "out"
    cdal("predict", "--model", tiny_model, "--input", volume_file, "--output", out, "--samples", 2, "--seed", 3)
    read = lambda kind: np.asarray(nib.load(out / f"scan_{kind}.nii.gz").dataobj)  # noqa: E731
    before = read("seg"), read("uncertainty")
    assert (out / "scan_attention.nii.gz").exists()
    assert json.loads((out / "scan_report.json").read_text())["attention_map"] is True
    proc = cdal("predict", "--model", tiny_model, "--input", volume_file, "--output", out, "--samples", 2,
                "--seed", 3, "--no-attention", "--overwrite")
    assert not (out / "scan_attention.nii.gz").exists()
    assert "scan_attention.nii.gz of an earlier run removed" in proc.stdout
    assert "scan_seg.nii.gz, scan_uncertainty.nii.gz, scan_report.json" in proc.stdout
    assert np.array_equal(read("seg"), before[0]) and np.array_equal(read("uncertainty"), before[1])
    assert json.loads((out / "scan_report.json").read_text())["attention_map"] is False


def _write(path, array, vector=False):
    sitk.WriteImage(sitk.GetImageFromArray(array, isVector=vector), str(path))
    return path


@pytest.mark.parametrize("make, words", [
    (lambda d: d / "missing.nii.gz", ["not found"]),
    (lambda d: _write(d / "flat.nii.gz", np.random.rand(40, 30).astype(np.float32)), ["2D"]),
    (lambda d: _write(d / "series.nii.gz", np.random.rand(3, 8, 8, 8).astype(np.float32)), ["4 dimensions"]),
    (lambda d: _write(d / "rgb.nii.gz", (np.random.rand(8, 8, 8, 3) * 255).astype(np.uint8), True),
     ["RGB", "greyscale"]),
    (lambda d: _write(d / "nan.mha", np.where(np.random.rand(8, 8, 8) > 0.9, np.inf, 1.0).astype(np.float32)),
     ["NaN"]),
    (lambda d: _write(d / "const.nii.gz", np.full((8, 8, 8), 5, np.float32)), ["constant"]),
    (lambda d: (d / "junk.nii.gz").write_bytes(b"not an image") and d / "junk.nii.gz", ["cannot be read"]),
])
def test_bad_inputs_get_one_line_and_exit_2(tiny_model, tmp_path, make, words):
    path = make(tmp_path)
    out = tmp_path / "out"
    assert_clean_error(cdal("predict", "--model", tiny_model, "--input", path, "--output", out, "--device",
                            "cpu", check=False), *words)
    assert not list(out.glob("*_seg.nii.gz")) if out.exists() else True


def test_bad_model_and_device(volume_file, tmp_path, tiny_model):
    assert_clean_error(cdal("predict", "--model", tmp_path / "nomodel", "--input", volume_file, "--output",
                            tmp_path / "o", check=False), "not found")
    (tmp_path / "empty").mkdir()
    assert_clean_error(cdal("info", tmp_path / "empty", check=False), "model.json missing")
    import torch
    if not torch.cuda.is_available():
        assert_clean_error(cdal("predict", "--model", tiny_model, "--input", volume_file, "--output",
                                tmp_path / "o", "--device", "cuda", check=False), "no CUDA GPU", "--device cpu")


def test_info_prints_the_card(tiny_model):
    card = json.loads(cdal("info", tiny_model).stdout)
    assert card["format"] == "cdal-model" and card["classes"][1]["name"] == "Anterior"


def test_evaluate_json_schema(tiny_model, synthetic_dir, tmp_path):
    report_path = tmp_path / "report.json"
    proc = cdal("evaluate", "--model", tiny_model, "--data", synthetic_dir, "--samples", 2, "--json", report_path,
                "--precision", "fp32", "--full-sampling")
    assert "Anterior" in proc.stdout and "AUROC" in proc.stdout
    # stderr is a pipe here, as in a log file: plain progress lines, no redrawn bar
    assert "%|" not in proc.stderr and "evaluating: 6/6 volumes" in proc.stderr
    report = json.loads(report_path.read_text())
    assert set(report["per_class"]) == {"Anterior", "Posterior"}
    for row in report["per_class"].values():
        for key in ("dice", "iou", "precision", "recall"):
            assert 0.0 <= row[key] <= 1.0
        assert "hd95" in row
    assert set(report["uncertainty"]) == {"auroc", "spearman_slice", "ece"}
    assert report["volumes"] == 6 and report["seconds_per_volume"] > 0
    assert report["precision"] == "float32" and report["early_exit"] is False


def test_train_rejects_bad_data(tmp_path, tiny_config_file):
    assert_clean_error(cdal("train", "--data", tmp_path / "nowhere", "--out", tmp_path / "r", check=False),
                       "not found")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "dataset.json").write_text('{"labels": {"0": "bg"}, "training": []}')
    assert_clean_error(cdal("train", "--data", tmp_path / "d", "--out", tmp_path / "r", check=False), "labels")


def test_evaluate_in_parallel_scores_what_one_at_a_time_scores(tiny_model, synthetic_dir, monkeypatch):
    from cdal_core.data import read_msd_cases
    from cdal_core.evaluation import evaluate_cases
    from cdal_core.model_io import load_model
    model = load_model(tiny_model)
    cases, _ = read_msd_cases(synthetic_dir)
    monkeypatch.setenv("CDAL_THREADS", "2")
    done = []
    serial = evaluate_cases(model, cases[:3], samples=2, device="cpu")
    both = evaluate_cases(model, cases[:3], samples=2, device="cpu", parallel=True,
                          on_volume=lambda i, n, name: done.append(name))
    assert both["volumes_at_once"] == 2 and "volumes_at_once" not in serial
    assert done == [c.name for c in cases[:3]]
    for a, b in zip(serial["per_volume"], both["per_volume"]):
        assert a["case"] == b["case"]
        for key in a:
            if key.endswith("_dice"):
                assert a[key] == pytest.approx(b[key], abs=1e-3)
    assert serial["uncertainty"]["auroc"] == pytest.approx(both["uncertainty"]["auroc"], abs=1e-3)


def test_outputs_that_cannot_be_written_are_refused_before_any_work(tiny_model, volume_file, synthetic_dir,
                                                                      tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    assert_clean_error(cdal("predict", "--model", tiny_model, "--input", volume_file, "--output", blocker / "out",
                            check=False), "cannot write there", "choose another --output")
    assert_clean_error(cdal("train", "--data", synthetic_dir, "--out", blocker, check=False),
                       "not a folder", "--out")
    report = tmp_path / "report.json"
    report.write_text("my notes")
    for target, words in ((tmp_path, ("is a folder",)), (report, ("already exists", "--overwrite")),
                          (blocker / "r.json", ("a_file: exists and is not a folder",))):
        assert_clean_error(cdal("evaluate", "--model", tiny_model, "--data", synthetic_dir, "--json", target,
                                check=False), *words)
    assert report.read_text() == "my notes"


def test_evaluate_never_writes_its_report_over_what_it_reads(tiny_model, synthetic_dir, tmp_path):
    """--overwrite replaces an earlier report, never the dataset.json, an image or label, or the --cases list."""
    import shutil
    data = tmp_path / "data"
    shutil.copytree(synthetic_dir, data)
    listed = tmp_path / "cases.txt"
    listed.write_text("case_000\ncase_001\n")
    targets = [data / "dataset.json", data / "labelsTr" / "case_001.nii.gz", listed]
    before = [t.read_bytes() for t in targets]
    for target in targets:
        assert_clean_error(cdal("evaluate", "--model", tiny_model, "--data", data, "--cases", listed, "--json",
                                target, "--overwrite", check=False), "would replace", "which this evaluation reads")
    assert [t.read_bytes() for t in targets] == before


def test_a_demo_on_a_device_this_machine_lacks_leaves_no_output_folder(tmp_path):
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    assert_clean_error(cdal("demo", "--output", tmp_path / "demo", "--device", "cuda", check=False), "cuda")
    assert not (tmp_path / "demo").exists()


def test_a_demo_run_never_replaces_an_earlier_one_silently(tmp_path):
    from cdal_core.demo import run_demo
    from cdal_core.errors import CDALError
    (tmp_path / "icbm152_report.json").write_text("an earlier run")
    with pytest.raises(CDALError, match="already exists.*--overwrite"):
        run_demo(tmp_path)
    assert (tmp_path / "icbm152_report.json").read_text() == "an earlier run"


def test_the_demo_without_a_shipped_model_never_replaces_its_earlier_files_silently(tmp_path, monkeypatch):
    """Without a shipped model the demo trains on generated data and writes other files: those are checked too
    (it used to pass --overwrite for them)."""
    import cdal_core.model_io
    from cdal_core.demo import run_demo
    from cdal_core.errors import CDALError
    monkeypatch.setattr(cdal_core.model_io, "list_models", lambda: [])
    (tmp_path / "case_000_seg.nii.gz").write_bytes(b"an earlier result")
    with pytest.raises(CDALError, match="case_000_seg.nii.gz: already exists"):
        run_demo(tmp_path)
    assert (tmp_path / "case_000_seg.nii.gz").read_bytes() == b"an earlier result"


def test_outputs_of_one_input_are_written_all_or_none(tmp_path):
    """An error (or Ctrl-C) while writing leaves neither new files nor temporaries, and keeps the old set."""
    from cdal_core.cli import write_outputs_together
    image = to_image(np.zeros((4, 5, 6), np.float32))
    (tmp_path / "a_seg.nii.gz").write_bytes(b"previous run")
    with pytest.raises(Exception):
        write_outputs_together([(image, tmp_path / "a_seg.nii.gz"), (object(), tmp_path / "a_unc.nii.gz")],
                               {tmp_path / "a_report.json": b"{}"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_seg.nii.gz"]
    assert (tmp_path / "a_seg.nii.gz").read_bytes() == b"previous run"
    write_outputs_together([(image, tmp_path / "a_seg.nii.gz")], {tmp_path / "a_report.json": b"{}"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_report.json", "a_seg.nii.gz"]
    assert sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "a_seg.nii.gz"))).shape == (4, 5, 6)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
def test_a_nifti_cut_short_by_a_full_disk_is_not_renamed_into_place(tmp_path, monkeypatch, suffix):
    """ITK's NIfTI writer only warns when the disk is full; the cut file used to be published under its final
    name (cdal crop printed success over 0-byte crops)."""
    from cdal_core.cli import main, write_outputs_together
    real = sitk.WriteImage

    def disk_full(image, path, *args):
        real(image, path, *args)
        with open(path, "r+b") as f:  # what a full disk leaves: the start of the file
            f.truncate(os.path.getsize(path) // 2)

    monkeypatch.setattr(sitk, "WriteImage", disk_full)
    image = to_image(np.random.default_rng(0).random((8, 9, 10)).astype(np.float32))
    with pytest.raises(OSError, match="written incompletely"):
        write_outputs_together([(image, tmp_path / ("a_seg" + suffix))], {tmp_path / "a_report.json": b"{}"})
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(sitk, "WriteImage", real)
    write_outputs_together([(image, tmp_path / ("a_seg" + suffix))], {})
    assert sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / ("a_seg" + suffix)))).shape == (8, 9, 10)


def test_a_disk_that_fills_up_mid_run_gets_one_line_not_a_traceback(tmp_path, monkeypatch, capsys):
    import errno
    import cdal_core.cli as cli

    def full(args):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "out" / "scan_seg.nii.gz"))

    monkeypatch.setitem(cli.COMMANDS, "info", full)
    assert cli.main(["info", "hippocampus"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("cdal: error: ") and "scan_seg.nii.gz" in err, err
    assert "No space left on device" in err and "free some space" in err


def test_a_checkpoint_that_cannot_be_written_leaves_no_partial_file(tmp_path, monkeypatch, synthetic_dir):
    import errno
    import torch
    from cdal_core.config import TrainConfig
    from cdal_core.trainer import Trainer
    from core_settings import TINY_CONFIG
    trainer = Trainer(str(synthetic_dir), str(tmp_path / "run"), TrainConfig.from_dict(TINY_CONFIG), device="cpu")
    trainer._prepare_run_dir()

    def full(state, path):
        open(path, "wb").write(b"half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(OSError):
        trainer.save_checkpoint()
    assert not (tmp_path / "run" / "checkpoint.pt.tmp").exists()


def test_outputs_never_go_over_inputs_or_into_the_input_folder(tiny_model, volume_file, tmp_path):
    """--output equal to the input folder: the user's own x_seg was called 'an output' (and replaced with
    --overwrite), and the next run over the folder segmented the outputs as scans."""
    import shutil
    scans = tmp_path / "scans"
    scans.mkdir()
    shutil.copy(volume_file, scans / "sub01.nii.gz")
    shutil.copy(volume_file, scans / "sub01_seg.nii.gz")  # a manual label the user keeps beside the scan
    before = (scans / "sub01_seg.nii.gz").read_bytes()
    for extra in ([], ["--overwrite"]):
        assert_clean_error(cdal("predict", "--model", tiny_model, "--input", scans, "--output", scans, *extra,
                                check=False), "is the folder the inputs are read from", "choose another folder")
    assert (scans / "sub01_seg.nii.gz").read_bytes() == before
    assert sorted(p.name for p in scans.iterdir()) == ["sub01.nii.gz", "sub01_seg.nii.gz"]
    from cdal_core.cli import keep_outputs_apart
    with pytest.raises(Exception, match="is an input and would be replaced"):
        keep_outputs_apart(scans / "sub01.nii.gz", scans, [scans / "sub01_seg.nii.gz"], [scans / "sub01_seg.nii.gz"])


@pytest.mark.parametrize("settings, words", [
    ({"batch_size": -3}, ["batch_size", "above 0"]),
    ({"network": {"base_channels": "x"}}, ["base_channels", "whole number"]),
    ({"lr_g": "1e-4"}, ["lr_g", "number"]),
])
def test_training_settings_of_the_wrong_kind_are_named(tmp_path, synthetic_dir, settings, words):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(settings))
    assert_clean_error(cdal("train", "--data", synthetic_dir, "--out", tmp_path / "run", "--config", config,
                            check=False), *words)


def test_a_refused_training_start_leaves_no_run_behind(tmp_path, tiny_config_file):
    """Data refused after the settings were read: nothing in --out that a corrected re-run would call
    'a run with different settings'."""
    data = tmp_path / "d"
    (data / "imagesTr").mkdir(parents=True)
    (data / "labelsTr").mkdir()
    image = make_volume(np.random.default_rng(0))[0]
    sitk.WriteImage(to_image(image), str(data / "imagesTr" / "c0.nii.gz"))
    sitk.WriteImage(to_image(np.full(image.shape, 7, np.uint8)), str(data / "labelsTr" / "c0.nii.gz"))
    (data / "dataset.json").write_text(json.dumps({
        "labels": {"0": "background", "1": "Anterior", "2": "Posterior"},
        "training": [{"image": "./imagesTr/c0.nii.gz", "label": "./labelsTr/c0.nii.gz"}]}))
    assert_clean_error(cdal("train", "--data", data, "--out", tmp_path / "runs" / "new" / "run", "--config",
                            tiny_config_file, check=False), "label")
    assert not (tmp_path / "runs").exists()  # not even the empty folders it made
    (tmp_path / "mine").mkdir()  # a folder the user made is theirs: kept
    assert_clean_error(cdal("train", "--data", data, "--out", tmp_path / "mine", "--config", tiny_config_file,
                            check=False), "label")
    assert (tmp_path / "mine").is_dir() and not any((tmp_path / "mine").iterdir())


def test_cases_trained_on_reads_every_generators_card():
    """A member trained on all of a folder marks every case; a folder of another name or a card without held-out
    lists marks none; a Windows path in the card still names its folder."""
    from cdal_core.evaluation import cases_trained_on
    primary = {"folder": "/data/CXR", "validation_cases": ["a"], "model_selection_cases": ["a"]}
    member = {"folder": "C:\\Users\\me\\CXR\\", "validation_cases": []}
    card = {"training": {"data": primary}, "members": [{"training": {"data": member}}]}
    assert cases_trained_on({"training": {"data": primary}}, "/elsewhere/CXR", ["a", "b"]) == (["b"], "/data/CXR")
    assert cases_trained_on(card, "/elsewhere/cxr", ["a", "b"])[0] == ["a", "b"]
    assert cases_trained_on(card, "/elsewhere/MoNuSeg", ["a", "b"])[0] == []
    assert cases_trained_on({"training": {"data": {"folder": "/data/CXR"}}}, "/x/CXR", ["a"])[0] == []
    assert cases_trained_on({"training": {"data": "bundle.npz"}}, "/x/CXR", ["a"])[0] == []


def test_a_generic_folder_name_is_told_apart_by_its_parent_and_a_bundle_by_its_source(tmp_path):
    from cdal_core.evaluation import cases_trained_on
    histology = {"folder": "/data/MoNuSeg/train", "validation_cases": []}
    assert cases_trained_on({"training": {"data": histology}}, tmp_path / "MoNuSeg" / "train", ["a"])[0] == ["a"]
    assert cases_trained_on({"training": {"data": histology}}, tmp_path / "other" / "train", ["a"])[0] == []
    bundle = {"folder": "monuseg.npz", "source_folder": "MoNuSeg/train", "held_out_cases": ["b"]}
    assert cases_trained_on({"training": {"data": bundle}}, tmp_path / "MoNuSeg" / "train", ["a", "b"])[0] == ["a"]
    assert cases_trained_on({"training": {"data": bundle}}, tmp_path / "train", ["a", "b"])[0] == []


def test_the_shipped_models_name_the_shared_cases_they_trained_on():
    """cxr (refit on all 129 pairs), monuseg (refit on all 30 tiles) and hippocampus (every generator on all 195
    volumes) trained on every case of their data."""
    from core_settings import SHARED_DATA
    from cdal_core.evaluation import cases_trained_on
    from cdal_core.model_io import list_models, read_card, resolve_model
    expected = {"cxr": ("CXR", "images"), "monuseg": ("MoNuSeg/train", "images"),
                "hippocampus": ("Task04_Hippocampus", "imagesTr")}
    checked = []
    for name, (folder, images) in expected.items():
        data = SHARED_DATA / folder
        if name not in list_models() or not (data / images).is_dir():
            continue
        cases = sorted(f.name.split(".")[0] for f in (data / images).iterdir() if not f.name.startswith("."))
        seen, _ = cases_trained_on(read_card(resolve_model(name)), data, cases)
        assert cases and seen == cases, name
        checked.append(name)
    if not checked:
        pytest.skip("neither the shipped models nor ../shared/data are here")


def test_a_dicom_series_may_write_its_outputs_beside_its_folder(tmp_path):
    """`--input patient/DICOM --output patient`: the series is read from patient/DICOM, not from patient."""
    from cdal_core.cli import keep_outputs_apart
    from cdal_core.errors import CDALError
    series = tmp_path / "patient" / "DICOM"
    series.mkdir(parents=True)
    (series / "IM0001.dcm").write_bytes(b"")
    keep_outputs_apart(series, tmp_path / "patient", [series], [tmp_path / "patient" / "DICOM_seg.nii.gz"])
    with pytest.raises(CDALError, match="is the folder the inputs are read from"):
        keep_outputs_apart(series, series, [series], [series / "DICOM_seg.nii.gz"])
