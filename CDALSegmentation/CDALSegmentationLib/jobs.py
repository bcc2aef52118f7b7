"""Background work in a child process that reports JSON lines on stdout (no Qt, no threads touching MRML).

A ``ProcessJob`` talks to its child through a small *process runner* interface, so that the same job code runs
on ``qt.QProcess`` in desktop Slicer (``qt_process.QtProcessRunner``: output arrives through its signals, since
Slicer's main loop does not let Python threads run while Qt idles), on ``subprocess`` in plain Python
(``SubprocessRunner``, for scripts and tests) and on a fake in tests. A runner provides::

    runner.onStdout(data: bytes), runner.onStderr(data: bytes), runner.onFinished(exitCode)  # set by the job
    runner.start(program, args, env, cwd)   # OSError when the program cannot start
    runner.pid                               # int or None
    runner.kill()                            # kill the whole process tree now, without waiting
    runner.pump()                            # deliver pending output (QProcess: nothing, Qt's loop does it)

The job decodes complete lines as UTF-8 (bad bytes replaced), keeps bounded logs, and tells ``listeners``
(callables taking the job) after every change.
"""
import atexit
import json
import os
import queue
import shutil
import signal
import subprocess
import threading
import time

IDLE, RUNNING, DONE, FAILED, CANCELLED = "idle", "running", "done", "failed", "cancelled"
MAX_LOG_LINES = 400


def killProcessTree(pid):
    """Kill a child and everything it started, now (never waits: cancelling must not block the GUI).

    POSIX: the child leads its own process group (``pythonModuleCommand`` calls ``os.setsid``), so the group
    is killed; Windows: ``taskkill /T`` is started and left to finish on its own.
    """
    if not pid:
        return
    try:
        if os.name == "nt":
            subprocess.Popen(["taskkill", "/F", "/T", "/PID", str(pid)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, creationflags=getattr(subprocess, "CREATE_NO_WINDOW", 0))
        elif os.getpgid(pid) == pid:
            os.killpg(pid, signal.SIGKILL)
        else:
            os.kill(pid, signal.SIGKILL)
    except (OSError, ValueError):
        pass  # already gone


# Folders a child being killed still held open (Windows: taskkill is not waited for), retried at the next
# removal and when Slicer exits: they hold copies of a patient's images
_pendingRemovals = []


def removeTree(path):
    """Delete a job's temporary folder now, or as soon as a dying child lets go of its files."""
    for folder in [path] + _pendingRemovals:
        if folder and os.path.isdir(folder):
            shutil.rmtree(folder, ignore_errors=True)
    _pendingRemovals[:] = sorted(set(f for f in [path] + _pendingRemovals if f and os.path.isdir(f)))


atexit.register(lambda: [shutil.rmtree(f, ignore_errors=True) for f in _pendingRemovals])


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


def killedFromOutside(exitCode):
    """Exit codes of a child killed by a signal: negative from subprocess (-9: SIGKILL, the out-of-memory killer),
    -1 from the Qt runner for a crash, 128 + signal through a shell or launcher (137: SIGKILL, 139: SIGSEGV)."""
    return exitCode is not None and (int(exitCode) < 0 or int(exitCode) in (134, 137, 139))


class SubprocessRunner(object):
    """Process runner on ``subprocess`` for plain Python: reader threads move raw bytes into a queue (so a
    chatty child never blocks on a full pipe); ``pump()`` hands them to the job on the calling thread."""

    def __init__(self):
        self.onStdout = self.onStderr = self.onFinished = None
        self._process = None
        self._queue = queue.Queue()
        self._openStreams = 0
        self._finished = False

    @property
    def pid(self):
        return self._process.pid if self._process is not None else None

    def start(self, program, args, env=None, cwd=None):
        kwargs = dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=env, cwd=cwd)
        if os.name == "nt":
            kwargs["creationflags"] = getattr(subprocess, "CREATE_NO_WINDOW", 0)
        else:
            kwargs["start_new_session"] = True
        self._process = subprocess.Popen([program] + list(args), **kwargs)
        for stream, tag in ((self._process.stdout, "out"), (self._process.stderr, "err")):
            thread = threading.Thread(target=self._read, args=(stream, tag))
            thread.daemon = True
            thread.start()
            self._openStreams += 1

    def _read(self, stream, tag):
        try:
            for chunk in iter(lambda: stream.read1(65536) if hasattr(stream, "read1") else stream.read(4096), b""):
                self._queue.put((tag, chunk))
        except (OSError, ValueError):
            pass
        self._queue.put((tag, None))

    def pump(self):
        while True:
            try:
                tag, chunk = self._queue.get_nowait()
            except queue.Empty:
                break
            if chunk is None:
                self._openStreams -= 1
            elif tag == "out":
                self.onStdout(chunk)
            else:
                self.onStderr(chunk)
        if not self._finished and self._openStreams == 0 and self._process.poll() is not None:
            self._finished = True
            self.onFinished(self._process.returncode)

    def kill(self):
        if self._process is not None and self._process.poll() is None:
            killProcessTree(self._process.pid)


class _LineSplitter(object):
    """Bytes in, complete UTF-8 lines out (undecodable bytes replaced, never an exception)."""

    def __init__(self):
        self._pending = b""

    def feed(self, data):
        self._pending += data
        *lines, self._pending = self._pending.split(b"\n")
        return [self._decode(line) for line in lines]

    def flush(self):
        rest, self._pending = self._pending, b""
        return [self._decode(rest)] if rest else []

    @staticmethod
    def _decode(line):
        return line.decode("utf-8", errors="replace").rstrip("\r")


class ProcessJob(object):
    """A child process reporting JSON-lines progress: ``{"event": "progress", "fraction": f, "message": m}``."""

    def __init__(self, command, env=None, cwd=None, name="job", runnerFactory=None):
        self.command = [str(c) for c in command]
        self.env = env
        self.cwd = cwd
        self.name = name
        self.runnerFactory = runnerFactory or SubprocessRunner
        self.state = IDLE
        self.fraction = 0.0
        self.message = ""
        self.etaSeconds = None  # type: Optional[float]
        self.error = ""
        self.events = []  # type: List[Dict]
        self.stderrLines = []  # type: List[str]
        self.logLines = []  # type: List[str]
        self.listeners = []  # type: List[Callable]
        self.startTime = None  # type: Optional[float]
        self.endTime = None  # type: Optional[float]
        self._etaReference = None
        self._runner = None
        self._stdout = _LineSplitter()
        self._stderr = _LineSplitter()

    # ---- life cycle -------------------------------------------------------------------------------------
    def start(self):
        self._runner = self.runnerFactory()
        self._runner.onStdout = lambda data: self._lines(self._stdout.feed(data), self._handleStdout)
        self._runner.onStderr = lambda data: self._lines(self._stderr.feed(data), self._handleStderr)
        self._runner.onFinished = self._onFinished
        self.startTime = time.time()
        self.state = RUNNING
        self.message = "Starting..."
        try:
            self._runner.start(self.command[0], self.command[1:], self.env, self.cwd)
        except OSError as exc:
            self.state, self.message = FAILED, "Failed"
            self.error = "could not start %s (%s)" % (self.name, exc)
        return self

    @property
    def pid(self):
        return self._runner.pid if self._runner is not None else None

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
        """Deliver pending output (plain-Python runner) and return the state."""
        if self._runner is not None and self.state == RUNNING:
            self._runner.pump()
        return self.state

    def wait(self, timeout=None, interval=0.2, callback=None):
        """Block until finished (scripts and tests only, never the GUI); ``callback(job)`` after each poll."""
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
        """Kill the child's process tree and mark the job cancelled; returns at once."""
        if self.state != RUNNING:
            return
        self._runner.kill()
        self.endTime = time.time()
        self.state = CANCELLED
        self.message = "Cancelled"
        self.onCancelled()
        self._notify()

    # ---- output handling ---------------------------------------------------------------------------------
    def _lines(self, lines, handler):
        if self.state != RUNNING or not lines:
            return  # a cancelled child's last words change nothing; half a line waits for the rest
        for line in lines:
            handler(line)
        self._notify()

    def _handleStderr(self, line):
        self._append(self.stderrLines, line)
        self._append(self.logLines, line)

    @staticmethod
    def _append(lines, line):
        lines.append(line)
        if len(lines) > MAX_LOG_LINES:
            del lines[:len(lines) - MAX_LOG_LINES]

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
        self._append(self.logLines, line)

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

    def _onFinished(self, exitCode):
        if self.state != RUNNING:
            return
        self._lines(self._stdout.flush(), self._handleStdout)
        self._lines(self._stderr.flush(), self._handleStderr)
        self.endTime = time.time()
        if exitCode == 0 and self.succeeded():
            self.fraction, self.etaSeconds = 1.0, 0.0
            self.state = DONE
            self.message = "Done in %s" % formatDuration(self.elapsedSeconds())
            self.onDone()
        else:
            if not self.error and killedFromOutside(exitCode):
                # no error event: the child never reached its own handlers (the out-of-memory killer, a crash);
                # its last stderr line is then an unrelated warning at best (the whole log stays in stderrLines)
                self.error = ("%s was stopped from outside before it finished (exit code %s), most often because "
                              "the computer ran out of memory: close other programs, or give it less to do (a "
                              "smaller region or fewer samples), and run again" % (self.name.capitalize(), exitCode))
            if not self.error:
                lines = [l for l in self.stderrLines if l.strip()]
                self.error = lines[-1].strip() if lines else "%s exited with code %s" % (self.name, exitCode)
            self.state = FAILED
            self.message = "Failed"
            self.onFailed()
        self._notify()

    def _notify(self):
        for listener in list(self.listeners):
            listener(self)

    # ---- hooks -------------------------------------------------------------------------------------------
    def succeeded(self):
        return True

    def onDone(self):
        pass

    def onFailed(self):
        pass

    def onCancelled(self):
        pass

    def cleanup(self):
        """Remove temporary files (subclasses); cancels a running job first."""
        self.cancel()

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
    Slicer's ``PythonSlicer`` launcher sets its own PYTHONPATH. The child first leads a new process group
    (POSIX) so that cancelling kills everything it starts.
    """
    from .paths import MODULE_DIR, findCoreParent, pythonExecutable

    paths = [p for p in (findCoreParent(), MODULE_DIR) if p]
    bootstrap = ("import os, sys, runpy\n"
                 "try:\n    os.setsid()\nexcept (AttributeError, OSError):\n    pass\n"
                 "sys.path[:0] = %r; sys.argv[0] = %r\n"
                 "runpy.run_module(%r, run_name='__main__', alter_sys=True)" % (paths, module, module))
    return [python or pythonExecutable(), "-c", bootstrap] + [str(a) for a in args]
