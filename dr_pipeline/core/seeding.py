"""Seeds as pure functions of (run seed, sample key, purpose, index).

Every random choice dr-gen makes (augmentation parameters, caption sampling)
draws from a generator seeded here, so any subset of a dataset can be
recomputed, on any worker layout, with the same result.
"""

import hashlib


def derive_seed(run_seed: int, key: str, purpose: str, index: int) -> int:
    """A 63-bit seed, stable across processes, machines and Python versions."""
    material = f"{run_seed}\x1f{purpose}\x1f{key}\x1f{index}".encode("utf-8", "surrogatepass")
    return int.from_bytes(hashlib.sha256(material).digest()[:8], "little") >> 1
