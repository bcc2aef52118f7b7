"""User-facing errors: one line naming the problem and the fix, never a traceback."""


class CDALError(Exception):
    """A problem with the user's input, model or environment.

    The CLI prints ``str(error)`` on one line and exits with status 2; the Slicer module shows it in a dialog.
    Write the message as "<what is wrong>: <how to fix it>".
    """


class CancelledError(CDALError):
    """The user cancelled a running job."""
