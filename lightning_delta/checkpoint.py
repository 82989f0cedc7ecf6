"""Delta-only checkpoints of a root module (e.g. a LightningModule) and loading them back.

:class:`DeltaCheckpointHooks` lives in the root's state-dict hooks, so every path that calls
``root.state_dict()`` (``trainer.save_checkpoint``, ``ModelCheckpoint`` with or without
``save_weights_only``) writes only delta and trainable tensors of the backbone, while
``root.load_state_dict(strict=True)`` accepts such a file: frozen backbone keys may be
missing, everything else is checked. :func:`load_delta` rebuilds a model from a checkpoint.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_delta import __version__
from lightning_delta.core import DeltaConfig, detach_delta
from lightning_delta.errors import DeltaStateError
from lightning_delta.handle import DeltaModel, ensure_attached
from lightning_delta.methods import config_from_dict
from lightning_delta.state import (
    TRAINABLE_ATTR,
    check_fit,
    compare_fingerprint,
    fingerprint,
    kept_keys,
    load_into,
    read_checkpoint,
    state_tensors,
)

#: Key of the delta record in a Lightning checkpoint dict.
META_KEY = "lightning_delta"
FORMAT_VERSION = 1
_HOOKS_ATTR = "_lightning_delta_checkpoint_hooks"


def _prefix(path: str) -> str:
    return path + "." if path else ""


def checkpoint_metadata(root: nn.Module, backbone_path: str) -> dict[str, Any]:
    """The delta record a checkpoint carries: specs, trainable patterns and the backbone's fingerprint."""
    backbone = root.get_submodule(backbone_path)
    return {
        "format": FORMAT_VERSION,
        "version": __version__,
        "backbone": backbone_path,
        "specs": [config.to_dict() for config in DeltaModel(backbone).configs.values()],
        "trainable": list(getattr(backbone, TRAINABLE_ATTR, ())),
        "fingerprint": fingerprint(backbone),
    }


def spec_differences(recorded: Sequence[Mapping[str, Any]], configs: Mapping[str, DeltaConfig]) -> list[str]:
    """Differences in method and hyper-parameters between recorded specs and attached configs."""
    mine = {name: (c.method, c.hparams()) for name, c in configs.items()}
    theirs = {s["name"]: (s["method"], config_from_dict(s).hparams()) for s in recorded}
    return [
        f"{name}: checkpoint {theirs.get(name)}, model {mine.get(name)}"
        for name in dict.fromkeys([*theirs, *mine])
        if theirs.get(name) != mine.get(name)
    ]


class DeltaCheckpointHooks:
    """State-dict hooks on a root module that make its checkpoints delta-only.

    Args:
        backbone_path: dotted path of the backbone inside the root (``""``: the root itself).
    """

    def __init__(self, backbone_path: str) -> None:
        self.backbone_path = backbone_path

    @classmethod
    def install(cls, root: nn.Module, backbone_path: str) -> DeltaCheckpointHooks:
        """Installs the hooks once; a second call for the same backbone returns the installed ones."""
        existing = root.__dict__.get(_HOOKS_ATTR)
        if existing is not None:
            if existing.backbone_path != backbone_path:
                raise DeltaStateError(
                    f"delta checkpoint hooks already serve backbone {existing.backbone_path!r}; one root module"
                    f" holds one backbone with deltas, not also {backbone_path!r}"
                )
            return existing
        hooks = cls(backbone_path)
        root.register_state_dict_post_hook(hooks)
        root.register_load_state_dict_pre_hook(hooks.check_load)
        root.register_load_state_dict_post_hook(hooks.drop_expected_missing)
        root.__dict__[_HOOKS_ATTR] = hooks
        return hooks

    def _frozen(self, root: nn.Module) -> tuple[str, set[str]]:
        """The backbone's key prefix and the backbone keys (without prefix) a checkpoint keeps."""
        return _prefix(self.backbone_path), kept_keys(root.get_submodule(self.backbone_path))

    def __call__(self, module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
        """State-dict post-hook: drops frozen backbone tensors."""
        path, keep = self._frozen(module)
        start = prefix + path
        for key in [k for k in state_dict if k.startswith(start) and k[len(start) :] not in keep]:
            del state_dict[key]

    def check_load(self, module: nn.Module, state_dict: Mapping, prefix: str, local_metadata: dict, strict: bool,
                   missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
        """Load pre-hook: a clear error for a checkpoint of another backbone or with missing deltas."""
        path, keep = self._frozen(module)
        start = prefix + path
        backbone_part = {k[len(start) :]: v for k, v in state_dict.items() if k.startswith(start)}
        model_tensors = state_tensors(module.get_submodule(self.backbone_path))
        check_fit(backbone_part, model_tensors, keep, strict=strict, allow_frozen=True)

    def drop_expected_missing(self, module: nn.Module, incompatible_keys: Any) -> None:
        """Load post-hook: frozen backbone keys are expected to be missing; any other stays an error."""
        path, keep = self._frozen(module)
        incompatible_keys.missing_keys[:] = [
            k for k in incompatible_keys.missing_keys if not (k.startswith(path) and k[len(path) :] not in keep)
        ]


def _locate_backbone(model: nn.Module, recorded_path: str, state: Mapping[str, torch.Tensor]):
    """Where the backbone sits in ``model`` and the state keys relative to ``model``."""
    if not recorded_path:
        return model, "", dict(state)
    try:
        return model.get_submodule(recorded_path), _prefix(recorded_path), dict(state)
    except AttributeError:
        pass
    # ``model`` is the backbone itself: keep only the backbone's keys, relative to it.
    start = _prefix(recorded_path)
    outside = [k for k in state if not k.startswith(start)]
    if outside:
        raise DeltaStateError(
            f"the checkpoint also holds tensors outside its backbone {recorded_path!r} (first: {outside[:3]});"
            f" load it into the module that holds the backbone (the LightningModule) instead of {type(model).__name__}"
        )
    return model, "", {k[len(start) :]: v for k, v in state.items()}


def load_delta(
    model: nn.Module,
    checkpoint: str | Path | Mapping[str, Any],
    *,
    strict: bool = True,
    map_location: Any = "cpu",
    specs: Sequence[DeltaConfig] | None = None,
    trainable: Iterable[str] | None = None,
    module: str | None = None,
) -> DeltaModel:
    """Attaches the deltas a checkpoint records to ``model`` and loads their weights.

    ``model`` is freshly built with its pretrained backbone: the LightningModule the
    checkpoint came from, or the backbone alone (e.g. the transformers model).

    Args:
        model: the module to load into.
        checkpoint: a path to a ``.ckpt`` file (read with ``weights_only=True``) or a loaded dict.
        strict: whether a delta tensor missing from the checkpoint is an error.
        map_location: passed to ``torch.load``.
        specs: delta configs to attach, for files without a delta record (``save_weights_only=True``).
        trainable: trainable module patterns, for files without a delta record.
        module: dotted path of the backbone inside ``model``, for files without a delta record
            (default: ``model`` itself).

    Returns:
        The :class:`DeltaModel` of the backbone, frozen but for deltas and trainable modules.

    Raises:
        CheckpointReadError: the file is missing, truncated or not a safe checkpoint.
        DeltaStateError: the checkpoint does not fit the model; the model is left as it was.
    """
    ckpt = checkpoint if isinstance(checkpoint, Mapping) else read_checkpoint(checkpoint, map_location)
    state = ckpt.get("state_dict", ckpt)
    meta = ckpt.get(META_KEY)
    if specs is None:
        if meta is None:
            raise DeltaStateError(
                "the checkpoint has no lightning_delta record (written with ModelCheckpoint(save_weights_only=True)"
                " or by another tool): pass the deltas it holds, e.g. load_delta(model, path,"
                " specs=[LoraConfig(r=8, targets=['query', 'value'])], trainable=['classifier'])"
            )
        specs = [config_from_dict(s) for s in meta["specs"]]
    if trainable is None:
        trainable = meta["trainable"] if meta else ()
    backbone, prefix, state = _locate_backbone(model, meta["backbone"] if meta else module or "", state)
    notes = compare_fingerprint(meta["fingerprint"], backbone) if meta else []

    grads = {p: p.requires_grad for p in model.parameters()}
    recorded_trainable = backbone.__dict__.get(TRAINABLE_ATTR)
    added: list[str] = []
    try:
        added = ensure_attached(backbone, specs)
        handle = DeltaModel(backbone).freeze_backbone(trainable)
        expected = {prefix + k for k in kept_keys(backbone)}
        if prefix:
            expected |= {k for k in state_tensors(model) if not k.startswith(prefix)}
        load_into(model, state, expected, strict=strict)
    except Exception:
        for name in added:
            detach_delta(backbone, name)
        for p, flag in grads.items():
            p.requires_grad_(flag)
        if recorded_trainable is None:
            backbone.__dict__.pop(TRAINABLE_ATTR, None)
        else:
            backbone.__dict__[TRAINABLE_ATTR] = recorded_trainable
        raise
    for note in notes:
        warnings.warn(note, stacklevel=2)
    return handle


def attach_from_checkpoint(root: nn.Module, checkpoint: Mapping[str, Any]) -> DeltaModel:
    """Attaches the deltas a checkpoint dict records and makes ``root`` accept delta-only state dicts.

    Call it from ``LightningModule.on_load_checkpoint`` so that ``Model.load_from_checkpoint(path)``
    rebuilds the backbone from its pretrained source in ``__init__`` and loads the delta on top
    (``load_from_checkpoint`` runs no callbacks). Idempotent: during a resume the
    ``DeltaCallback`` has attached the same deltas already.

    Raises:
        DeltaStateError: the checkpoint has no delta record.
    """
    meta = checkpoint.get(META_KEY)
    if meta is None:
        raise DeltaStateError(
            "the checkpoint has no lightning_delta record (written with save_weights_only=True or without"
            " DeltaCallback): use load_delta(model, path, specs=[...]) instead"
        )
    backbone = root.get_submodule(meta["backbone"])
    ensure_attached(backbone, [config_from_dict(s) for s in meta["specs"]])
    handle = DeltaModel(backbone).freeze_backbone(meta["trainable"])
    DeltaCheckpointHooks.install(root, meta["backbone"])
    return handle
