"""Delta-only checkpoints of a root module (e.g. a LightningModule) and loading them back.

:class:`DeltaCheckpointHooks` lives in the root's state-dict hooks, so every path that calls
``root.state_dict()`` (``trainer.save_checkpoint``, ``ModelCheckpoint`` with or without
``save_weights_only``) writes only delta and trainable tensors of the backbone, while
``root.load_state_dict(strict=True)`` accepts such a file: frozen backbone keys may be
missing, everything else is checked. :func:`load_delta` rebuilds a model from a checkpoint.
"""

from __future__ import annotations

import warnings
from collections.abc import Collection, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from lightning_delta.core import DeltaConfig
from lightning_delta.engine import detach_delta
from lightning_delta.errors import CheckpointReadError, DeltaStateError, NonFiniteError
from lightning_delta.files import read_checkpoint, read_pair, write_pair
from lightning_delta.fingerprint import compare_fingerprint, fingerprint
from lightning_delta.handle import DeltaModel, ensure_attached
from lightning_delta.methods import config_from_dict
from lightning_delta.peft_format import import_peft
from lightning_delta.state import (
    TRAINABLE_ATTR,
    check_fit,
    kept_keys,
    load_into,
    non_finite_keys,
    state_tensors,
    unowned_trainable_keys,
)
from lightning_delta.targets import normalize_patterns
from lightning_delta.version import __version__

#: Key of the delta record in a Lightning checkpoint dict.
META_KEY = "lightning_delta"
FORMAT_VERSION = 1
_HOOKS_ATTR = "_lightning_delta_checkpoint_hooks"
M = TypeVar("M", bound=nn.Module)


def _prefix(path: str) -> str:
    return path + "." if path else ""


def checkpoint_metadata(root: nn.Module, backbone_path: str, names: Collection[str] | None = None) -> dict[str, Any]:
    """The delta record a checkpoint carries: specs, trainable patterns, the backbone's fingerprint (its
    class and ``name_or_path`` among them) and its transformers config (to rebuild it as trained).

    With ``names``, only those deltas and no trainable modules are recorded.
    """
    backbone = root.get_submodule(backbone_path)
    configs = DeltaModel(backbone).configs
    hf_config = getattr(backbone, "config", None)
    return {
        "format": FORMAT_VERSION,
        "version": __version__,
        "backbone": backbone_path,
        "specs": [config.to_dict() for n, config in configs.items() if names is None or n in names],
        "trainable": list(getattr(backbone, TRAINABLE_ATTR, ())) if names is None else [],
        "fingerprint": fingerprint(backbone),
        "backbone_config": hf_config.to_dict() if hasattr(hf_config, "to_dict") else None,
    }


def spec_differences(recorded: Sequence[Mapping[str, Any]], configs: Mapping[str, DeltaConfig]) -> list[str]:
    """Differences in method and hyper-parameters between recorded specs and attached configs."""
    mine = {name: c.settings() for name, c in configs.items()}
    theirs = {s["name"]: config_from_dict(s).settings() for s in recorded}
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


def _locate_backbone(model: nn.Module, recorded_path: str, state: Mapping[str, torch.Tensor],
                     recorded_class: str | None = None):
    """Where the backbone sits in ``model`` and the state keys relative to ``model``."""
    if not recorded_path:
        # saved from the backbone itself (save_delta): find it inside ``model`` by its class if needed
        if recorded_class and type(model).__name__ != recorded_class:
            found = [n for n, m in model.named_modules() if n and type(m).__name__ == recorded_class]
            if len(found) == 1:
                start = _prefix(found[0])
                return model.get_submodule(found[0]), start, {start + k: v for k, v in state.items()}
        return model, "", dict(state)
    try:
        inside = model.get_submodule(recorded_path)
    except AttributeError:
        inside = None
    # ``model`` holds the backbone at the recorded path -- unless ``model`` is the backbone itself and
    # merely has a submodule of that name (a LlamaForCausalLM's ``.model``, for a task's ``model``)
    if inside is not None and not (recorded_class and type(model).__name__ == recorded_class
                                   and type(inside).__name__ != recorded_class):
        return inside, _prefix(recorded_path), dict(state)
    # ``model`` is the backbone itself: keep only the backbone's keys, relative to it.
    start = _prefix(recorded_path)
    outside = [k for k in state if not k.startswith(start)]
    if outside:
        raise DeltaStateError(
            f"the checkpoint also holds tensors outside its backbone {recorded_path!r} (first: {outside[:3]});"
            f" load it into the module that holds the backbone (the LightningModule) instead of {type(model).__name__}"
        )
    return model, "", {k[len(start) :]: v for k, v in state.items()}


DELTA_TENSORS = "delta.safetensors"
DELTA_RECORD = "delta.json"


def save_delta(model: nn.Module, directory: str | Path, names: str | Iterable[str] | None = None) -> Path:
    """Writes the deltas of ``model`` (the backbone they are attached to) as safetensors + JSON: no pickle.

    ``directory/delta.safetensors`` holds the delta and trainable tensors, ``directory/delta.json``
    the specs, trainable patterns, backbone fingerprint and library version. ``load_delta(model,
    directory)`` reads it back into the backbone or into a module that holds it.

    Args:
        names: save only these deltas (one task of several), without trainable modules.

    Raises:
        DeltaStateError: ``model`` has no delta attached.
        DeltaConfigError: an unknown name.
    """
    import json

    from safetensors.torch import save as safetensors_bytes

    handle = DeltaModel(model)
    if not handle.deltas():
        raise DeltaStateError(f"{type(model).__name__} has no delta attached: nothing to save")
    chosen = None if names is None else [d.name for d in handle._selected(names)]
    keys = kept_keys(model, chosen, () if chosen is not None else None)
    if chosen is None:
        loose = unowned_trainable_keys(model)
        if loose:
            raise DeltaStateError(
                f"{len(loose)} backbone parameters outside the deltas require grad (e.g. {loose[:3]}): the backbone"
                " is not frozen, so save_delta would not know what belongs to the delta. Call"
                " DeltaModel(model).freeze_backbone(trainable=[...]) first, naming the modules trained whole")
    tensors = {k: t.detach().contiguous().cpu() for k, t in state_tensors(model).items() if k in keys}
    broken = non_finite_keys(tensors)
    if broken:
        raise NonFiniteError(f"{broken[0]} holds NaN or infinite values ({len(broken)} such tensors): refusing to"
                             " save them; the previous save, if any, is kept")
    payload = safetensors_bytes(tensors, metadata={"format": "lightning_delta"})
    record = checkpoint_metadata(model, "", chosen)

    def record_bytes(digest: str) -> bytes:
        return json.dumps({**record, "tensors_sha256": digest}, indent=2).encode()

    return write_pair(directory, DELTA_TENSORS, payload, DELTA_RECORD, record_bytes)


def read_delta_dir(directory: str | Path) -> dict[str, Any]:
    """Reads a :func:`save_delta` folder into the dict ``load_delta`` takes.

    The tensors must be the ones the record names (by SHA-256); a save interrupted between its two
    renames still reads back, as its new version.

    Raises:
        CheckpointReadError: a file is missing, unreadable, or does not belong with the other.
    """
    import json

    from safetensors.torch import load as safetensors_load

    directory = Path(directory)

    def parse(record: bytes) -> dict[str, Any]:
        try:
            parsed = json.loads(record)
        except (ValueError, UnicodeDecodeError) as err:
            raise CheckpointReadError(f"{str(directory / DELTA_RECORD)!r} is not valid JSON: {err}") from err
        if not isinstance(parsed, dict) or not isinstance(parsed.get("specs"), list):
            raise CheckpointReadError(f"{str(directory / DELTA_RECORD)!r} is not a delta record (no 'specs' list)")
        return parsed

    payload, record = read_pair(directory, DELTA_TENSORS, DELTA_RECORD, lambda b: parse(b).get("tensors_sha256"))
    try:
        tensors = safetensors_load(payload)
    except Exception as err:  # safetensors raises its own SafetensorError for a torn or garbled file
        raise CheckpointReadError(f"{str(directory / DELTA_TENSORS)!r} is not a readable safetensors file:"
                                  f" {err}") from err
    return {"state_dict": tensors, META_KEY: parse(record)}


def load_delta(
    model: M,
    checkpoint: str | Path | Mapping[str, Any],
    *,
    strict: bool = True,
    map_location: Any = "cpu",
    specs: Sequence[DeltaConfig] | None = None,
    trainable: Iterable[str] | None = None,
    module: str | None = None,
) -> M:
    """Attaches the deltas a checkpoint records to ``model`` and loads their weights.

    ``model`` is freshly built with its pretrained backbone: the LightningModule the
    checkpoint came from, or the backbone alone (e.g. the transformers model).

    Args:
        model: the module to load into.
        checkpoint: a ``.ckpt`` file (read with ``weights_only=True``), a :func:`save_delta` folder,
            a PEFT adapter folder (see :func:`lightning_delta.peft_format.import_peft`; ``module`` names the
            transformers model inside ``model``), or a loaded dict.
        strict: whether a delta tensor missing from the checkpoint is an error.
        map_location: passed to ``torch.load``.
        specs: delta configs to attach, for files without a delta record (``save_weights_only=True``).
        trainable: trainable module patterns, for files without a delta record.
        module: dotted path of the backbone inside ``model``, for files without a delta record
            (default: ``model`` itself).

    Returns:
        ``model`` itself, its backbone frozen but for the deltas and trainable modules (ready for
        ``model.eval()``); ``DeltaModel(model)`` is its handle (``merge()``, ``summary()``, ...).

    Raises:
        CheckpointReadError: the file is missing, truncated or not a safe checkpoint.
        DeltaStateError: the checkpoint does not fit the model; the model is left as it was.
    """
    if isinstance(checkpoint, Mapping):
        ckpt = checkpoint
    elif Path(checkpoint).is_dir() and (Path(checkpoint) / "adapter_config.json").is_file():
        import_peft(model.get_submodule(module) if module else model, checkpoint)
        return model
    elif Path(checkpoint).is_dir():
        ckpt = read_delta_dir(checkpoint)
    else:
        ckpt = read_checkpoint(checkpoint, map_location)
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
    recorded_class = meta["fingerprint"].get("class") if meta else None
    backbone, prefix, state = _locate_backbone(model, meta["backbone"] if meta else module or "", state,
                                               recorded_class)
    notes = compare_fingerprint(meta["fingerprint"], backbone) if meta else []

    grads = {p: p.requires_grad for p in model.parameters()}
    recorded_trainable = backbone.__dict__.get(TRAINABLE_ATTR)
    trainable = list(dict.fromkeys([*(recorded_trainable or ()), *normalize_patterns(trainable)]))
    added: list[str] = []
    try:
        added = ensure_attached(backbone, specs)
        DeltaModel(backbone).freeze_backbone(trainable)
        names = {s.name or s.method for s in specs}
        # the deltas this file holds and its trainable modules; other deltas already attached are not its business
        expected = {prefix + k for k in kept_keys(backbone, names, normalize_patterns(meta["trainable"] if meta
                                                                                       else trainable))}
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
    return model


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
