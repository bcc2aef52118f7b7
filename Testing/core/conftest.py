"""Shared fixtures: a small synthetic MSD dataset and a tiny trained model (made once per test session)."""

import json
import os
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
warnings.filterwarnings("ignore", category=FutureWarning)

SHARED_DATA = ROOT.parent / "shared" / "data"
TINY_CONFIG = {
    "network": {"base_channels": 8, "channel_mults": [1, 2], "latent_dim": 8, "time_dim": 16,
                "disc_channels": 8, "disc_mults": [1, 2], "attention_block": 0, "mapping_layers": 1},
    "batch_size": 4, "train_size": [48, 40], "val_every": 1000, "val_max_volumes": 2, "val_samples": 2,
    "checkpoint_every": 1000, "log_every": 1, "augmentation": None, "spacing": [1.0, 1.0, 1.0],
}


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
    return train(str(synthetic_dir), str(out), TrainConfig.load(str(tiny_config_file)), max_steps=3, device="cpu")
