"""Fine-tuning round trip on CPU: export pairs from the scene, run `cdal finetune`, register, segment with it."""
import json
import os

import numpy as np

import slicer.util
from CDALSegmentationLib import finetune
from CDALSegmentationLib.logic import listModels, modelKind, userModelsDir

from slicer_harness import load_volume

SMALL = {"batch_size": 2, "val_samples": 1, "val_max_volumes": 1, "log_every": 1}


def test_export_training_pairs(app, logic, tiny_model, synthetic_data, tmp_path):
    volume = load_volume(os.path.join(str(synthetic_data), "imagesTr", "case_000.nii.gz"), name="case 0")
    result = logic.segment(volume, model=tiny_model, samples=1, steps=1, seed=0)
    pairs = logic.trainingPairs(app.scene)
    assert pairs == [(volume, result.segmentationNode)]
    out, warnings = finetune.exportTrainingData(pairs, str(tmp_path / "msd"), result.card)
    meta = json.loads((tmp_path / "msd" / "dataset.json").read_text())
    assert meta["numTraining"] == 1 and meta["labels"]["1"] == result.card["classes"][1]["name"]
    import SimpleITK as sitk

    image = sitk.ReadImage(str(tmp_path / "msd" / meta["training"][0]["image"]))
    label = sitk.ReadImage(str(tmp_path / "msd" / meta["training"][0]["label"]))
    source = sitk.ReadImage(os.path.join(str(synthetic_data), "imagesTr", "case_000.nii.gz"))
    assert image.GetSize() == source.GetSize()
    assert np.allclose(image.GetOrigin(), source.GetOrigin()) and np.allclose(image.GetDirection(),
                                                                             source.GetDirection())
    assert np.array_equal(sitk.GetArrayFromImage(label), result.labelArray())


def test_finetune_round_trip_cpu(app, logic, tiny_model, synthetic_data, user_models):
    volume = load_volume(os.path.join(str(synthetic_data), "imagesTr", "case_001.nii.gz"), name="case 1")
    result = logic.segment(volume, model=tiny_model, samples=1, steps=1, seed=0)
    pairs = logic.trainingPairs(app.scene)
    job = logic.startFineTune(pairs, baseModel=tiny_model, newModelName="my tuned", maxSteps=3, device="cpu",
                              config=SMALL)
    assert os.path.isdir(job.dataDir)
    statuses = []
    state = job.wait(timeout=240, interval=0.5, callback=lambda j: statuses.append(j.statusText()))
    assert state == "done", (job.error, job.stderrLines[-10:])
    assert job.device == "cpu" and any("CPU" in w for w in job.warnings), "device is reported by the child"
    assert not os.path.exists(job.dataDir), "exported patient images must be deleted after the run"
    assert os.path.dirname(job.modelPath) == str(user_models), (job.modelPath, userModelsDir(), str(user_models))
    assert os.path.basename(job.modelPath).startswith("my-tuned"), job.modelPath
    assert modelKind(job.modelPath) == "user"
    card = json.load(open(os.path.join(job.modelPath, "model.json")))
    name = os.path.basename(job.modelPath)
    assert card["name"] == name and card["fine_tuned_cases"] == 1
    assert name in listModels(), listModels()
    assert any(e.get("event") == "progress" and e.get("step") for e in job.events), job.events
    assert statuses and job.statusText().startswith("Fine-tuned model"), statuses[-3:]
    # the new model is selectable by name and segments
    tuned = logic.segment(volume, model=name, samples=1, steps=1, seed=0)
    assert tuned.segmentationNode.GetSegmentation().GetNumberOfSegments() == 2
    # registering again never overwrites
    again = finetune.registerModel(job.modelPath, name)
    assert again != job.modelPath and os.path.basename(again).startswith(name + "-")


def test_finetune_cancel_kills_children(app, logic, tiny_model, synthetic_data, user_models):
    volume = load_volume(os.path.join(str(synthetic_data), "imagesTr", "case_002.nii.gz"), name="case 2")
    logic.segment(volume, model=tiny_model, samples=1, steps=1, seed=0)
    job = logic.startFineTune(logic.trainingPairs(app.scene), baseModel=tiny_model, newModelName="never",
                              maxSteps=1000, device="cpu", config=SMALL)
    import time

    time.sleep(1.0)
    job.poll()
    job.cancel()
    assert job.state == "cancelled"
    assert not os.path.exists(job.dataDir)
    if os.name != "nt":
        job._runner._process.wait(timeout=10)
        try:
            os.killpg(job.pid, 0)
            alive = True
        except OSError:
            alive = False
        assert not alive
    assert "never" not in listModels()


def test_finetune_keeps_data_when_asked_and_device_choice_in_child(app, logic, tiny_model, synthetic_data,
                                                                   user_models):
    from CDALSegmentationLib import finetune_worker

    assert finetune_worker.chooseDevice("auto", False)[0] == "cpu" and finetune_worker.chooseDevice("auto", False)[1]
    assert finetune_worker.chooseDevice("auto", True) == ("cuda", None, None)
    assert finetune_worker.chooseDevice("cuda", False)[2]
    volume = load_volume(os.path.join(str(synthetic_data), "imagesTr", "case_000.nii.gz"), name="case 0")
    logic.segment(volume, model=tiny_model, samples=1, steps=1, seed=0)
    job = logic.startFineTune(logic.trainingPairs(app.scene), baseModel=tiny_model, newModelName="kept",
                              maxSteps=1000, device="cpu", config=SMALL, keepData=True)
    job.cancel()
    import glob

    # hippocampus-like models have the child cut the exported volumes: they wait in data/volumes
    assert glob.glob(os.path.join(job.dataDir, "**", "dataset.json"), recursive=True), os.listdir(job.dataDir)
    import shutil

    shutil.rmtree(os.path.dirname(job.dataDir), ignore_errors=True)


def test_gui_side_modules_do_not_import_torch():
    """Importing torch freezes Slicer's GUI for seconds: the GUI-side code must not need it."""
    import subprocess
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    repo = os.path.dirname(os.path.dirname(here))
    code = ("import sys; sys.path[:0] = [%r, %r]\n"
            "from CDALSegmentationLib import logic, finetune, jobs, job_panel, dependencies, segment_worker\n"
            "logic.listModels(); logic.modelEntries()\n"
            "print('torch' in sys.modules)" % (os.path.join(repo, "CDALSegmentation"), repo))
    out = subprocess.run([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         universal_newlines=True, encoding="utf-8", errors="replace", timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False"


def test_trainer_notes_reach_the_user(tmp_path):
    """The trainer's notes (the shipped ensemble fine-tuned into one generator; a collapse onto the background)
    are shown with the result, like the device warning, once each."""
    job = finetune.FineTuneJob(["python"], {}, str(tmp_path), "tuned", "hippocampus", 1)
    note = {"event": "note", "message": "hippocampus is an ensemble of 4 generators: the result is a single-generator model"}
    job.handleEvent(note)
    job.handleEvent(note)
    job.handleEvent({"event": "progress", "step": 1, "max_steps": 2})
    assert job.warnings == [note["message"]]


def _pair_with_segments(app, logic, tiny_model, synthetic_data, arrays):
    """A segmented case whose two segments are replaced by ``arrays`` (class name -> (K, J, I) mask)."""
    volume = load_volume(os.path.join(str(synthetic_data), "imagesTr", "case_000.nii.gz"), name="case 0")
    result = logic.segment(volume, model=tiny_model, samples=1, steps=1, seed=0)
    segNode = result.segmentationNode
    segmentation = segNode.GetSegmentation()
    for i in range(segmentation.GetNumberOfSegments()):
        name = segmentation.GetNthSegment(i).GetName()
        slicer.util.updateSegmentBinaryLabelmapFromArray(arrays(result.labelArray())[name].astype(np.uint8),
                                                         segNode, segmentation.GetNthSegmentID(i), volume)
    return [(volume, segNode)], result.card


def test_export_names_segments_of_two_classes_that_overlap(app, logic, tiny_model, synthetic_data, tmp_path):
    def both_everywhere(labels):
        return {"Anterior": labels > 0, "Posterior": labels > 0}

    pairs, card = _pair_with_segments(app, logic, tiny_model, synthetic_data, both_everywhere)
    _, warnings = finetune.exportTrainingData(pairs, str(tmp_path / "msd"), card)
    assert any("'Posterior' overlaps another class's segment" in w for w in warnings), warnings


def test_fine_tuning_on_empty_segments_is_refused_before_training(app, logic, tiny_model, synthetic_data, tmp_path):
    """All-empty segments trained a model that finds nothing, and the GUI then offered to use it."""
    import pytest
    from cdal_core.errors import CDALError

    def nothing(labels):
        return {"Anterior": labels < 0, "Posterior": labels < 0}

    pairs, card = _pair_with_segments(app, logic, tiny_model, synthetic_data, nothing)
    with pytest.raises(CDALError, match="is empty, so there is nothing to learn"):
        finetune.exportTrainingData(pairs, str(tmp_path / "msd"), card)


def test_fine_tuning_on_a_volume_with_nan_voxels_is_refused_by_its_name(app, logic, tiny_model, synthetic_data,
                                                                         tmp_path):
    """NIfTI export turned NaN voxels into 0 without a word (Segment refuses such a volume)."""
    import pytest
    from cdal_core.errors import CDALError

    pairs, card = _pair_with_segments(app, logic, tiny_model, synthetic_data, lambda labels: {
        "Anterior": labels == 1, "Posterior": labels == 2})
    volume = pairs[0][0]
    voxels = slicer.util.arrayFromVolume(volume).astype(np.float32)
    voxels[0, 0, :3] = np.nan
    slicer.util.updateVolumeFromArray(volume, voxels)
    with pytest.raises(CDALError, match="case 0: has 3 NaN/inf voxels.*before training on it"):
        finetune.exportTrainingData(pairs, str(tmp_path / "msd"), card)
