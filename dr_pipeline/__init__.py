"""dr-gen: generate reinforced image-text datasets (MobileCLIP / MobileCLIP2 recipe) on Ray."""

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version
from typing import Any

try:
    __version__ = version("dr-gen")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+source"

# Imported on first use: they pull in torch and pyarrow, which `dr-gen --help` does not need.
_LAZY = {"open_dataset": "dr_pipeline.read.reader", "ReinforcedTorchDataset": "dr_pipeline.read.torch_dataset"}
__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dr_pipeline' has no attribute {name!r}")
