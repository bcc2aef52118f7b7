"""Background work in a child process, polled from the GUI (no Qt, no threads touching MRML).

A job starts a Python child process that prints one JSON object per line on stdout. Two small reader threads
move lines into a queue; ``poll()`` (called from the GUI thread, e.g. by a qt.QTimer) drains the queue and
updates ``state``, ``fraction``, ``message`` and ``etaSeconds``. ``cancel()`` kills the whole process tree.
"""
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from typing import Dict, List, Optional

IDLE, RUNNING, DONE, FAILED, CANCELLED = "idle", "running", "done", "failed", "cancelled"


def killProcessTree(process, timeout=5.0):
    """Terminate a child process and everything it started (POSIX: its process group; Windows: taskkill /T)."""
    if process is None or process.poll() is not None:
        return
    try:
        if os.name == "nt":
            subprocess.call(["taskkill", "/F", "/T", "/PID", str(process.pid)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        else:
            try:
                os.killpg(process.pid, signal.SIGTERM)
            except (ProcessLookupError, PermissionError):
                process.terminate()
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(process.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    process.kill()
        process.wait(timeout=timeout)
    except Exception:  # never let cleanup raise into the GUI
        try:
            process.kill()
        except Exception:
            pass


def formatDuration(seconds):
    # type: (Optional[float]) -> str
    if seconds is None or seconds != seconds or seconds < 0:
        return ""
    seconds = int(round(seconds))
    if seconds < 60:
        return "%d s" % seconds
    if seconds < 3600:
        return "%d min %02d s" % (seconds // 60, seconds % 60)
    return "%d h %02d min" % (seconds // 3600, (seconds % 3600) // 60)


class ProcessJob(object):
    """A child process reporting JSON-lines progress."""

    def __init__(self, command, env=None, cwd=None, name="job"):
        self.command = list(command)
        self.env = env
        self.cwd = cwd
        self.name = name
        self.state = IDLE
        self.fraction = 0.0
        self.message = ""
        self.etaSeconds = None  # type: Optional[float]
        self.error = ""
        self.events = []  # type: List[Dict]
        self.stderrLines = []  # type: List[str]
        self.logLines = []  # type: List[str]
        self.startTime = None  # type: Optional[float]
        self.endTime = None  # type: Optional[float]
        self._etaReference = None
        self._process = None
        self._queue = queue.Queue()
        self._threads = []

    # ---- life cycle -------------------------------------------------------------------------------------
    def start(self):
        kwargs = dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                      env=self.env, cwd=self.cwd, universal_newlines=True, bufsize=1)
        if os.name == "nt":
            kwargs["creationflags"] = getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0) | getattr(
                subprocess, "CREATE_NO_WINDOW", 0)
        else:
            kwargs["start_new_session"] = True  # own process group: cancel kills all children
        self.startTime = time.time()
        self._process = subprocess.Popen(self.command, **kwargs)
        self.state = RUNNING
        self.message = "Starting..."
        for stream, tag in ((self._process.stdout, "out"), (self._process.stderr, "err")):
            t = threading.Thread(target=self._reader, args=(stream, tag), name="%s-%s" % (self.name, tag))
            t.daemon = True
            t.start()
            self._threads.append(t)
        return self

    def _reader(self, stream, tag):
        try:
            for line in iter(stream.readline, ""):
                self._queue.put((tag, line.rstrip("\r\n")))
        except (ValueError, OSError):
            pass
        finally:
            self._queue.put((tag, None))

    @property
    def pid(self):
        return self._process.pid if self._process is not None else None

    @property
    def running(self):
        return self.state == RUNNING

    @property
    def finished(self):
        return self.state in (DONE, FAILED, CANCELLED)

    def elapsedSeconds(self):
        if self.startTime is None:
            return 0.0
        return (self.endTime or time.time()) - self.startTime

    def poll(self):
        """Process pending output; returns the state. Call regularly from the GUI thread."""
        closed = 0
        while True:
            try:
                tag, line = self._queue.get_nowait()
            except queue.Empty:
                break
            if line is None:
                closed += 1
                continue
            if tag == "out":
                self._handleStdout(line)
            else:
                self.stderrLines.append(line)
                self.logLines.append(line)
        if self.state == RUNNING and self._process is not None and self._process.poll() is not None:
            # process ended: drain whatever the readers still hold
            for t in self._threads:
                t.join(timeout=2.0)
            while True:
                try:
                    tag, line = self._queue.get_nowait()
                except queue.Empty:
                    break
                if line is None:
                    continue
                if tag == "out":
                    self._handleStdout(line)
                else:
                    self.stderrLines.append(line)
                    self.logLines.append(line)
            self.endTime = time.time()
            self._processEnded(self._process.returncode)
        return self.state

    def wait(self, timeout=None, interval=0.2, callback=None):
        """Block until finished (for scripts and tests); ``callback(job)`` after each poll."""
        deadline = None if timeout is None else time.time() + timeout
        while True:
            self.poll()
            if callback is not None:
                callback(self)
            if self.finished:
                return self.state
            if deadline is not None and time.time() > deadline:
                self.cancel()
                self.error = "%s did not finish within %g s" % (self.name, timeout)
                return self.state
            time.sleep(interval)

    def cancel(self):
        if self.state != RUNNING:
            return
        killProcessTree(self._process)
        self.endTime = time.time()
        self.state = CANCELLED
        self.message = "Cancelled"
        self.onCancelled()

    # ---- output handling ---------------------------------------------------------------------------------
    def _handleStdout(self, line):
        stripped = line.strip()
        if stripped.startswith("{"):
            try:
                event = json.loads(stripped)
            except ValueError:
                event = None
            if isinstance(event, dict):
                self.events.append(event)
                self.handleEvent(event)
                return
        self.logLines.append(line)

    def handleEvent(self, event):
        kind = event.get("event")
        if kind == "progress":
            if "fraction" in event:
                self.fraction = float(event["fraction"])
            if event.get("message"):
                self.message = str(event["message"])
            if event.get("eta_seconds") is not None:
                self.etaSeconds = float(event["eta_seconds"])
            else:
                self.etaSeconds = self._estimateEta()
        elif kind == "error":
            self.error = str(event.get("message", ""))

    def _estimateEta(self):
        # rate measured from the first progress report on (start-up such as model loading is excluded)
        now = time.time()
        if self._etaReference is None:
            self._etaReference = (now, self.fraction)
            return None
        t0, f0 = self._etaReference
        if self.fraction - f0 <= 0.01 or now - t0 < 0.5:
            return None
        return (now - t0) * (1.0 - self.fraction) / (self.fraction - f0)

    def _processEnded(self, returncode):
        if self.state != RUNNING:
            return
        if returncode == 0 and self.succeeded():
            self.fraction = 1.0
            self.etaSeconds = 0.0
            self.state = DONE
            self.message = "Done in %s" % formatDuration(self.elapsedSeconds())
            self.onDone()
        else:
            if not self.error:
                lines = [l for l in self.stderrLines if l.strip()]
                self.error = lines[-1].strip() if lines else "%s exited with code %s" % (self.name, returncode)
            self.state = FAILED
            self.message = "Failed"
            self.onFailed()

    # ---- hooks -------------------------------------------------------------------------------------------
    def succeeded(self):
        return True

    def onDone(self):
        pass

    def onFailed(self):
        pass

    def onCancelled(self):
        pass

    def statusText(self):
        """One line for a status label: message, percent and ETA."""
        if self.state == RUNNING:
            text = "%s %d%%" % (self.message, int(round(100 * self.fraction)))
            eta = formatDuration(self.etaSeconds)
            if eta:
                text += " - about %s left" % eta
            return text
        if self.state == FAILED:
            return "Failed: %s" % self.error
        return self.message


def pythonModuleCommand(module, args, python=None):
    """Command running ``python -m module args`` with ``cdal_core`` and this library importable.

    The paths are put on ``sys.path`` by a ``-c`` bootstrap rather than only through PYTHONPATH, because
    Slicer's ``PythonSlicer`` launcher sets its own PYTHONPATH.
    """
    from .paths import MODULE_DIR, findCoreParent, pythonExecutable

    paths = [p for p in (findCoreParent(), MODULE_DIR) if p]
    bootstrap = ("import sys, runpy; sys.path[:0] = %r; sys.argv[0] = %r; "
                 "runpy.run_module(%r, run_name='__main__', alter_sys=True)" % (paths, module, module))
    return [python or pythonExecutable(), "-c", bootstrap] + [str(a) for a in args]
