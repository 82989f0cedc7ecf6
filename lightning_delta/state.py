"""Delta-only state: which tensors a delta checkpoint holds, and loading them safely.

A *kept* tensor is one a delta checkpoint must hold: a delta's own tensors, every
tensor of a module made trainable with ``freeze_backbone(trainable=...)``, and any
other parameter that requires grad. Everything else in the backbone is frozen and
comes back from the backbone's pretrained source.
"""

from __future__ import annotations

import warnings
from collections.abc import Collection, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from lightning_delta.core import iter_deltas
from lightning_delta.errors import DeltaStateError, TargetError
from lightning_delta.targets import candidate_modules, matches

#: Attribute of a model that records its ``trainable`` module patterns.
TRAINABLE_ATTR = "_lightning_delta_trainable"


def state_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors ``module.state_dict()`` would hold, by key, without running any state-dict hook."""
    out: dict[str, torch.Tensor] = {}
    for path, sub in module.named_modules(remove_duplicate=False):
        prefix = path + "." if path else ""
        for name, param in sub._parameters.items():
            if param is not None:
                out[prefix + name] = param
        for name, buf in sub._buffers.items():
            if buf is not None and name not in sub._non_persistent_buffers_set:
                out[prefix + name] = buf
    return out


def trainable_module_names(model: nn.Module, patterns: Iterable[str]) -> list[str]:
    """Module names addressed by ``trainable`` patterns; a pattern matching nothing is an error."""
    names = [n for n, _ in candidate_modules(model)]
    found: list[str] = []
    for pattern in patterns:
        hits = [n for n in names if matches(n, pattern)]
        if not hits:
            tails = sorted({n.rsplit(".", 1)[-1] for n in names})[:20]
            raise TargetError(
                f"trainable pattern {pattern!r} matches no module; module names end in e.g. {tails}."
                " Use a module name such as 'classifier' (suffix) or 're:<regex>'"
            )
        found.extend(h for h in hits if h not in found)
    return found


def is_under(key: str, paths: Iterable[str]) -> bool:
    """Whether ``key`` is one of ``paths`` or inside one (PEFT's ParameterDict entries are paths)."""
    return any(key == p or key.startswith(p + ".") for p in paths)


def delta_owners(model: nn.Module) -> list[str]:
    """Paths of the modules whose tensors are delta tensors (with the PEFT backend's parts in PEFT's layers)."""
    return [owner for delta in iter_deltas(model) for owner in delta.owners]


def canonical(key: str) -> str:
    """A backbone key as it reads without PEFT's wrapping (``q.base_layer.weight`` -> ``q.weight``)."""
    return key.replace(".base_layer.", ".")


def kept_keys(model: nn.Module, names: Collection[str] | None = None,
              trainable: Iterable[str] | None = None) -> set[str]:
    """Keys of ``model.state_dict()`` that a delta checkpoint of ``model`` holds.

    Args:
        names: only these deltas' tensors (default: every delta's), with ``trainable``.
        trainable: trainable module patterns (default: those recorded by ``freeze_backbone``);
            with ``names``, other parameters that require grad are left out.
    """
    owners = delta_owners(model)
    patterns = getattr(model, TRAINABLE_ATTR, ()) if trainable is None else trainable
    modules = trainable_module_names(model, patterns)
    if names is not None:
        owners = [owner for delta in iter_deltas(model) if delta.name in names for owner in delta.owners]
        return {key for key in state_tensors(model) if is_under(key, owners + modules)}
    return {
        key
        for key, tensor in state_tensors(model).items()
        if (isinstance(tensor, nn.Parameter) and tensor.requires_grad) or is_under(key, owners + modules)
    }


def unowned_trainable_keys(model: nn.Module) -> list[str]:
    """Parameters that require grad but belong to no delta and no declared trainable module: a backbone
    that was never frozen (or a parameter unfrozen by hand)."""
    owned = delta_owners(model) + trainable_module_names(model, getattr(model, TRAINABLE_ATTR, ()))
    return sorted(key for key, tensor in state_tensors(model).items()
                  if isinstance(tensor, nn.Parameter) and tensor.requires_grad and not is_under(key, owned))


def local_shard(tensor: torch.Tensor) -> torch.Tensor:
    """What this rank holds of ``tensor``: a DTensor's local shard, a ZeRO-3 parameter's partition, else
    ``tensor`` (detached): checks on it need no collective."""
    local = getattr(tensor, "_local_tensor", None)
    if local is None:
        local = getattr(tensor, "ds_tensor", None)
    return (tensor if local is None else local).detach()


def non_finite_keys(state: Mapping[str, Any]) -> list[str]:
    """Keys of the floating-point tensors in ``state`` that hold NaN or inf (local shards of sharded ones)."""
    return [key for key, tensor in state.items()
            if isinstance(tensor, torch.Tensor) and tensor.is_floating_point()
            and not bool(torch.isfinite(local_shard(tensor)).all())]


def check_fit(
    state_dict: Mapping[str, torch.Tensor],
    model_tensors: Mapping[str, torch.Tensor],
    expected: set[str],
    *,
    strict: bool,
    allow_frozen: bool,
) -> None:
    """Raises :class:`DeltaStateError` if ``state_dict`` does not fit a model.

    Args:
        state_dict: what is being loaded.
        model_tensors: the model's tensors by key (:func:`state_tensors`).
        expected: the keys a delta checkpoint must hold (:func:`kept_keys`).
        strict: whether a missing expected key is an error.
        allow_frozen: whether keys of frozen backbone tensors may be present (a full checkpoint).
    """
    unexpected = [k for k in state_dict if k not in model_tensors]
    if unexpected:
        raise DeltaStateError(
            f"the checkpoint does not fit this model: {len(unexpected)} of its tensors have no place in it,"
            f" first: {unexpected[:5]}. It was saved from another backbone, or with other delta methods,"
            " targets or names; attach the same deltas to the same backbone before loading"
        )
    mismatched = [
        f"{k} (checkpoint {tuple(v.shape)}, model {tuple(model_tensors[k].shape)})"
        for k, v in state_dict.items()
        if tuple(v.shape) != tuple(model_tensors[k].shape)
    ]
    if mismatched:
        raise DeltaStateError(
            f"the checkpoint does not fit this model: {len(mismatched)} tensors differ in shape, first:"
            f" {mismatched[:5]}. It was saved from a backbone of another size or with other hyper-parameters (r?)"
        )
    frozen = [k for k in state_dict if k not in expected]
    if frozen and not allow_frozen:
        raise DeltaStateError(
            f"the state dict holds {len(frozen)} frozen backbone tensors (first: {frozen[:3]}): it is a full"
            " checkpoint, not a delta one. Load it with model.load_state_dict(...) instead"
        )
    broken = non_finite_keys({k: state_dict[k] for k in sorted(expected.intersection(state_dict))})
    if broken:
        raise DeltaStateError(
            f"the checkpoint's {broken[0]} holds NaN or infinite values ({len(broken)} such tensors, first:"
            f" {broken[:3]}): it was saved from a run that diverged; load an earlier checkpoint")
    missing = sorted(expected.difference(state_dict))
    if not strict and missing:
        warnings.warn(f"strict=False: {len(missing)} delta/trainable tensors are not in the checkpoint and keep their"
                      f" initial values: {missing[:10]}", stacklevel=3)
    if strict and missing:
        kind = " It holds backbone weights: it is a full checkpoint, not a delta one." if frozen else ""
        raise DeltaStateError(
            f"the checkpoint lacks {len(missing)} delta/trainable tensors this model has, first: {missing[:5]}."
            f"{kind} Was it saved from a backbone with fewer layers, or with other targets? Pass strict=False"
            " only if those tensors should keep their initial values"
        )


def load_into(model: nn.Module, state_dict: Mapping[str, torch.Tensor], expected: set[str], *, strict: bool) -> None:
    """Checks ``state_dict`` against ``model`` (see :func:`check_fit`), then copies it in.

    Dtype and device differences are cast away; nothing is copied if any check fails.
    """
    tensors = state_tensors(model)
    check_fit(state_dict, tensors, expected, strict=strict, allow_frozen=False)
    with torch.no_grad():
        for key, value in state_dict.items():
            tensors[key].copy_(value)
