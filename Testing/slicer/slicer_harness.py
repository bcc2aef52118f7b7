"""A minimal Slicer "application" built from PyPI's slicer-core (no Qt, no desktop Slicer).

Desktop Slicer provides ``slicer.mrmlScene`` and ``slicer.modules.<name>.logic()`` and registers the
segmentation converter rules in its Qt Segmentations module; this harness sets up exactly those pieces with
real MRML classes so that the Qt-free logic in ``CDALSegmentationLib`` runs unchanged.
"""
import types

import slicer


class _ModuleProxy(object):
    """Stands in for ``slicer.modules.<name>``: only ``logic()`` is provided, like the Qt-free part of Slicer."""

    def __init__(self, logic):
        self._logic = logic

    def logic(self):
        return self._logic


_RULES_REGISTERED = False


def register_segmentation_converter_rules():
    """Register the converter rules that desktop Slicer's Segmentations module registers at startup."""
    global _RULES_REGISTERED
    if _RULES_REGISTERED:
        return
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    for rule_class in (
        slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule,
        slicer.vtkClosedSurfaceToBinaryLabelmapConversionRule,
        slicer.vtkClosedSurfaceToFractionalLabelmapConversionRule,
        slicer.vtkFractionalLabelmapToClosedSurfaceConversionRule,
    ):
        factory.RegisterConverterRule(rule_class())
    _RULES_REGISTERED = True


def make_application():
    """Create a scene plus application, Colors, Volumes, Segmentations and Markups logics.

    Sets ``slicer.mrmlScene`` and ``slicer.modules`` (like desktop Slicer) and returns a namespace with
    ``scene``, ``app_logic`` and the logics.
    """
    register_segmentation_converter_rules()
    scene = slicer.vtkMRMLScene()
    app_logic = slicer.vtkSlicerApplicationLogic()
    app_logic.SetMRMLScene(scene)

    import vtk

    color_logic = slicer.vtkSlicerColorLogic()
    color_logic.SetMRMLApplicationLogic(app_logic)
    # slicer-core ships no colour files (e.g. Inferno.txt): silence the expected "FindDefaultColorFiles failed"
    # errors; the generated colour tables are still added
    warnings = vtk.vtkObject.GetGlobalWarningDisplay()
    vtk.vtkObject.GlobalWarningDisplayOff()
    try:
        color_logic.SetMRMLScene(scene)
        color_logic.AddDefaultColorNodes()
    finally:
        vtk.vtkObject.SetGlobalWarningDisplay(warnings)
    app_logic.SetModuleLogic("Colors", color_logic)

    logics = {"colors": color_logic}
    for name, cls in (
        ("Volumes", slicer.vtkSlicerVolumesLogic),
        ("Segmentations", slicer.vtkSlicerSegmentationsModuleLogic),
        ("Markups", slicer.vtkSlicerMarkupsLogic),
    ):
        logic = cls()
        logic.SetMRMLScene(scene)
        logic.SetMRMLApplicationLogic(app_logic)
        app_logic.SetModuleLogic(name, logic)
        logics[name.lower()] = logic

    slicer.mrmlScene = scene
    slicer.app_logic = app_logic  # keep a reference alive
    slicer.modules = types.SimpleNamespace(**{name: _ModuleProxy(logic) for name, logic in logics.items()})
    return types.SimpleNamespace(scene=scene, app_logic=app_logic, **logics)


def load_volume(path, scene=None, name=None, labelmap=False):
    """Load an image file into MRML through ``vtkMRMLVolumeArchetypeStorageNode`` (what Slicer's loaders use)."""
    scene = scene or slicer.mrmlScene
    node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode" if labelmap else "vtkMRMLScalarVolumeNode")
    if name:
        node.SetName(name)
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(path))
    if labelmap:
        storage.SetCenterImage(False)
    if not storage.ReadData(node):
        scene.RemoveNode(node)
        scene.RemoveNode(storage)
        raise IOError("could not read volume %s" % path)
    node.SetAndObserveStorageNodeID(storage.GetID())
    node.CreateDefaultDisplayNodes()
    return node


class VTKErrorObserver(object):
    """Collects VTK error messages (VTK logs errors instead of raising them)."""

    def __init__(self):
        import vtk

        self.messages = []
        self._window = vtk.vtkOutputWindow.GetInstance()
        self._tag = self._window.AddObserver("ErrorEvent", self._on_error)

    def _on_error(self, caller, event):
        self.messages.append(str(event))

    def close(self):
        self._window.RemoveObserver(self._tag)
