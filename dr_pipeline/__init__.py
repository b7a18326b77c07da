"""dr-gen: generate reinforced image-text datasets (MobileCLIP / MobileCLIP2 recipe) on Ray."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("dr-gen")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+source"
