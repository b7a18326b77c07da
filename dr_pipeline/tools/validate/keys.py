"""Keys unique across the whole dataset: kept as 8-byte hashes, so a billion keys fit in memory;
the units of a colliding hash are read again to name the key."""

from __future__ import annotations

import hashlib
from collections import defaultdict
from typing import Any

import numpy as np

from dr_pipeline.tools.validate.common import CheckedDataset, RowProblems


def key_hash(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")


def duplicate_key_problems(dataset: CheckedDataset, units: list[dict[str, Any]], hashes: list[np.ndarray]) -> list[str]:
    """One line per key that more than one row holds, naming its units."""
    if not hashes or not sum(len(h) for h in hashes):
        return []
    everything = np.concatenate(hashes)
    owner = np.repeat(np.arange(len(units)), [len(h) for h in hashes])
    order = np.argsort(everything, kind="stable")
    ordered = everything[order]
    repeated = np.unique(ordered[1:][ordered[1:] == ordered[:-1]])
    if not len(repeated):
        return []
    involved = sorted(set(owner[np.isin(everything, repeated)].tolist()))
    places: dict[str, list[str]] = defaultdict(list)
    wanted = set(repeated.tolist())
    out = dataset.out
    for index in involved:
        with out.fs.open(out.join(units[index]["files"]["data"]["path"]), "rb") as handle:
            for rows in dataset.format.checked_rows(handle, dataset.layout, dataset.keep_images, RowProblems().add):
                for key in rows.keys + rows.unchecked_keys:
                    if key_hash(key) in wanted:
                        places[key].append(units[index]["id"])
    problems = []
    for key, unit_ids in sorted(places.items()):
        if len(unit_ids) > 1:
            names = sorted(set(unit_ids))
            where = f"units {', '.join(names)}" if len(names) > 1 else f"unit {names[0]}"
            problems.append(f"key {key}: {len(unit_ids)} samples share it ({where})")
    return problems
