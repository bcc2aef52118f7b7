"""Locating the ``cdal_core`` package and the shipped models.

The module is used from three layouts:

* source tree (desktop Slicer "Additional module paths" pointing at ``<repo>/CDALSegmentation``, or tests):
  ``<repo>/cdal_core`` and ``<repo>/Resources/Models``;
* Slicer build/install tree: ``<qt-scripted-modules>/cdal_core`` next to ``CDALSegmentation.py`` and
  ``<qt-scripted-modules>/Resources/Models``;
* ``cdal_core`` installed into Slicer's Python (pip) — then nothing needs to be added.
"""
import os
import sys

MODULE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # .../CDALSegmentation


def candidateCoreParents():
    # type: () -> List[str]
    """Folders that may contain the ``cdal_core`` package, most specific first."""
    return [
        MODULE_DIR,  # installed: qt-scripted-modules/cdal_core
        os.path.dirname(MODULE_DIR),  # source tree: <repo>/cdal_core
    ]


def findCoreParent():
    # type: () -> Optional[str]
    for parent in candidateCoreParents():
        if os.path.isfile(os.path.join(parent, "cdal_core", "__init__.py")) or os.path.isdir(
            os.path.join(parent, "cdal_core")
        ):
            return parent
    return None


def ensureCoreOnPath():
    # type: () -> Optional[str]
    """Put the folder holding ``cdal_core`` on ``sys.path`` (idempotent). Returns that folder or None."""
    parent = findCoreParent()
    if parent and parent not in sys.path:
        sys.path.insert(0, parent)
    return parent


def subprocessEnvironment(baseEnvironment=None):
    """Environment for child Python processes: ``cdal_core`` and this library importable."""
    env = dict(os.environ if baseEnvironment is None else baseEnvironment)
    extra = [p for p in (findCoreParent(), MODULE_DIR) if p]
    old = env.get("PYTHONPATH", "")
    env["PYTHONPATH"] = os.pathsep.join(extra + ([old] if old else []))
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def pythonExecutable():
    # type: () -> str
    """The Python interpreter for child processes (``PythonSlicer`` inside desktop Slicer)."""
    import shutil

    exe = sys.executable or "python"
    try:
        import slicer  # noqa: F401

        inSlicerApp = hasattr(slicer, "app")
    except ImportError:
        inSlicerApp = False
    if inSlicerApp:
        found = shutil.which("PythonSlicer")
        if not found:
            candidate = os.path.join(os.path.dirname(exe), "PythonSlicer" + (".exe" if os.name == "nt" else ""))
            if os.path.isfile(candidate):
                found = candidate
        if found:
            return found
    return exe
