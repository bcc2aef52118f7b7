"""Python packages the module needs, installed only after the user agrees, and never twice at once.

``slicer.util.pip_install`` and PyTorchUtils' ``installTorch`` pump Qt events while they run, so a second click
on Segment could start a second install: ``DependencyInstaller.busy`` is true meanwhile (the widget disables its
buttons) and a re-entrant ``ensure`` returns False at once.
"""
import importlib.util

#: (import name, pip name): cdal_core's requirements (pyproject.toml) that Slicer does not ship (it has numpy and
#: SimpleITK). nibabel reads NIfTI training data in Fine-tune's validation.
REQUIRED_PACKAGES = [("torch", None), ("monai", "monai"), ("safetensors", "safetensors"), ("tqdm", "tqdm"),
                     ("nibabel", "nibabel")]


def missingPackages(findSpec=importlib.util.find_spec):
    return [name for name, _ in REQUIRED_PACKAGES if findSpec(name) is None]


class DependencyInstaller(object):
    """``ensure()``: True when everything imports, else ask, install, re-check.

    ``confirm(message) -> bool``, ``installTorch()``, ``pipInstall(requirements)`` and ``onBusyChanged(busy)``
    are injected (desktop Slicer: slicer.util dialogs, PyTorchUtils, slicer.util.pip_install).
    """

    def __init__(self, confirm, installTorch, pipInstall, onBusyChanged=None, missing=missingPackages):
        self.confirm, self.installTorch, self.pipInstall = confirm, installTorch, pipInstall
        self.onBusyChanged = onBusyChanged
        self.missing = missing
        self.busy = False

    def ensure(self):
        if self.busy:
            return False  # an install is already running (its event pumping delivered a second click)
        missing = self.missing()
        if not missing:
            return True
        message = ("CDAL Segmentation needs these Python packages: %s.\n\nPyTorch is installed with the PyTorch "
                   "extension (it picks the build matching your GPU/CUDA); the others with pip. This downloads up "
                   "to a few GB and can take several minutes.\n\nInstall now?" % ", ".join(missing))
        if not self.confirm(message):
            return False
        self._setBusy(True)
        try:
            if "torch" in missing:
                self.installTorch()
            others = [pipName for name, pipName in REQUIRED_PACKAGES if pipName and name in missing]
            if others:
                self.pipInstall(" ".join(others))
        finally:
            self._setBusy(False)
        importlib.invalidate_caches()  # finders cache directory listings: see the packages just installed
        still = self.missing()
        if still:  # the install ran without an error, yet Python cannot import them: say so, do not go quiet
            from .paths import ensureCoreOnPath
            ensureCoreOnPath()
            from cdal_core.errors import CDALError
            raise CDALError("the installation finished, but %s still cannot be imported: restart Slicer and try "
                            "again (the Python console shows the installer's output)" % ", ".join(still))
        return True

    def _setBusy(self, busy):
        self.busy = busy
        if self.onBusyChanged is not None:
            self.onBusyChanged(busy)


def slicerInstaller(onBusyChanged=None):
    """The installer wired to desktop Slicer (PyTorch extension for torch, pip for the rest)."""
    import slicer

    def installTorch():
        try:
            import PyTorchUtils  # the PyTorch extension (declared as extension dependency)
        except ImportError:
            slicer.util.pip_install("torch")
            return
        torchLogic = PyTorchUtils.PyTorchUtilsLogic()
        if not torchLogic.torchInstalled():
            torchLogic.installTorch(askConfirmation=False)

    def confirm(message):
        return slicer.util.confirmOkCancelDisplay(message, "CDAL Segmentation: install packages")

    return DependencyInstaller(confirm, installTorch, slicer.util.pip_install, onBusyChanged)
