"""Bad input gives one clear CDALError line, creates no node and changes nothing in the scene."""
import os

import numpy as np
import pytest

import slicer
import slicer.util
from cdal_core.errors import CancelledError, CDALError
from CDALSegmentationLib.logic import CDALSegmentationLogic

from helpers import scene_snapshot, volume_from_array


def _volume(app, shape=(12, 20, 22), name="vol", value=None):
    rng = np.random.default_rng(0)
    array = rng.normal(100, 20, size=shape).astype(np.float32) if value is None else np.full(shape, value, np.float32)
    return volume_from_array(array, np.diag([1.0, 1.0, 2.0, 1.0]), name)


def _expect_error(app, call, words, error=CDALError):
    before = scene_snapshot(app.scene)
    with pytest.raises(error) as info:
        call()
    message = str(info.value)
    assert "\n" not in message and 10 < len(message) < 400, message
    for word in words:
        assert word.lower() in message.lower(), (word, message)
    assert scene_snapshot(app.scene) == before, "a failed run changed the scene"
    return message


def test_no_volume(app, logic, tiny_model):
    _expect_error(app, lambda: logic.segment(None, model=tiny_model), ["no input volume"])


def test_2d_image(app, logic, tiny_model):
    node = _volume(app, shape=(1, 40, 40), name="slice2d")
    _expect_error(app, lambda: logic.segment(node, model=tiny_model), ["2D", "3D"])


def test_rgb_volume_into_grey_model(app, logic, tiny_model):
    node = app.scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "colour")
    slicer.util.updateVolumeFromArray(node, np.random.default_rng(0).integers(0, 255, (8, 16, 16, 3)).astype(np.uint8))
    _expect_error(app, lambda: logic.segment(node, model=tiny_model), ["RGB", "greyscale"])


def test_label_map_rejected(app, logic, tiny_model):
    node = app.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "labels")
    slicer.util.updateVolumeFromArray(node, np.ones((8, 16, 16), np.uint8))
    _expect_error(app, lambda: logic.segment(node, model=tiny_model), ["label map"])


def test_missing_model_and_bad_model_folder(app, logic, tmp_path):
    node = _volume(app)
    _expect_error(app, lambda: logic.segment(node, model="no-such-model"), ["not found", "no-such-model"])
    empty = tmp_path / "empty-model"
    empty.mkdir()
    _expect_error(app, lambda: logic.segment(node, model=str(empty)), ["model.json"])
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "model.json").write_text("{not json")
    _expect_error(app, lambda: logic.segment(node, model=str(broken)), ["cannot be read", "re-download or re-export"])


def test_incompatible_model_weights(app, logic, tiny_model, tmp_path):
    import shutil

    bad = tmp_path / "truncated"
    shutil.copytree(tiny_model, str(bad))
    with open(str(bad / "model.safetensors"), "r+b") as f:
        f.truncate(100)
    node = _volume(app)
    _expect_error(app, lambda: logic.segment(node, model=str(bad)), ["model.safetensors"])


def test_nan_and_constant_volumes(app, logic, tiny_model):
    node = _volume(app, name="nan")
    array = slicer.util.arrayFromVolume(node)
    array[2, 3, 4] = np.nan
    slicer.util.arrayFromVolumeModified(node)
    _expect_error(app, lambda: logic.segment(node, model=tiny_model), ["NaN"])
    flat = _volume(app, name="flat", value=5.0)
    _expect_error(app, lambda: logic.segment(flat, model=tiny_model), ["constant"])


def test_large_volume_without_roi_goes_to_the_worker_and_roi_outside_is_refused(app, logic, tiny_model):
    """A whole brain without an ROI is no longer refused: the worker localises it (cdal_core.scan)."""
    node = _volume(app, shape=(160, 200, 180))  # 5.8 M voxels, far more than the model's crop
    prepared = logic.prepareInput(node, model=tiny_model)
    assert prepared.ijkBox is None and prepared.image.GetSize() == (180, 200, 160)
    roi = app.scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "far away")
    roi.SetCenter(5000.0, 5000.0, 5000.0)
    roi.SetSize(10.0, 10.0, 10.0)
    _expect_error(app, lambda: CDALSegmentationLogic().segment(node, model=tiny_model, roiNode=roi),
                  ["does not overlap"])


def test_cancelled_run_leaves_scene_unchanged(app, logic, tiny_model):
    node = _volume(app)

    def progress(fraction, message):
        if fraction > 0.05:
            raise CancelledError("cancelled by the user")

    _expect_error(app, lambda: logic.segment(node, model=tiny_model, samples=1, steps=1, progress=progress),
                  ["cancelled"], error=CancelledError)


def test_cancel_background_job_kills_process(app, logic, tiny_model):
    node = _volume(app)
    before = scene_snapshot(app.scene)
    job = logic.startSegmentation(node, model=tiny_model, samples=1, steps=1, device="cpu")
    pid = job.pid
    job.cancel()
    assert job.state == "cancelled"
    if os.name != "nt":
        assert job._runner._process.wait(timeout=10) is not None
        with pytest.raises(OSError):
            os.killpg(pid, 0)  # the whole process group is gone
    with pytest.raises(CDALError):
        logic.finishSegmentation(job)
    job.cleanup()
    assert scene_snapshot(app.scene) == before


def test_a_user_roi_is_never_second_guessed_by_the_localiser(app, logic, tiny_model):
    """A brain-sized ROI is segmented as the user drew it: the worker gets --localise off. Without the ROI the
    same (brainless, synthetic) volume goes to the localiser, which refuses it."""
    node = _volume(app, shape=(12, 150, 140))        # 150 x 140 mm: big enough for the localiser to step in
    _expect_error(app, lambda: logic.segment(node, model=tiny_model, samples=1, steps=1), ["locate"])
    roi = app.scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "everything")
    bounds = [0.0] * 6
    node.GetRASBounds(bounds)
    roi.SetCenter([(bounds[2 * i] + bounds[2 * i + 1]) / 2 for i in range(3)])
    roi.SetSize([bounds[2 * i + 1] - bounds[2 * i] + 2 for i in range(3)])
    result = logic.segment(node, model=tiny_model, roiNode=roi, samples=1, steps=1)
    assert result.report["localisation"]["status"] != "ok"


def test_gpu_chosen_without_one_is_worded_for_the_device_choice(app, logic, tiny_model):
    """Device "GPU (CUDA)" on a machine without one: the message names the module's Device choice, not the
    command line's --device flag, and nothing is added to the scene."""
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    node = _volume(app)
    before = scene_snapshot(app.scene)
    job = logic.startSegmentation(node, model=tiny_model, samples=1, steps=1, device="cuda")
    try:
        assert job.wait(timeout=120, interval=0.2) == "failed", job.state
        with pytest.raises(CDALError) as info:
            logic.finishSegmentation(job)
    finally:
        job.cleanup()
    message = str(info.value)
    assert "no CUDA GPU" in message and "Device" in message and "--device" not in message, message
    assert scene_snapshot(app.scene) == before


def test_an_roi_created_but_never_placed_is_named_as_such(app, logic, tiny_model):
    """The ROI selector's "Create new" gives an ROI with no size until it is placed in a view."""
    node = _volume(app)
    roi = app.scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "new ROI")
    _expect_error(app, lambda: logic.segment(node, model=tiny_model, roiNode=roi), ["not been placed", "new ROI"])


@pytest.mark.parametrize("change", ["none", "harden", "voxels", "replace"])
def test_a_volume_changed_during_a_background_run_gets_no_results(app, logic, tiny_model, change):
    """The results of a background run belong to the voxels and grid it was given. A volume hardened, edited or
    replaced (a sequence frame, Crop Volume in place) before the run finished gets one line and no nodes; a
    volume only looked at (its range computed, shown with auto window/level) gets its results."""
    import vtk

    node = _volume(app)
    job = logic.startSegmentation(node, model=tiny_model, samples=1, steps=1, device="cpu")
    try:
        if change == "none":
            node.GetImageData().GetScalarRange()
            node.CreateDefaultDisplayNodes()
            node.GetDisplayNode().AutoWindowLevelOn()
        elif change == "harden":
            matrix = vtk.vtkMatrix4x4()
            node.GetIJKToRASMatrix(matrix)
            matrix.SetElement(0, 3, matrix.GetElement(0, 3) + 50.0)
            node.SetIJKToRASMatrix(matrix)
        elif change == "voxels":
            slicer.util.arrayFromVolume(node)[2] += 50.0
            slicer.util.arrayFromVolumeModified(node)
        else:
            slicer.util.updateVolumeFromArray(node, np.zeros((12, 20, 24), np.float32))
        assert job.wait(timeout=180, interval=0.2) == "done", (job.error, job.stderrLines[-3:])
        if change == "none":
            assert logic.finishSegmentation(job).segmentationNode is not None
        else:
            _expect_error(app, lambda: logic.finishSegmentation(job),
                          ["was changed while it was segmented", "segment it again"])
    finally:
        job.cleanup()


def test_a_full_disk_for_the_temporary_copy_is_one_line_and_leaves_nothing(app, logic, tiny_model, tmp_path,
                                                                           monkeypatch):
    """SimpleITK reports a full disk as a ten-line RuntimeError opening with its source path; the partial copy of
    the patient's image was left in the temporary folder."""
    import tempfile
    import SimpleITK as sitk

    def full_disk(image, path, *args):
        open(path, "wb").write(b"partial")
        raise RuntimeError("Exception thrown in SimpleITK ImageFileWriter_Execute: /tmp/SimpleITK-build/"
                           "itkNrrdImageIO.cxx:1349:\nITK ERROR: NrrdImageIO(0x55): Write: Error writing "
                           "input.nrrd:\n[nrrd] nrrdSave: No space left on device")

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(sitk, "WriteImage", full_disk)
    node = _volume(app, name="patient")
    message = _expect_error(app, lambda: logic.startSegmentation(node, model=tiny_model, samples=1, steps=1,
                                                                 device="cpu"),
                            ["temporary copy of patient", "TMPDIR", "No space left on device"])
    assert "itkNrrdImageIO.cxx" not in message
    assert not list(tmp_path.glob("cdal-segment-*"))


def test_the_worker_names_a_full_disk_and_the_fix():
    from CDALSegmentationLib.segment_worker import informativeLine
    full = RuntimeError("Exception thrown in SimpleITK ImageFileWriter_Execute: /src/itkNrrdImageIO.cxx:1349:\n"
                        "ITK ERROR: NrrdImageIO(0x5): Write: Error writing labels.nrrd:\n"
                        "[nrrd] nrrdSave: No space left on device")
    assert informativeLine(full) == "[nrrd] nrrdSave: No space left on device"
    other = RuntimeError("Exception thrown in SimpleITK ImageFileReader_Execute: /src/itkImageFileReader.hxx:12:\n"
                         "ITK ERROR: ImageFileReader(0x7): Could not create IO object for reading file x.nrrd")
    assert informativeLine(other).startswith("ITK ERROR") and "Could not create IO object" in informativeLine(other)
    assert informativeLine(RuntimeError("")) == "RuntimeError"


@pytest.mark.parametrize("defect, words", [("zero spacing", ["spacing of 1 x 0 x 2 mm", "Volume Information"]),
                                           ("singular", ["degenerate orientation", "Volume Information"]),
                                           ("no voxels", ["no image data", "load the image again"])])
def test_a_grid_no_resampling_can_use_is_refused_in_one_line(app, logic, tiny_model, defect, words):
    """Such headers gave a ten-line RuntimeError, a message full of "nan", or an AttributeError."""
    import vtk

    node = _volume(app)
    if defect == "zero spacing":
        node.SetSpacing(1.0, 0.0, 2.0)
    elif defect == "singular":
        directions = vtk.vtkMatrix4x4()
        directions.SetElement(1, 1, 0.0)
        directions.SetElement(0, 1, 1.0)  # the J axis points along I
        node.SetIJKToRASDirectionMatrix(directions)
    else:
        empty = vtk.vtkImageData()
        empty.SetDimensions(22, 20, 12)  # points, but no voxel values allocated
        node.SetAndObserveImageData(empty)
    _expect_error(app, lambda: logic.segment(node, model=tiny_model, samples=1, steps=1), words)


def _two_frame_series(app, shown):
    """A 4D series "cine" of two frames in a sequence browser showing frame ``shown`` (0-based) in its proxy
    volume: (the Sequences logic, the browser, the proxy volume)."""
    sequences = slicer.vtkSlicerSequencesLogic()
    sequences.SetMRMLScene(app.scene)
    sequence = app.scene.AddNewNodeByClass("vtkMRMLSequenceNode", "cine")
    for i in range(2):
        frame = _volume(app, name="frame%d" % i)
        sequence.SetDataNodeAtValue(frame, str(i))
        app.scene.RemoveNode(frame)
    browser = app.scene.AddNewNodeByClass("vtkMRMLSequenceBrowserNode", "browser")
    browser.SetAndObserveMasterSequenceNodeID(sequence.GetID())
    browser.SetSelectedItemNumber(shown)
    sequences.UpdateProxyNodesFromSequences(browser)
    return sequences, browser, browser.GetProxyNode(sequence)


def test_results_of_a_sequence_frame_say_which_frame(app, logic, tiny_model):
    """A 4D series' proxy volume shows one frame at a time: the outputs are named after the frame segmented."""
    _, _, proxy = _two_frame_series(app, shown=1)
    result = logic.segment(proxy, model=tiny_model, samples=1, steps=1)
    assert result.segmentationNode.GetName().startswith("%s frame 2 CDAL" % proxy.GetName())
    plain = logic.segment(_volume(app, name="still"), model=tiny_model, samples=1, steps=1)
    assert plain.segmentationNode.GetName().startswith("still CDAL")


def test_the_worker_reports_a_full_disk_as_one_error_event(app, tiny_model, tmp_path, monkeypatch, capsys):
    import json
    import SimpleITK as sitk
    from CDALSegmentationLib import segment_worker

    source = tmp_path / "input.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(np.random.default_rng(0).normal(100, 20, (12, 20, 22)).astype(np.float32)),
                    str(source))

    def full_disk(outputs, folder):
        raise RuntimeError("Exception thrown in SimpleITK ImageFileWriter_Execute: /src/itkNrrdImageIO.cxx:1349:\n"
                           "ITK ERROR: NrrdImageIO(0x5): Write: Error writing labels.nrrd:\n"
                           "[nrrd] nrrdSave: No space left on device")

    monkeypatch.setattr(segment_worker, "writeOutputs", full_disk)
    code = segment_worker.main(["--input", str(source), "--model", tiny_model, "--output-dir", str(tmp_path / "out"),
                                "--samples", "1", "--steps", "1", "--device", "cpu", "--localise", "off"])
    errors = [json.loads(line) for line in capsys.readouterr().out.splitlines() if '"error"' in line]
    assert code == 2 and len(errors) == 1
    assert "disk is full" in errors[0]["message"] and "No space left on device" in errors[0]["message"]
    assert "TMPDIR" in errors[0]["message"]


def test_a_sequence_browser_touched_during_a_run_still_gets_its_results(app, logic, tiny_model):
    """Sequences re-copy the frame into the proxy volume on any change of the browser (a playback setting, a scene
    save adding storage nodes): the voxel array is new, its values are not, so the results are kept."""
    sequences, browser, proxy = _two_frame_series(app, shown=0)
    job = logic.startSegmentation(proxy, model=tiny_model, samples=1, steps=1, device="cpu")
    try:
        browser.SetPlaybackRateFps(browser.GetPlaybackRateFps() + 1.0)
        sequences.UpdateProxyNodesFromSequences(browser)  # what the Sequences logic does on that change
        assert job.wait(timeout=180, interval=0.2) == "done", job.error
        assert logic.finishSegmentation(job).segmentationNode.GetName().startswith("%s frame 1" % proxy.GetName())
        job2 = logic.startSegmentation(proxy, model=tiny_model, samples=1, steps=1, device="cpu")
        browser.SetSelectedItemNumber(1)
        sequences.UpdateProxyNodesFromSequences(browser)
        assert job2.wait(timeout=180, interval=0.2) == "done", job2.error
        _expect_error(app, lambda: logic.finishSegmentation(job2), ["another frame", "segment it again"])
        job2.cleanup()
    finally:
        job.cleanup()
