"""Real data: MSD Task04 hippocampus volumes loaded through MRML storage nodes, segmented with the shipped
"hippocampus" model; Dice against their labels is reported (skipped when the data or the model is absent)."""
import glob
import json
import os

import numpy as np
import pytest

from CDALSegmentationLib import logic as libLogic
from CDALSegmentationLib.logic import foregroundClasses, listModels

from helpers import dice, oblique_copy, volume_from_sitk
from slicer_harness import load_volume

DATA = os.environ.get("CDAL_HIPPOCAMPUS_DATA") or os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))),
    "shared", "data", "Task04_Hippocampus")
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def icbm152_template() -> str:
    """nilearn's ICBM152 T1 template: from nilearn where this Python has it, else from the project's .venv (Slicer's
    own Python has no nilearn); skips the test where neither has it."""
    name = os.path.join("datasets", "data", "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz")
    try:
        import nilearn
        found = [os.path.join(os.path.dirname(nilearn.__file__), name)]
    except ImportError:
        found = []
    found += glob.glob(os.path.join(REPO, ".venv", "[Ll]ib", "*", "site-packages", "nilearn", name))
    found += glob.glob(os.path.join(REPO, ".venv", "Lib", "site-packages", "nilearn", name))   # Windows venv
    for path in found:
        if os.path.exists(path):
            return path
    pytest.skip("nilearn's ICBM152 template not installed")


def _validation_cases(n=3):
    """First cases of the project's fold-0 validation split. Three of the shipped model's four generators have
    trained on them too (since session 9 they train on all 195 volumes), so this checks the MRML path against the
    model's known quality on these cases, not its held-out accuracy."""
    path = os.path.join(REPO, "configs", "hippocampus_val.txt")
    if os.path.exists(path):
        names = [l.strip() for l in open(path) if l.strip() and not l.startswith("#")]
        if names:
            return names[:n]
    return ["hippocampus_008", "hippocampus_014", "hippocampus_025"]


CASES = _validation_cases()


@pytest.fixture(scope="module")
def hippocampus_model():
    if not os.path.isdir(os.path.join(DATA, "imagesTr")):
        pytest.skip("hippocampus data not found at %s" % DATA)
    if "hippocampus" not in listModels():
        pytest.skip("shipped 'hippocampus' model not installed (Resources/Models/hippocampus)")
    return "hippocampus"


@pytest.fixture(scope="module")
def hippocampus_model_only():
    if "hippocampus" not in listModels():
        pytest.skip("shipped 'hippocampus' model not installed (Resources/Models/hippocampus)")
    return "hippocampus"


def test_real_hippocampus_dice(app, logic, hippocampus_model, capsys):
    import SimpleITK as sitk

    report = []
    scores = []
    for case in CASES:
        image_path = os.path.join(DATA, "imagesTr", case + ".nii.gz")
        if not os.path.exists(image_path):
            continue
        volume = load_volume(image_path, name=case)
        truth_node = load_volume(os.path.join(DATA, "labelsTr", case + ".nii.gz"), name=case + "-label",
                                 labelmap=True)
        import slicer.util

        truth = slicer.util.arrayFromVolume(truth_node)
        result = logic.segment(volume, model=hippocampus_model, samples=3, seed=0)
        labels = result.labelArray()
        per_class = dict((name, dice(labels, truth, index)) for index, name, _ in foregroundClasses(result.card))
        scores.append(per_class)
        report.append("%s: %s (%.1f s)" % (case, ", ".join("%s %.3f" % kv for kv in per_class.items()),
                                          result.seconds))
        if case == CASES[0]:
            # MRML path == direct cdal_core path on the file (the MRML <-> SimpleITK conversion is lossless)
            from cdal_core.inference import segment_image
            from cdal_core.model_io import load_model

            model = load_model(libLogic.resolveModelPath(hippocampus_model))
            direct = segment_image(sitk.ReadImage(image_path), model, samples=3, seed=0, device="cpu")
            same = float((sitk.GetArrayFromImage(direct.labels) == labels).mean())
            report.append("%s: MRML path vs direct cdal_core on the file: %.4f of voxels equal" % (case, same))
            assert same > 0.999, same
            # the same physical image stored obliquely gives the same segmentation after mapping back
            from helpers import labels_to_grid
            from CDALSegmentationLib import geometry

            image = geometry.sitkImageFromVolumeNode(volume)
            oblique = volume_from_sitk(oblique_copy(image, degrees=20.0), case + " oblique")
            back = labels_to_grid(logic.segment(oblique, model=hippocampus_model, samples=3, seed=0).labelArray(),
                                  oblique, volume)
            assert labels.any() and back.any(), "no hippocampus found: the oblique comparison would be vacuous"
            agreement = dice(back, labels)
            as_stored, oblique_vs_truth = dice(labels, truth), dice(back, truth)
            report.append("%s stored oblique (20 deg): agreement with as-stored Dice %.3f; foreground Dice vs label "
                          "%.3f (as stored %.3f)" % (case, agreement, oblique_vs_truth, as_stored))
            # two extra resamplings of a small structure cost some overlap, but the result must be as good
            assert agreement > 0.6, agreement
            assert oblique_vs_truth > as_stored - 0.1, (oblique_vs_truth, as_stored)
    assert scores, "no hippocampus cases found"
    mean = dict((k, float(np.mean([s[k] for s in scores]))) for k in scores[0])
    report.append("mean Dice: " + ", ".join("%s %.3f" % kv for kv in mean.items()))
    with capsys.disabled():
        print("\n[hippocampus via MRML] " + "\n[hippocampus via MRML] ".join(report))
    assert min(mean.values()) > 0.8, mean  # the same cases through cdal_core alone score ~0.87-0.89


def test_whole_brain_without_roi_through_the_worker(app, logic, hippocampus_model_only, tmp_path, user_models):
    """Segment on a whole brain (ICBM152 template) with no ROI: the worker localises both hippocampi
    (cdal_core.scan), the segments are named per side, the volume table and the jumps know both sides; the
    result exported for fine-tuning becomes one crop per side, where inference segments. Fine-tuning on it
    leaves that cutting (a registration per head) to its child process, not to Slicer's GUI thread."""
    import slicer.util

    volume = load_volume(icbm152_template(), name="ICBM152")
    messages = []
    job = logic.startSegmentation(volume, model=hippocampus_model_only, samples=2, seed=0, device="cpu")
    try:
        state = job.wait(timeout=600, interval=0.2, callback=lambda j: messages.append(j.message))
        assert state == "done", (job.error, job.stderrLines[-10:])
        result = logic.finishSegmentation(job)
    finally:
        job.cleanup()
    assert any("locat" in m.lower() for m in messages), sorted(set(messages))
    segmentation = result.segmentationNode.GetSegmentation()
    names = sorted(segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments()))
    assert names == ["Left anterior", "Left posterior", "Right anterior", "Right posterior"], names
    sides = [result.volumeTableNode.GetCellText(r, 0) for r in range(result.volumeTableNode.GetNumberOfRows())]
    assert sorted(set(sides)) == ["left", "right"]
    volumes = slicer.util.arrayFromTableColumn(result.volumeTableNode, "Volume mm3")
    assert all(500 < v < 6000 for v in volumes), volumes
    left, right = logic.centreRAS(result.volumeTableNode, "left"), logic.centreRAS(result.volumeTableNode, "right")
    assert left[0] < 0 < right[0], (left, right)  # RAS: the subject's left has negative R
    import SimpleITK as sitk
    from CDALSegmentationLib import finetune
    pairs = logic.trainingPairs(app.scene)
    assert pairs == [(volume, result.segmentationNode)]
    _, warnings = finetune.exportTrainingData(pairs, str(tmp_path / "msd"), result.card)
    assert warnings == [], warnings
    meta = json.loads((tmp_path / "msd" / "dataset.json").read_text())
    assert [t["image"] for t in meta["training"]] == ["./imagesTr/ICBM152_left.nii.gz", "./imagesTr/ICBM152_right.nii.gz"]
    for entry in meta["training"]:
        labels = sitk.ReadImage(str(tmp_path / "msd" / entry["label"]))
        assert labels.GetSize() == (40, 56, 40)
        array = sitk.GetArrayFromImage(labels)
        assert set(np.unique(array)) == {0, 1, 2}
        centroid = np.argwhere(array > 0).mean(0)  # the trainer centre-crops slices: the labels must be central
        assert np.all(np.abs(centroid - (np.asarray(array.shape) - 1) / 2) < 8), (entry, centroid)
    job = logic.startFineTune(pairs, baseModel=hippocampus_model_only, newModelName="from heads", maxSteps=1,
                              device="cpu", keepData=True,
                              config={"batch_size": 2, "val_samples": 1, "val_max_volumes": 1, "log_every": 1})
    try:
        exported = os.listdir(os.path.join(job.dataDir, "volumes", "imagesTr"))
        assert exported == ["ICBM152.nii"], exported  # written whole: the GUI thread does no registration
        state = job.wait(timeout=600, interval=0.5)
        assert state == "done", (job.error, job.stderrLines[-10:])
        cropping = [e for e in job.events if e.get("event") == "cropping"]
        assert cropping == [{"event": "cropping", "case": 1, "cases": 1, "name": "ICBM152",
                             "sides": ["left", "right"]}], cropping
        crops = os.path.join(job.dataDir, "crops")
        assert sorted(os.listdir(os.path.join(crops, "labelsTr"))) == ["ICBM152_left.nii.gz", "ICBM152_right.nii.gz"]
        for name in ("ICBM152_left.nii.gz", "ICBM152_right.nii.gz"):
            assert sitk.ReadImage(os.path.join(crops, "labelsTr", name)).GetSize() == (40, 56, 40)
        assert job.warnings and "CPU" in job.warnings[0], job.warnings
        assert not any("box" in w for w in job.warnings), job.warnings  # both sides cut, all labels inside
    finally:
        import shutil

        shutil.rmtree(os.path.dirname(job.dataDir), ignore_errors=True)


def test_fine_tuning_child_names_the_chosen_volumes_when_nothing_can_be_cut(tmp_path, capsys):
    """Labels nowhere near the hippocampi: the child's cutting step fails with the reason, naming the volumes the
    user chose rather than its temporary export folder, and reports the head's warnings as notes first."""
    import SimpleITK as sitk

    from CDALSegmentationLib import finetune_worker

    template = icbm152_template()
    heads = tmp_path / "volumes"
    for folder in ("imagesTr", "labelsTr"):
        (heads / folder).mkdir(parents=True)
    head = sitk.ReadImage(template)
    labels = np.zeros(sitk.GetArrayViewFromImage(head).shape, np.uint8)
    labels[-30:-20, 90:100, 90:100] = 1  # near the top of the head, far from both hippocampi
    label_image = sitk.GetImageFromArray(labels)
    label_image.CopyInformation(head)
    sitk.WriteImage(head, str(heads / "imagesTr" / "head.nii"))
    sitk.WriteImage(label_image, str(heads / "labelsTr" / "head.nii"))
    (heads / "dataset.json").write_text(json.dumps({
        "name": "export", "labels": {"0": "background", "1": "Anterior", "2": "Posterior"}, "numTraining": 1,
        "training": [{"image": "./imagesTr/head.nii", "label": "./labelsTr/head.nii"}]}))
    error = finetune_worker.cutHeads(str(heads), ["--model", "hippocampus", "--data", str(tmp_path / "crops")])
    assert error and error.startswith("the volumes chosen for fine-tuning: none of its 1 scans"), error
    assert str(heads) not in error
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert any(e["event"] == "note" and "no labels in the left hippocampus box" in e["message"] for e in events)
    assert events[-1]["event"] == "cropping" and events[-1]["sides"] == [], events
