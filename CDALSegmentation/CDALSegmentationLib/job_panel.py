"""One helper for the Segment and Fine-tune sections: start, progress, cancel, finish, abort.

It only sets plain properties of the widgets it is given (``button.text``/``enabled``, ``progressBar.value``,
``progressBar.setVisible``, ``statusLabel.text``), so it is the same code in desktop Slicer and in tests.
Progress arrives through ``job.listeners`` (qt.QProcess signals in Slicer), so no timer is needed.
"""


import time

# A click on the button this soon after it became "Cancel" is the second click of a double-click (or a click
# queued while the job was starting on the GUI thread), not a decision to cancel.
CANCEL_GRACE_SECONDS = 0.6


class JobPanel(object):
    def __init__(self, button, progressBar, statusLabel, idleText, cancelText="Cancel", onFinished=None,
                 onChanged=None):
        self.button, self.progressBar, self.statusLabel = button, progressBar, statusLabel
        self.idleText, self.cancelText = idleText, cancelText
        self.onFinished = onFinished  # onFinished(job) once, after done / failed / cancelled
        self.onChanged = onChanged  # onChanged() whenever running/idle flips (the widget updates its buttons)
        self.job = None
        self.startedAt = None
        self.clock = time.monotonic
        self.progressBar.setVisible(False)

    @property
    def running(self):
        return self.job is not None and self.job.running

    def start(self, job):
        """Show a started job's progress; a job that failed to start finishes at once."""
        self.job = job
        job.listeners.append(self._onJobChanged)
        self.progressBar.value = 0
        self.progressBar.setVisible(True)
        self.button.text = self.cancelText
        self.button.enabled = True
        self.startedAt = self.clock()
        self._onJobChanged(job)
        self._changed()

    def cancel(self):
        """User clicked Cancel: kill the child (returns at once), then finish normally. Returns whether it did:
        a click within ``CANCEL_GRACE_SECONDS`` of the start is ignored (a double-click on the start button)."""
        if not self.running or self.clock() - self.startedAt < CANCEL_GRACE_SECONDS:
            return False
        self.job.cancel()  # listeners -> _finish
        return True

    def abort(self):
        """The scene is closing: cancel, clean temporary files and reset the panel, without callbacks."""
        job, self.job = self.job, None
        if job is not None:
            job.listeners[:] = []
            job.cleanup()
        self._reset("")

    def _onJobChanged(self, job):
        if job is not self.job:
            return
        self.progressBar.value = int(round(100 * job.fraction))
        self.statusLabel.text = job.statusText()
        if job.finished:
            self._finish(job)

    def _finish(self, job):
        self.job = None
        job.listeners[:] = []
        self._reset(job.statusText())
        try:
            if self.onFinished is not None:
                self.onFinished(job)
        finally:
            job.cleanup()
            self._changed()

    def _reset(self, status):
        self.progressBar.setVisible(False)
        self.button.text = self.idleText
        self.statusLabel.text = status
        self._changed()

    def _changed(self):
        if self.onChanged is not None:
            self.onChanged()
