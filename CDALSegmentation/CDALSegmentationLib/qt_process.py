"""The process runner of desktop Slicer: ``qt.QProcess`` (see ``jobs.py`` for the runner interface).

Slicer's main loop does not release the GIL while Qt idles, so Python reader threads would stall; QProcess
reads the child's pipes inside Qt's event loop and tells us through ``readyReadStandardOutput`` /
``readyReadStandardError`` / ``finished`` (as SlicerNNUnet runs nnU-Net). Only the widget imports this file.
"""
import os
import subprocess
import weakref

import qt

from .jobs import killProcessTree


def childProcessIDs(pid):
    """Direct children of ``pid`` on POSIX (Linux: /proc, macOS: pgrep); [] on Windows or when unknown."""
    if not pid or os.name == "nt":
        return []
    if os.path.isdir("/proc/self"):
        children = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open("/proc/%s/stat" % entry) as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:  # field 4: parent pid
                        children.append(int(entry))
            except (OSError, ValueError, IndexError):
                pass
        return children
    try:
        out = subprocess.run(["pgrep", "-P", str(pid)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                             timeout=2).stdout
        return [int(p) for p in out.split()]
    except (OSError, ValueError, subprocess.SubprocessError):
        return []


# runners killed but not yet reported finished: Cancel drops its job at once, and a QProcess freed before its
# child's exit is seen would make Qt wait for it on the GUI thread ("Destroyed while process is still running")
_killedRunners = set()


def _call(runnerRef, method, *args):
    """Call ``method`` of the runner behind the weak reference, if it still exists."""
    runner = runnerRef()
    if runner is not None:
        getattr(runner, method)(*args)


class QtProcessRunner(object):
    def __init__(self):
        self.onStdout = self.onStderr = self.onFinished = None
        self.process = qt.QProcess()
        self.process.setProcessChannelMode(qt.QProcess.SeparateChannels)
        # PythonQt's signal receiver (a C++ child of the QProcess) keeps its Python callables alive, and Python's
        # collector cannot see that reference: a bound method here would make runner -> QProcess -> receiver ->
        # runner -> job a cycle that is never freed, keeping every finished job and its log. The slots hold the
        # runner weakly instead, so a finished job, its runner and its QProcess go when the widget drops the job.
        me = weakref.ref(self)
        self.process.connect("readyReadStandardOutput()", lambda: _call(me, "_readStdout"))
        self.process.connect("readyReadStandardError()", lambda: _call(me, "_readStderr"))
        self.process.connect("finished(int,QProcess::ExitStatus)",
                             lambda exitCode, exitStatus: _call(me, "_finished", exitCode, exitStatus))
        self.process.connect("errorOccurred(QProcess::ProcessError)", lambda error: _call(me, "_error", error))
        self._done = False

    @property
    def pid(self):
        pid = self.process.processId()
        return int(pid) if pid else None

    def start(self, program, args, env=None, cwd=None):
        if env is not None:
            environment = qt.QProcessEnvironment()
            for key, value in env.items():
                environment.insert(str(key), str(value))
            self.process.setProcessEnvironment(environment)
        if cwd:
            self.process.setWorkingDirectory(cwd)
        self.process.start(program, list(args))

    def _readStdout(self):
        self.onStdout(bytes(self.process.readAllStandardOutput().data()))

    def _readStderr(self):
        self.onStderr(bytes(self.process.readAllStandardError().data()))

    def _finished(self, exitCode, exitStatus=None):
        _killedRunners.discard(self)
        if self._done:
            return
        self._done = True
        self._readStdout()
        self._readStderr()
        crashed = exitStatus == qt.QProcess.CrashExit
        self.onFinished(-1 if crashed else int(exitCode))

    def _error(self, error):
        if error != qt.QProcess.FailedToStart:
            return
        _killedRunners.discard(self)
        if not self._done:
            self._done = True
            self.onStderr(("could not start %s: %s\n" % (self.process.program(), self.process.errorString()))
                          .encode("utf-8"))
            self.onFinished(-1)

    def pump(self):
        pass  # Qt's event loop delivers the signals

    def kill(self):
        if self.process.state() != qt.QProcess.NotRunning:
            _killedRunners.add(self)  # until its finished signal
            # PythonSlicer is a launcher running python-real as its child (CTKAppLauncher: Base/ctkAppLauncher.cpp,
            # runProcess), and that child leads its own process group (os.setsid): kill the children's trees first,
            # or killing the launcher alone leaves the worker running
            for child in childProcessIDs(self.pid):
                killProcessTree(child)
            killProcessTree(self.pid)
