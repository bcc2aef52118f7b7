"""Shared fixtures: a small synthetic MSD dataset and a tiny trained model (made once per test session)."""

import json
import os
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pytest

from core_settings import ROOT, SHARED_DATA, TINY_CONFIG  # noqa: E402

warnings.filterwarnings("ignore", category=FutureWarning)


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory) -> Path:
    from cdal_core.synthetic import make_msd_dataset
    return make_msd_dataset(tmp_path_factory.mktemp("synthetic"), num_volumes=6, seed=3)


@pytest.fixture(scope="session")
def tiny_config_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("config") / "tiny.json"
    path.write_text(json.dumps(TINY_CONFIG))
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, synthetic_dir, tiny_config_file) -> Path:
    """A 3-step model: useless for accuracy, but a complete, real model directory."""
    from cdal_core.config import TrainConfig
    from cdal_core.trainer import train
    out = tmp_path_factory.mktemp("tiny_run")
    model = train(str(synthetic_dir), str(out), TrainConfig.load(str(tiny_config_file)), max_steps=3, device="cpu")
    # After 3 steps its first step's prediction is noise, and pooled in (the default of the volume models cdal
    # trains) it can leave a random scan empty; the tests that use this model check mechanics, which they do
    # on Algorithm 2 as before. Pooling has its own tests (test_step_pooling.py).
    card_path = Path(model) / "model.json"
    card = json.loads(card_path.read_text())
    card["sampling"] = {"step_pooling": "last"}
    card_path.write_text(json.dumps(card, indent=2))
    return model
