"""Stand-ins for the Qt pieces the Qt-free helpers drive: a process runner (jobs.py interface) and widgets
with the plain properties JobPanel sets. Not a fake ``slicer``: MRML always comes from slicer-core."""


class FakeRunner(object):
    """Records calls; the test pushes output and the exit code as qt.QProcess's signals would."""

    instances = []

    def __init__(self):
        self.onStdout = self.onStderr = self.onFinished = None
        self.started = None
        self.killed = 0
        self.pid = 4242
        FakeRunner.instances.append(self)

    def start(self, program, args, env=None, cwd=None):
        self.started = (program, list(args), env, cwd)

    def pump(self):
        pass

    def kill(self):
        self.killed += 1

    # test side
    def stdout(self, data):
        self.onStdout(data)

    def stderr(self, data):
        self.onStderr(data)

    def finish(self, code=0):
        self.onFinished(code)


class FailingRunner(FakeRunner):
    def start(self, program, args, env=None, cwd=None):
        raise OSError("No such file or directory: %r" % program)


class FakeButton(object):
    def __init__(self, text=""):
        self.text, self.enabled = text, True


class FakeProgressBar(object):
    def __init__(self):
        self.value, self.visible = 0, True

    def setVisible(self, visible):
        self.visible = visible


class FakeLabel(object):
    def __init__(self):
        self.text = ""
