"""Peak live tensor bytes on any device: a dispatch-mode counter (CUDA has max_memory_allocated;
the CPU has no allocator statistics, and process RSS is not tensor memory)."""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class PeakLiveBytes(TorchDispatchMode):
    """Tracks the bytes of tensor storages alive while the mode is on; ``peak`` is the largest total.

    Args:
        existing: tensors alive before (parameters, buffers): their storages count from the start
            and are never counted again when an op returns a view of them.

    Storages are tracked through their Python objects, which torch keeps alive exactly as long
    as the storage, so views and in-place results are not counted twice.
    """

    def __init__(self, existing: Iterable[torch.Tensor] = ()) -> None:
        super().__init__()
        self._existing = {id(s): s for s in (t.untyped_storage() for t in existing)}  # strong refs
        self._tracked: set[int] = set(self._existing)
        self.live = self.peak = sum(s.nbytes() for s in self._existing.values())

    def _release(self, key: int, nbytes: int) -> None:
        self._tracked.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                key = id(storage)
                if key in self._tracked or storage.nbytes() == 0:
                    continue
                self._tracked.add(key)
                self.live += storage.nbytes()
                self.peak = max(self.peak, self.live)
                weakref.finalize(storage, self._release, key, storage.nbytes())
        return out


def saved_for_backward(loss: Callable[[], torch.Tensor],
                       params: Iterable[torch.Tensor]) -> list[tuple[torch.dtype, int]]:
    """Runs ``loss()`` and its backward; returns ``(dtype, bytes)`` of each storage autograd kept for
    that backward, the storages of ``params`` excluded.

    Storages are told apart by address, which is unique among tensors alive together (all of these
    live until the backward), not across runs.
    """
    saved: dict[int, tuple[torch.dtype, int]] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[t.untyped_storage().data_ptr()] = (t.dtype, t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        value = loss()
    excluded = {p.untyped_storage().data_ptr() for p in params}
    value.backward()
    return [v for k, v in saved.items() if k not in excluded]
