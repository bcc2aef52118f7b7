"""tools/gpu_session.py: training from a data bundle sees exactly the data a normal run sees."""

import numpy as np
import pytest

from cdal_core.config import TrainConfig
from cdal_core.synthetic import make_msd_dataset
from cdal_core.trainer import Trainer

from core_settings import TINY_CONFIG, load_tool


def test_bundle_trainer_sees_the_slices_and_standardisation_of_a_normal_run(tmp_path):
    gs = load_tool("gpu_session")
    data = make_msd_dataset(tmp_path / "msd", num_volumes=5, seed=3)
    held_out = ["case_001", "case_003"]
    cfg = TrainConfig.from_dict(dict(TINY_CONFIG, val_cases=held_out, val_max_volumes=0))
    names = gs.bundle_msd(data, cfg, tmp_path / "bundle.npz")
    assert set(held_out) < set(names)
    normal = Trainer(str(data), str(tmp_path / "normal"), cfg, device="cpu")
    bundled = gs.bundle_trainer_class()(tmp_path / "bundle.npz", tmp_path / "bundled", cfg, held_out, device="cpu")
    assert bundled.norm.landmarks == pytest.approx(normal.norm.landmarks, abs=1e-5)
    assert bundled.class_names == normal.class_names
    a, b = normal.banks[0], bundled.banks[0]
    assert a.images.shape == b.images.shape and np.array_equal(a.labels, b.labels)
    assert np.abs(a.images - b.images).max() < 1e-4  # uint16 storage
    assert bundled.data_summary["train_cases"] == len(names) - len(held_out)
