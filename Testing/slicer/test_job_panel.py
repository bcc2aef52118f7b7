"""The job panel shared by Segment and Fine-tune, and the dependency installer's guard (Qt-free pieces the
widget is built from; the widgets are stand-ins with the same plain properties)."""
import os

from CDALSegmentationLib.dependencies import DependencyInstaller
from CDALSegmentationLib.job_panel import JobPanel
from CDALSegmentationLib.logic import SegmentationJob

from fakes import FakeButton, FakeLabel, FakeProgressBar, FakeRunner


def _panel():
    finished, changes = [], []
    panel = JobPanel(FakeButton("Segment"), FakeProgressBar(), FakeLabel(), "Segment",
                     onFinished=finished.append, onChanged=lambda: changes.append(1))
    return panel, finished, changes


def _job(tmp_path):
    workDir = tmp_path / "cdal-segment-x"
    (workDir / "out").mkdir(parents=True)
    (workDir / "input.nrrd").write_bytes(b"patient image")
    return SegmentationJob(["python"], workDir=str(workDir), runnerFactory=FakeRunner).start()


def test_start_progress_finish(tmp_path):
    panel, finished, changes = _panel()
    assert not panel.progressBar.visible
    job = _job(tmp_path)
    panel.start(job)
    assert panel.running and panel.button.text == "Cancel" and panel.progressBar.visible
    job._runner.stdout(b'{"event": "progress", "fraction": 0.4, "message": "locating the hippocampi"}\n')
    assert panel.progressBar.value == 40 and panel.statusLabel.text.startswith("locating the hippocampi 40%")
    job._runner.stdout(b'{"event": "done", "seconds": 1.0}\n')
    (tmp_path / "cdal-segment-x" / "out" / "labels.nrrd").write_bytes(b"x")
    job._runner.finish(0)
    assert finished == [job] and job.state == "done"
    assert not panel.running and panel.button.text == "Segment" and not panel.progressBar.visible
    assert not os.path.exists(job.workDir), "the temp folder goes once the results are read"
    assert changes


def test_cancel_finishes_once_and_cleans_up(tmp_path):
    panel, finished, _ = _panel()
    now = [100.0]
    panel.clock = lambda: now[0]
    job = _job(tmp_path)
    panel.start(job)
    # the second click of a double-click on Segment arrives as the button turns into Cancel: not a cancel
    assert panel.cancel() is False and panel.running and job.state == "running" and finished == []
    now[0] += 1.0
    assert panel.cancel() is True
    assert finished == [job] and job.state == "cancelled" and job._runner.killed == 1
    assert not os.path.exists(job.workDir) and panel.button.text == "Segment"
    job._runner.finish(-9)  # QProcess's finished after the kill
    assert finished == [job]


def test_scene_close_mid_run_cleans_progress_and_temp_folder(tmp_path):
    panel, finished, _ = _panel()
    job = _job(tmp_path)
    panel.start(job)
    panel.abort()  # what the widget does on the scene's StartCloseEvent
    assert job.state == "cancelled" and job._runner.killed == 1
    assert not os.path.exists(job.workDir)
    assert not panel.progressBar.visible and panel.button.text == "Segment" and panel.statusLabel.text == ""
    assert finished == [], "no result handling for a scene that is going away"
    panel.abort()  # idempotent (module cleanup after a scene close)


def test_a_second_click_during_an_install_does_not_install_again():
    installs, busy = [], []
    state = {"missing": ["torch", "monai"]}

    def installTorch():
        installs.append("torch")
        # pip_install / installTorch pump Qt events: a second click arrives now
        assert installer.ensure() is False
        state["missing"] = ["monai"]

    def pipInstall(requirements):
        installs.append(requirements)
        state["missing"] = []

    installer = DependencyInstaller(confirm=lambda message: True, installTorch=installTorch, pipInstall=pipInstall,
                                    onBusyChanged=busy.append, missing=lambda: list(state["missing"]))
    assert installer.ensure() is True
    assert installs == ["torch", "monai"]
    assert busy == [True, False] and not installer.busy
    assert installer.ensure() is True and installs == ["torch", "monai"]


def test_declined_or_failed_install():
    installer = DependencyInstaller(confirm=lambda m: False, installTorch=None, pipInstall=None,
                                    missing=lambda: ["torch"])
    assert installer.ensure() is False

    def broken(requirements):
        raise RuntimeError("pip failed")

    installer = DependencyInstaller(confirm=lambda m: True, installTorch=lambda: None, pipInstall=broken,
                                    missing=lambda: ["monai"])
    try:
        installer.ensure()
    except RuntimeError:
        pass
    assert not installer.busy, "a failed install must not leave the buttons disabled"
    # an install that "succeeds" but leaves the package unimportable is reported, not a silent no-op
    from cdal_core.errors import CDALError
    installer = DependencyInstaller(confirm=lambda m: True, installTorch=lambda: None, pipInstall=lambda r: None,
                                    missing=lambda: ["monai"])
    try:
        installer.ensure()
        raise AssertionError("ensure() returned although monai is still missing")
    except CDALError as exc:
        assert "monai still cannot be imported" in str(exc) and "restart Slicer" in str(exc)
    assert not installer.busy
