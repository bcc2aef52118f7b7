"""Static checks that catch what only desktop Slicer (or its extension build) would otherwise reveal.

* every ``${Slicer_*}`` variable our CMake files use is one Slicer defines (an undefined one expands to nothing:
  ``ctkMacroCompilePythonScript(... INSTALL_DIR <empty>)`` stops the Extensions Manager build);
* every ``self.ui.<name>`` the module's Python uses exists in the .ui file (else AttributeError on first click);
* the module and cdal_core parse as Python 3.9 (Slicer 5.6/5.8 ship 3.9), without PEP 604 ``X | Y``
  annotations where they are evaluated at run time.
No Slicer needed: these run in plain Python.
"""
import ast
import glob
import os
import re

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULE_DIR = os.path.join(REPO, "CDALSegmentation")
UI_FILE = os.path.join(MODULE_DIR, "Resources", "UI", "CDALSegmentation.ui")

# Variables Slicer sets for extensions, copied from Slicer's source (v5.6-v5.10):
#   CMake/SlicerConfig.cmake.in (configured into SlicerConfig.cmake, read by find_package(Slicer))
#   CMake/SlicerDirectories.cmake (the relative build/install directories it exports)
SLICER_DEFINED_VARIABLES = {
    # SlicerConfig.cmake.in
    "Slicer_USE_FILE", "Slicer_EXTENSION_GENERATE_CONFIG", "Slicer_EXTENSION_CPACK",
    "Slicer_EXTENSION_CPACK_BUNDLE_FIXUP", "Slicer_EXTENSIONS_DIRNAME", "Slicer_USE_PYTHONQT",
    "Slicer_USE_NUMPY", "Slicer_USE_SimpleITK", "Slicer_BUILD_TESTING", "Slicer_LAUNCH_COMMAND",
    "Slicer_LAUNCHER_EXECUTABLE", "Slicer_HOME", "Slicer_BINARY_DIR", "Slicer_REVISION", "Slicer_OS",
    "Slicer_ARCHITECTURE", "Slicer_MAIN_PROJECT_APPLICATION_NAME", "Slicer_INSTALL_ROOT",
    # CMake/SlicerDirectories.cmake: build tree
    "Slicer_BIN_DIR", "Slicer_LIB_DIR", "Slicer_INCLUDE_DIR", "Slicer_SHARE_DIR",
    "Slicer_QTSCRIPTEDMODULES_SUBDIR", "Slicer_QTSCRIPTEDMODULES_BIN_DIR", "Slicer_QTSCRIPTEDMODULES_LIB_DIR",
    "Slicer_QTSCRIPTEDMODULES_INCLUDE_DIR", "Slicer_QTSCRIPTEDMODULES_SHARE_DIR",
    "Slicer_QTLOADABLEMODULES_BIN_DIR", "Slicer_QTLOADABLEMODULES_LIB_DIR", "Slicer_QTLOADABLEMODULES_SHARE_DIR",
    "Slicer_QTLOADABLEMODULES_PYTHON_LIB_DIR",
    # CMake/SlicerDirectories.cmake: install tree
    "Slicer_INSTALL_BIN_DIR", "Slicer_INSTALL_LIB_DIR", "Slicer_INSTALL_INCLUDE_DIR", "Slicer_INSTALL_SHARE_DIR",
    "Slicer_INSTALL_QTSCRIPTEDMODULES_BIN_DIR", "Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR",
    "Slicer_INSTALL_QTSCRIPTEDMODULES_INCLUDE_DIR", "Slicer_INSTALL_QTSCRIPTEDMODULES_SHARE_DIR",
    "Slicer_INSTALL_QTLOADABLEMODULES_BIN_DIR", "Slicer_INSTALL_QTLOADABLEMODULES_LIB_DIR",
    "Slicer_INSTALL_QTLOADABLEMODULES_SHARE_DIR", "Slicer_INSTALL_QTLOADABLEMODULES_PYTHON_LIB_DIR",
}


def cmakeFiles():
    return [os.path.join(REPO, "CMakeLists.txt")] + sorted(
        glob.glob(os.path.join(MODULE_DIR, "**", "CMakeLists.txt"), recursive=True))


def undefinedSlicerVariables(text):
    used = set(re.findall(r"\$\{(Slicer_[A-Za-z0-9_]+)\}", text))
    return sorted(used - SLICER_DEFINED_VARIABLES)


def uiWidgetNames(uiPath):
    import xml.etree.ElementTree as ET

    return set(w.get("name") for w in ET.parse(uiPath).iter("widget"))


def uiNamesUsed(pythonSource):
    return set(re.findall(r"\bself\.ui\.([A-Za-z_][A-Za-z0-9_]*)", pythonSource)) | set(
        re.findall(r"\bui\.([A-Za-z_][A-Za-z0-9_]*)", pythonSource))


def python39Problems(source, path="<source>"):
    """Syntax errors under Python 3.9, and PEP 604 unions in annotations evaluated at run time."""
    try:
        tree = ast.parse(source, filename=path, feature_version=(3, 9))
    except SyntaxError as exc:
        return ["%s:%s: not Python 3.9 syntax: %s" % (path, exc.lineno, exc.msg)]
    if "from __future__ import annotations" in source:
        return []  # annotations stay strings, never evaluated
    problems = []
    for node in ast.walk(tree):
        annotations = []
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = node.args.posonlyargs + node.args.args + node.args.kwonlyargs
            annotations += [a.annotation for a in args if a.annotation is not None]
            annotations += [a.annotation for a in (node.args.vararg, node.args.kwarg) if a and a.annotation]
            if node.returns is not None:
                annotations.append(node.returns)
        elif isinstance(node, ast.AnnAssign):
            annotations.append(node.annotation)
        for annotation in annotations:
            if any(isinstance(sub, ast.BinOp) and isinstance(sub.op, ast.BitOr) for sub in ast.walk(annotation)):
                problems.append("%s:%d: 'X | Y' annotation needs Python 3.10" % (path, node.lineno))
    return problems


PYTHON_FILES = sorted(glob.glob(os.path.join(MODULE_DIR, "**", "*.py"), recursive=True)
                      + glob.glob(os.path.join(REPO, "cdal_core", "**", "*.py"), recursive=True)
                      + [os.path.join(REPO, "Testing", "run_tests.py"),
                         os.path.join(REPO, "Testing", "desktop", "desktop_tests.py")])


# ---- the checks ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", cmakeFiles(), ids=lambda p: os.path.relpath(p, REPO))
def test_cmake_uses_only_variables_slicer_defines(path):
    with open(path) as f:
        assert undefinedSlicerVariables(f.read()) == [], "%s uses variables Slicer does not define" % path


def test_cmake_lists_every_module_python_file():
    """A Lib file missing from MODULE_PYTHON_SCRIPTS is left out of the extension package."""
    with open(os.path.join(MODULE_DIR, "CMakeLists.txt")) as f:
        text = f.read()
    listed = set(re.findall(r"\$\{MODULE_NAME\}(Lib/[A-Za-z0-9_]+\.py)", text))
    present = set("Lib/" + os.path.basename(p)
                  for p in glob.glob(os.path.join(MODULE_DIR, "CDALSegmentationLib", "*.py")))
    assert present == listed, (sorted(present - listed), sorted(listed - present))


def test_the_modules_ctest_is_told_where_the_desktop_tests_are():
    """ctest imports the module from the build tree (SlicerMacroPythonTesting.cmake adds it with
    --additional-module-paths), where Testing/desktop is not; without CDAL_SOURCE_DIR its test would find nothing."""
    with open(os.path.join(MODULE_DIR, "CMakeLists.txt")) as f:
        cmake = f.read()
    with open(os.path.join(MODULE_DIR, "CDALSegmentation.py")) as f:
        module = f.read()
    assert re.search(r"set_property\(TEST py_\$\{MODULE_NAME\} APPEND PROPERTY ENVIRONMENT \"CDAL_SOURCE_DIR=", cmake)
    assert 'os.environ.get("CDAL_SOURCE_DIR")' in module and "testingEnabled()" in module


def test_ui_names_used_in_python_exist_in_ui_file():
    names = uiWidgetNames(UI_FILE)
    sources = glob.glob(os.path.join(MODULE_DIR, "**", "*.py"), recursive=True)
    missing = {}
    for path in sources:
        with open(path, encoding="utf-8") as f:
            for name in uiNamesUsed(f.read()) - names:
                missing.setdefault(name, []).append(os.path.relpath(path, REPO))
    assert not missing, "self.ui names missing from %s: %s" % (os.path.basename(UI_FILE), missing)


@pytest.mark.parametrize("path", PYTHON_FILES, ids=lambda p: os.path.relpath(p, REPO))
def test_parses_as_python39(path):
    with open(path, encoding="utf-8") as f:
        source = f.read()
    assert python39Problems(source, path) == []
    # parameterNodeWrapper reads the annotations at run time: they must stay real objects
    assert "from __future__ import annotations" not in source or "parameterNodeWrapper" not in source


SLICER_SHIPS = {"numpy", "simpleitk"}  # Slicer's SuperBuild: External_python-numpy, External_SimpleITK


def runtimeRequirements(pyproject):
    """Lower-cased package names of ``[project] dependencies`` in a pyproject.toml text (no tomllib on 3.9)."""
    block = re.search(r"^dependencies\s*=\s*\[(.*?)\]", pyproject, re.S | re.M).group(1)
    return {re.split(r"[<>=!~\[ ;]", item.strip().strip('"\''))[0].lower()
            for item in block.split(",") if item.strip()}


def missingFromSlicerInstall(pyproject, requiredPackages):
    offered = {pipName or name for name, pipName in requiredPackages} | {"torch"}
    return sorted(runtimeRequirements(pyproject) - SLICER_SHIPS - {n.lower() for n in offered})


def test_slicer_installs_every_package_cdal_core_needs():
    """The module installs cdal_core's requirements itself (with consent); one missing there fails only in the
    child process, in desktop Slicer (nibabel did: Fine-tune's validation reads NIfTI with it)."""
    import sys
    sys.path.insert(0, os.path.join(MODULE_DIR))
    from CDALSegmentationLib.dependencies import REQUIRED_PACKAGES
    with open(os.path.join(REPO, "pyproject.toml")) as f:
        assert missingFromSlicerInstall(f.read(), REQUIRED_PACKAGES) == []


# ---- each check can fail -------------------------------------------------------------------------------------
def test_checks_catch_deliberate_breaks():
    assert undefinedSlicerVariables("INSTALL_DIR ${Slicer_INSTALL_QTSCRIPTEDMODULES_DIR}") == [
        "Slicer_INSTALL_QTSCRIPTEDMODULES_DIR"]
    assert "noSuchButton" in uiNamesUsed("self.ui.noSuchButton.enabled = True") - uiWidgetNames(UI_FILE)
    assert python39Problems("match x:\n    case 1:\n        pass\n")
    assert python39Problems("def f(a: int | None) -> None:\n    pass\n")
    assert python39Problems("x: int | str = 1\n")
    assert not python39Problems("from __future__ import annotations\ndef f(a: int | None): pass\n")
    assert not python39Problems("from typing import Optional\ndef f(a: Optional[int]): pass\n")
    pyproject = '[project]\ndependencies = [\n    "torch>=2.1",\n    "numpy>=1.24",\n    "nibabel>=5",\n]\n'
    assert missingFromSlicerInstall(pyproject, [("torch", None)]) == ["nibabel"]
