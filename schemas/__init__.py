"""Versioned schema definitions, kept as data (JSON) that dr-gen reads and validates against."""

import json
from functools import lru_cache
from importlib import resources
from typing import Any

CURRENT_MAJOR = 1


@lru_cache(maxsize=None)
def load_spec(major: int = CURRENT_MAJOR, name: str = "schema.json") -> dict[str, Any]:
    """The parsed JSON definition `name` of schema major version `major`."""
    path = resources.files(__name__) / f"v{major}" / name
    return json.loads(path.read_text(encoding="utf-8"))
