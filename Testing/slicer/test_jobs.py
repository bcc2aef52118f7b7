"""The background job over the process-runner interface: a fake runner for what QProcess would deliver, and
the plain-Python runner against real child processes (bad bytes, full pipes, killing the process tree)."""
import json
import os
import sys
import time

import pytest

from CDALSegmentationLib.jobs import ProcessJob, pythonModuleCommand

from fakes import FailingRunner, FakeRunner


def _job(**kw):
    job = ProcessJob(["python", "-c", "pass"], name="test job", runnerFactory=FakeRunner, **kw)
    seen = []
    job.listeners.append(lambda j: seen.append((j.state, j.fraction, j.message)))
    return job.start(), seen


def _progress(fraction, message):
    return (json.dumps({"event": "progress", "fraction": fraction, "message": message}) + "\n").encode()


def test_progress_arrives_in_chunks_split_anywhere():
    job, seen = _job()
    line = _progress(0.25, "locating the hippocampi")
    job._runner.stdout(line[:7])
    assert job.fraction == 0.0 and not seen, "half a line must not be parsed"
    job._runner.stdout(line[7:] + _progress(0.5, "sampling")[:3])
    assert job.fraction == 0.25 and job.message == "locating the hippocampi"
    assert seen[-1] == ("running", 0.25, "locating the hippocampi")
    assert "locating the hippocampi 25%" in job.statusText()


def test_undecodable_bytes_are_replaced_not_fatal():
    job, _ = _job()
    job._runner.stderr(b"warning: caf\xe9 \xff\xfe broken\n")
    job._runner.stdout(b"\x80\x81 not json\n" + _progress(0.5, "still reading"))
    assert job.stderrLines == [u"warning: caf\ufffd \ufffd\ufffd broken"]
    assert job.message == "still reading"
    job._runner.finish(0)
    assert job.state == "done"


def test_exit_code_and_last_stderr_line_make_the_error():
    job, seen = _job()
    job._runner.stderr(b"Traceback ...\nRuntimeError: boom")  # no final newline: flushed at exit
    job._runner.finish(1)
    assert job.state == "failed" and job.error == "RuntimeError: boom"
    assert seen[-1][0] == "failed"


@pytest.mark.parametrize("exit_code", [-9, -1, 137])
def test_a_child_killed_from_outside_is_named_as_such_not_by_its_last_warning(exit_code):
    """The out-of-memory killer (-9 from subprocess, -1 from the Qt runner's crash exit, 137 through a launcher)
    leaves no error event; the last stderr line is an unrelated warning, so it must not become the message."""
    job, _ = _job()
    job._runner.stderr(b"UserWarning: TypedStorage is deprecated\n")
    job._runner.finish(exit_code)
    assert job.state == "failed"
    assert "stopped from outside" in job.error and "out of memory" in job.error and "Warning" not in job.error
    assert job.stderrLines == ["UserWarning: TypedStorage is deprecated"]  # the log keeps it


def test_error_event_wins_over_stderr():
    job, _ = _job()
    job._runner.stdout(b'{"event": "error", "message": "GPU out of memory: choose Device CPU"}\n')
    job._runner.stderr(b"noise\n")
    job._runner.finish(2)
    assert job.error.startswith("GPU out of memory")


def test_cancel_kills_once_returns_at_once_and_ignores_late_output():
    job, seen = _job()
    started = time.time()
    job.cancel()
    assert time.time() - started < 0.1
    assert job.state == "cancelled" and job._runner.killed == 1 and seen[-1][0] == "cancelled"
    job._runner.stdout(_progress(0.9, "late"))
    job._runner.finish(-9)
    job.cancel()
    assert job.state == "cancelled" and job.message == "Cancelled" and job._runner.killed == 1


def test_logs_are_bounded():
    job, _ = _job()
    job._runner.stderr(b"".join(b"line %d\n" % i for i in range(5000)))
    assert len(job.stderrLines) <= 400 and job.stderrLines[-1] == "line 4999"


def test_a_program_that_cannot_start_fails_cleanly():
    job = ProcessJob(["/no/such/python"], name="test job", runnerFactory=FailingRunner).start()
    assert job.state == "failed" and "could not start" in job.error


# ---- the plain-Python runner against real child processes -------------------------------------------------
def _python_job(code, timeout=60):
    job = ProcessJob([sys.executable, "-c", code], name="child")
    job.start()
    job.wait(timeout=timeout, interval=0.05)
    return job


def test_real_child_flooding_both_pipes_with_bad_bytes_does_not_hang():
    code = ("import sys, json\n"
            "for i in range(2000):\n"
            "    sys.stderr.buffer.write(b'\\xff' * 600 + b'\\n')\n"
            "    sys.stdout.buffer.write(b'\\xfe junk ' * 50 + b'\\n')\n"
            "sys.stdout.write(json.dumps({'event': 'progress', 'fraction': 0.5, 'message': 'half'}) + '\\n')\n")
    job = _python_job(code)
    assert job.state == "done", (job.state, job.error)
    assert job.message.startswith("Done") and job.fraction == 1.0
    assert "half" in [e.get("message") for e in job.events]
    assert u"\ufffd" in job.stderrLines[-1]


@pytest.mark.skipif(os.name == "nt", reason="process groups are POSIX")
def test_cancel_kills_the_whole_process_tree(tmp_path):
    """pythonModuleCommand makes the child a process-group leader, so grandchildren die with it."""
    pidFile = tmp_path / "grandchild.pid"
    script = tmp_path / "spawner.py"
    script.write_text("import subprocess, sys, time\n"
                      "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
                      "open(%r, 'w').write(str(p.pid))\n"
                      "print('{\"event\": \"progress\", \"fraction\": 0.1}', flush=True)\n"
                      "time.sleep(60)\n" % str(pidFile))
    sys.path.insert(0, str(tmp_path))
    try:
        job = ProcessJob(pythonModuleCommand("spawner", []), name="tree")
        job.env = dict(os.environ, PYTHONPATH=str(tmp_path))
        job.start()
        deadline = time.time() + 30
        while job.fraction < 0.1 and time.time() < deadline:
            job.poll()
            time.sleep(0.05)
        assert pidFile.exists(), job.stderrLines[-5:]
        grandchild = int(pidFile.read_text())
        started = time.time()
        job.cancel()
        assert time.time() - started < 0.5, "cancel must not wait for the child"
        deadline = time.time() + 10
        while time.time() < deadline:
            job._runner._process.poll()  # reap the child (Qt does this itself)
            try:
                os.kill(grandchild, 0)
                with open("/proc/%d/stat" % grandchild) as f:
                    if f.read().split()[2] == "Z":
                        break  # a zombie waiting for init: dead
            except (OSError, IOError):
                break
            time.sleep(0.05)
        else:
            pytest.fail("grandchild %d survived the cancel" % grandchild)
        assert job.state == "cancelled"
    finally:
        sys.path.remove(str(tmp_path))


def test_a_folder_a_dying_child_still_holds_is_removed_at_the_next_chance(tmp_path, monkeypatch):
    """On Windows taskkill is not waited for, so a job's copy of the patient's image may still be open when the
    job cleans up: that folder is retried at the next removal (and when Slicer exits)."""
    import shutil
    from CDALSegmentationLib import jobs
    held, other = tmp_path / "held", tmp_path / "other"
    for folder in (held, other):
        folder.mkdir()
        (folder / "input.nrrd").write_bytes(b"patient")
    real = shutil.rmtree
    monkeypatch.setattr(jobs.shutil, "rmtree", lambda *a, **k: None)   # the child still holds the files
    jobs.removeTree(str(held))
    assert held.is_dir() and str(held) in jobs._pendingRemovals
    monkeypatch.setattr(jobs.shutil, "rmtree", real)                    # the child is gone
    jobs.removeTree(str(other))
    assert not held.exists() and not other.exists() and jobs._pendingRemovals == []
