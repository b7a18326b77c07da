"""Wall time per pipeline stage, recorded in every unit's stats and summed by benchmarks."""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")


class StageClock:
    """Accumulates seconds per named stage (read, decode, augment, captioning, ...)."""

    def __init__(self) -> None:
        self.seconds: Counter[str] = Counter()

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - start

    def timed(self, name: str, items: Iterable[T]) -> Iterator[T]:
        """Yield from `items`, charging the time spent producing each item to `name`."""
        iterator = iter(items)
        while True:
            with self.stage(name):
                item = next(iterator, _END)
            if item is _END:
                return
            yield item  # type: ignore[misc]

    def add(self, seconds: dict[str, float]) -> None:
        self.seconds.update(seconds)

    def rounded(self) -> dict[str, float]:
        return {name: round(value, 4) for name, value in sorted(self.seconds.items())}


_END = object()
