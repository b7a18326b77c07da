"""The GPU path of a model actor: speed-only settings that never change what is stored beyond
float rounding (channels-last layout, torch.compile), one pinned, non-blocking copy of a batch's
views to the device for every teacher, and teacher batch sizes chosen from free device memory.

Precision (bf16 / fp16 autocast) is per model: teachers.base.resolve_precision. Attention is
fused by the libraries themselves: open_clip's towers call nn.MultiheadAttention without
weights, which runs torch's scaled_dot_product_attention (or its fused fast path), and
transformers models load with attn_implementation="sdpa" (tests/core/test_accelerator.py checks both).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

CPU_BATCH_SIZE = 256
"""Teacher batch size on a CPU when the job leaves it to "auto" (memory is rarely the limit there)."""
PROBE_ITEMS = 8
"""Views in the forward that measures a teacher's device memory per view."""
MEMORY_HEADROOM = 0.8
"""Share of the free device memory a teacher's batch may take (allocator fragmentation, other tensors)."""
MAX_AUTO_BATCH = 4096


@dataclass(frozen=True)
class Acceleration:
    """How a teacher's forward runs: weights and inputs channels-last (pays for convolutional
    towers on GPUs), and the forward compiled with a torch.compile backend (None: eager)."""

    channels_last: bool = False
    compile_backend: str | None = None

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def prepare(self, model: nn.Module) -> None:
        """Convert the model's 4-D weights in place (other weights have no layout to change)."""
        if self.channels_last:
            model.to(memory_format=torch.channels_last)

    def compiled(self, forward: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        return torch.compile(forward, backend=self.compile_backend) if self.compile_backend else forward


def compile_backends() -> list[str]:
    """torch.compile backends this torch knows (debug ones such as aot_eager included)."""
    import torch._dynamo  # noqa: PLC0415 - slow to import, needed only when a job asks to compile

    return torch._dynamo.list_backends(exclude_tags=())


def views_to_device(views: np.ndarray, device: torch.device, pin_memory: bool) -> torch.Tensor:
    """uint8 views from the object store (read-only arrays) as a tensor on `device`, copied once
    for every teacher; on CUDA through a pinned staging buffer with a non-blocking copy."""
    if device.type != "cuda":
        return torch.from_numpy(np.array(views))
    staging = torch.empty(views.shape, dtype=torch.uint8, pin_memory=pin_memory)
    staging.numpy()[...] = views
    return staging.to(device, non_blocking=pin_memory)


def batch_size_for_memory(free_bytes: int, bytes_per_item: float, limit: int = MAX_AUTO_BATCH) -> int:
    """The largest batch whose activations fit MEMORY_HEADROOM of the free memory, in [1, limit]."""
    if bytes_per_item <= 0:
        return limit
    return max(1, min(limit, int(free_bytes * MEMORY_HEADROOM // bytes_per_item)))


def device_bytes_per_view(encode_image: Callable[[torch.Tensor], Any], view_size: int, device: torch.device) -> float:
    """Peak CUDA memory one view adds to a forward, measured on a PROBE_ITEMS batch of blank views."""
    probe = torch.zeros((PROBE_ITEMS, 3, view_size, view_size), dtype=torch.uint8, device=device)
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    encode_image(probe)
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / PROBE_ITEMS


def teacher_batch_size(
    configured: int | str, encode_image: Callable[[torch.Tensor], Any], view_size: int, device: torch.device
) -> int:
    """A teacher's batch size: as configured, else ("auto") from the free memory of a CUDA device
    and the teacher's measured footprint per view, else CPU_BATCH_SIZE."""
    if configured != "auto":
        return int(configured)
    if device.type != "cuda":
        return CPU_BATCH_SIZE
    per_view = device_bytes_per_view(encode_image, view_size, device)
    return batch_size_for_memory(torch.cuda.mem_get_info(device)[0], per_view)
