"""The transformers names the library depends on, in one place, for every supported release.

transformers renames forward arguments between minor versions (5.24: ``past_key_values`` ->
``cache``, with the old name a deprecated alias; ``cache_position`` gone from most forwards).
Code that reads a forward's signature or passes a cache asks this module for the name the
installed release uses, and accepts either name from its callers.
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

#: What a forward may call its key/value cache, newest name first.
CACHE_ARGUMENTS = ("cache", "past_key_values")


def forward_parameters(module: nn.Module) -> tuple[str, ...]:
    """The names of ``module.forward``'s parameters, in order (for binding positional arguments)."""
    return tuple(inspect.signature(module.forward).parameters)


def cache_argument(module: nn.Module) -> str | None:
    """The name under which ``module.forward`` takes a key/value cache, or ``None`` if it takes none."""
    parameters = forward_parameters(module)
    return next((name for name in CACHE_ARGUMENTS if name in parameters), None)


def pop_cache(kwargs: dict[str, Any]) -> Any:
    """Removes and returns the cache from a forward's keyword arguments, under whichever name the caller
    used (``generate()`` and users pass the name of their release; a deprecated alias still reaches us)."""
    found = None
    for name in CACHE_ARGUMENTS:
        value = kwargs.pop(name, None)
        if value is not None:
            found = value
    return found


def mask_attention_implementations() -> list[str]:
    """The attention implementations whose masks transformers builds from ``position_ids`` (packing)."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    registry = ALL_MASK_ATTENTION_FUNCTIONS
    mapping = getattr(registry, "_global_mapping", None)
    return list(mapping if mapping is not None else registry.keys())
