"""One entry point for all tests.

* Desktop 3D Slicer:  ``Slicer --no-splash --python-script Testing/run_tests.py``
  registers the CDALSegmentation module from this source tree when it is not loaded yet, runs the desktop
  tests in Testing/desktop/desktop_tests.py (the widget, the background job over qt.QProcess), and exits with
  status 0 only if all pass.
* Plain Python:  ``python Testing/run_tests.py [extra pytest args]``
  runs pytest over Testing/ (cdal_core tests in Testing/core/, Slicer-module logic tests with PyPI's
  slicer-core in Testing/slicer/) and returns pytest's exit status. Giving a path (``python
  Testing/run_tests.py Testing/slicer``) runs only that part.
"""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
DESKTOP_TESTS_DIR = os.path.join(HERE, "desktop")
REPO = os.path.dirname(HERE)
MODULE_DIR = os.path.join(REPO, "CDALSegmentation")
MODULE_NAME = "CDALSegmentation"


def inDesktopSlicer():
    try:
        import slicer
    except ImportError:
        return False
    return hasattr(slicer, "app") and hasattr(slicer, "mrmlScene") and slicer.mrmlScene is not None


def runInSlicer():
    import unittest

    import qt
    import slicer

    if MODULE_DIR not in sys.path:
        sys.path.insert(0, MODULE_DIR)
    if not hasattr(slicer.modules, MODULE_NAME.lower()):
        # not on the module paths: register and load it from this source tree (as "Additional module paths")
        factoryManager = slicer.app.moduleManager().factoryManager()
        factoryManager.registerModule(qt.QFileInfo(os.path.join(MODULE_DIR, MODULE_NAME + ".py")))
        factoryManager.loadModules([MODULE_NAME])
        slicer.app.processEvents()
    if DESKTOP_TESTS_DIR not in sys.path:
        sys.path.insert(0, DESKTOP_TESTS_DIR)
    import desktop_tests

    suite = unittest.TestLoader().loadTestsFromModule(desktop_tests)
    result = unittest.TextTestRunner(verbosity=2, stream=sys.stdout).run(suite)
    ok = result.wasSuccessful() and result.testsRun > len(result.skipped)  # all skipped (no torch, no model): not a pass
    if result.skipped and len(result.skipped) == result.testsRun:
        print("every desktop test was skipped (%s): install what is missing, then run again" % result.skipped[0][1])
    print("CDALSegmentation desktop tests: %s (%d run, %d failures, %d errors, %d skipped)" % (
        "PASSED" if ok else "FAILED", result.testsRun, len(result.failures), len(result.errors),
        len(result.skipped)))
    sys.stdout.flush()
    slicer.util.exit(0 if ok else 1)


def runPytest(args):
    import pytest

    args = list(args)
    # default: the whole Testing/ folder; paths given on the command line (e.g. Testing/slicer) replace it
    targets = [] if any(os.path.exists(a.split("::")[0]) for a in args if not a.startswith("-")) else [HERE]
    return int(pytest.main(targets + ["-q"] + args))


if __name__ == "__main__":
    if inDesktopSlicer():
        try:
            runInSlicer()
        except SystemExit:
            raise
        except Exception:
            import traceback

            traceback.print_exc()
            import slicer

            slicer.util.exit(1)
    else:
        sys.exit(runPytest(sys.argv[1:]))
