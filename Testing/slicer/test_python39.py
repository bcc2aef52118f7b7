"""The Slicer module code must stay Python 3.9 compatible (Slicer 5.x ships older Pythons than this venv)."""
import ast
import glob
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FILES = sorted(glob.glob(os.path.join(REPO, "CDALSegmentation", "**", "*.py"), recursive=True)) + [
    os.path.join(REPO, "Testing", "run_tests.py")]


@pytest.mark.parametrize("path", FILES, ids=[os.path.relpath(p, REPO) for p in FILES])
def test_parses_as_python39_without_new_syntax(path):
    source = open(path, encoding="utf-8").read()
    tree = ast.parse(source, filename=path, feature_version=(3, 9))
    for node in ast.walk(tree):
        annotations = []
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            annotations += [a.annotation for a in node.args.args + node.args.kwonlyargs if a.annotation]
            if node.returns is not None:
                annotations.append(node.returns)
        if isinstance(node, ast.AnnAssign):
            annotations.append(node.annotation)
        for annotation in annotations:
            for sub in ast.walk(annotation):
                assert not (isinstance(sub, ast.BinOp) and isinstance(sub.op, ast.BitOr)), \
                    "%s:%d: 'X | Y' annotation needs Python 3.10" % (path, node.lineno)
    assert "from __future__ import annotations" not in source or "parameterNodeWrapper" not in source
