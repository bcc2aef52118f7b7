"""pytest fixtures for the CDALSegmentation logic tests with PyPI's slicer-core (real MRML, no Qt).

The harness (slicer_harness.py) builds the same minimal application desktop Slicer provides:
``slicer.mrmlScene``, ``slicer.modules.<volumes|segmentations|colors|markups>.logic()`` and the segmentation
converter rules. Tests use a tiny model trained once per session on synthetic data (a few seconds on CPU),
so they do not depend on the shipped model; the hippocampus test uses the shipped model when present.
"""
import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest

pytest.importorskip("slicer", reason="PyPI slicer-core is not installed (pip install slicer-core)")
pytest.importorskip("SimpleITK")
pytest.importorskip("torch")

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
MODULE_DIR = os.path.join(REPO, "CDALSegmentation")
for path in (HERE, MODULE_DIR, REPO):
    if path not in sys.path:
        sys.path.insert(0, path)

import slicer_harness  # noqa: E402

TINY_CONFIG = {
    "name": "tiny-test", "description": "tiny model for the Slicer module tests",
    "network": {"base_channels": 8, "channel_mults": [1, 2], "latent_dim": 8, "time_dim": 16, "mapping_layers": 1,
                "disc_channels": 8, "disc_mults": [1, 2, 2], "attention_block": 1},
    "batch_size": 6, "max_steps": 16, "lr_g": 1e-3, "lr_d": 5e-4, "ema_decay": 0.0,
    "val_every": 100000, "val_max_volumes": 1, "val_samples": 1,
    "checkpoint_every": 100000, "log_every": 4, "train_size": [32, 32], "val_fraction": 0.34,
}
#: trained test models are cached here, keyed by a hash of cdal_core's sources and the config above
CACHE_DIR = os.environ.get("CDAL_TEST_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "cdal-tests")


def run_cli(args, timeout=600):
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "cdal_core.cli"] + [str(a) for a in args], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True, encoding="utf-8",
                          errors="replace", timeout=timeout)


@pytest.fixture(scope="session")
def user_models(tmp_path_factory):
    """Per-user model folder redirected into a temporary folder for the whole session."""
    path = tmp_path_factory.mktemp("user-models")
    old = os.environ.get("CDAL_USER_MODELS")
    os.environ["CDAL_USER_MODELS"] = str(path)
    yield path
    if old is None:
        os.environ.pop("CDAL_USER_MODELS", None)
    else:
        os.environ["CDAL_USER_MODELS"] = old


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory):
    from cdal_core.synthetic import make_msd_dataset

    return make_msd_dataset(tmp_path_factory.mktemp("synthetic") / "msd", num_volumes=3, seed=1)


def _core_hash():
    digest = hashlib.sha1(json.dumps(TINY_CONFIG, sort_keys=True).encode() + b"data-seed-0")
    core = os.path.join(REPO, "cdal_core")
    for name in sorted(os.listdir(core)):
        if name.endswith(".py"):
            with open(os.path.join(core, name), "rb") as f:
                digest.update(name.encode() + f.read())
    return digest.hexdigest()[:16]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, user_models):
    """Path of a tiny cDAL model trained on synthetic ellipsoids (about a minute on 2 CPU cores; cached).

    Good enough to find the synthetic structures (Dice ~0.6-0.8), so geometry tests compare real segmentations.
    """
    cached = os.path.join(CACHE_DIR, "tiny-" + _core_hash())
    if os.path.isfile(os.path.join(cached, "model.json")):
        return cached
    from cdal_core.synthetic import make_msd_dataset

    run = tmp_path_factory.mktemp("tiny-run")
    data = make_msd_dataset(run / "msd", num_volumes=3, seed=0)
    config = run / "config.json"
    config.write_text(json.dumps(TINY_CONFIG))
    proc = run_cli(["train", "--data", data, "--out", run / "out", "--config", config,
                    "--max-steps", TINY_CONFIG["max_steps"], "--device", "cpu"])
    model = run / "out" / "model"
    if proc.returncode != 0 or not (model / "model.json").exists():
        pytest.fail("training the tiny test model failed:\n" + proc.stderr[-3000:])
    try:
        os.makedirs(CACHE_DIR, exist_ok=True)
        staging = cached + ".partial-%d" % os.getpid()
        shutil.copytree(str(model), staging)
        os.replace(staging, cached)
        for name in os.listdir(CACHE_DIR):  # drop models trained for older cdal_core sources
            if name.startswith("tiny-") and os.path.join(CACHE_DIR, name) != cached:
                shutil.rmtree(os.path.join(CACHE_DIR, name), ignore_errors=True)
        return cached
    except OSError:
        return str(model)


@pytest.fixture()
def app():
    """A fresh scene with the minimal application (logics, colour tables, converter rules)."""
    application = slicer_harness.make_application()
    yield application
    application.scene.Clear(1)


@pytest.fixture()
def logic():
    from CDALSegmentationLib.logic import CDALSegmentationLogic

    return CDALSegmentationLogic()


@pytest.fixture()
def vtk_errors():
    observer = slicer_harness.VTKErrorObserver()
    yield observer
    observer.close()
