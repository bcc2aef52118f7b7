"""Constants shared by the cdal_core tests (a plain module: two conftest.py files cannot be imported by name)."""

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SHARED_DATA = ROOT.parent / "shared" / "data"
TINY_CONFIG = {
    "network": {"base_channels": 8, "channel_mults": [1, 2], "latent_dim": 8, "time_dim": 16,
                "disc_channels": 8, "disc_mults": [1, 2], "attention_block": 0, "mapping_layers": 1},
    "batch_size": 4, "train_size": [48, 40], "val_every": 1000, "val_max_volumes": 2, "val_samples": 2,
    "checkpoint_every": 1000, "log_every": 1, "augmentation": None, "spacing": [1.0, 1.0, 1.0],
}


def load_tool(name: str):
    """A script of tools/ (not a package) imported as a module, e.g. ``load_tool("gpu_session")``."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
