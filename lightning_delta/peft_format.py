"""PEFT's adapter format both ways: ``adapter_config.json`` + ``adapter_model.safetensors``.

:func:`export_peft` writes a delta that ``peft.PeftModel.from_pretrained(base_model, directory)``
loads to the same outputs; :func:`import_peft` attaches a PEFT adapter folder as native deltas that
give PEFT's outputs. Both handle ``lora`` (incl. rslora, PEFT's embedding and conv LoRA, and on
export every ``init``), ``dora``, ``ia3``, ``prompt`` and ``prefix`` (export: without the projection,
or after ``fold()``), and a sequence classifier's head (PEFT's ``modules_to_save``). Export also
writes ``adalora``, ``vera`` (with the shared projections), ``loha``, ``lokr`` and ``oft``
(``nn.Linear`` targets: PEFT's LoHa, LoKr and OFT take no ``Conv1D``). Methods one side has no
equivalent for raise a clear error.

A PiSSA / OLoRA LoRA trains beside the residual ``W - s B0 A0``, but the export is loaded onto the
original weight ``W``: as PEFT's own conversion (``path_initial_model_for_weight_conversion``), it
is written as the rank-``2r`` LoRA ``A' = [A; A0]``, ``B' = [B, -B0]`` with ``alpha' = 2 alpha``
(``sqrt(2) alpha`` with rslora), so ``W + s (B A - B0 A0)`` is what our model computes.

An AdaLoRA delta is written with its ``rank_pattern`` (PEFT's format): per target only the kept
triplets (mask on, or a singular value not zero) of ``lora_A``, ``lora_E``, ``lora_B``; PEFT
resizes its layers to those ranks on load, keeping the scale ``alpha / init_r``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_delta.core import iter_deltas
from lightning_delta.engine import detach_delta
from lightning_delta.errors import CheckpointReadError, DeltaConfigError, DeltaStateError
from lightning_delta.files import read_pair, write_pair
from lightning_delta.handle import DeltaModel
from lightning_delta.methods import METHODS, peft_reader
from lightning_delta.methods.peft_backend import PeftDeltaConfig, _require_peft
from lightning_delta.state import TRAINABLE_ATTR, canonical, load_into, state_tensors, trainable_module_names

PEFT_CONFIG, PEFT_TENSORS = "adapter_config.json", "adapter_model.safetensors"
#: safetensors metadata key of the adapter config's SHA-256 in folders export_peft writes
CONFIG_DIGEST_KEY = "lightning_delta_config_sha256"
_PREFIX, _PROMPT_LEARNING_PREFIX = "base_model.model.", "base_model."


def peft_methods() -> list[str]:
    """The registered methods :func:`export_peft` can write (those whose config implements ``peft_config``)."""
    return [name for name, cls in METHODS.items() if cls.exports_to_peft()]


def _task_type(model: nn.Module) -> str | None:
    name = type(model).__name__
    if name.endswith("ForSequenceClassification"):
        return "SEQ_CLS"
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return "SEQ_2_SEQ_LM"
    if name.endswith(("ForCausalLM", "LMHeadModel")):
        return "CAUSAL_LM"
    return None


def _saved_modules(model: nn.Module) -> list[str]:
    """Modules trained whole, written as PEFT's ``modules_to_save``: ``trainable=`` ones and a classifier head.

    A module inside another one listed (``classifier.dense`` beside ``classifier``) is left out: PEFT
    wraps the outer module, and a wrapped child of it would not be found there.
    """
    paths = trainable_module_names(model, getattr(model, TRAINABLE_ATTR, ()))
    if _task_type(model) == "SEQ_CLS":  # PEFT always keeps the classification head as a module to save
        paths += [h for h in ("classifier", "score") if isinstance(getattr(model, h, None), nn.Module)]
    paths = list(dict.fromkeys(paths))
    return [p for p in paths if not any(p.startswith(f"{outer}.") for outer in paths)]


def _peft_config(model: nn.Module, name: str):
    deltas = list(iter_deltas(model, name))
    common = {"task_type": _task_type(model), "modules_to_save": _saved_modules(model) or None}
    return deltas[0].module.config.peft_config(deltas, **common)


def _tensors(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    deltas = list(iter_deltas(model, name))
    for d in deltas:
        out.update(d.module.peft_state(f"{_PREFIX}{d.target_path}"))
    module_prefix = deltas[0].module.config.peft_module_prefix
    for path in _saved_modules(model):
        state = model.get_submodule(path).state_dict()
        out.update({f"{module_prefix}{path}.{k}": v.detach() for k, v in state.items()})
    return {k: v.contiguous().cpu() for k, v in out.items()}


def export_peft(model: nn.Module, directory: str | Path, name: str | None = None) -> Path:
    """Writes delta ``name`` (default: the only one attached) of ``model`` in PEFT's adapter format.

    Modules trained whole (``trainable=[...]``, a sequence classifier's head) are written as PEFT's
    ``modules_to_save``.

    Raises:
        DeltaConfigError: no such delta, or a method PEFT has no equivalent for.
    """
    from safetensors.torch import save as safetensors_bytes

    handle = DeltaModel(model)
    names = list(handle.configs)
    if name is None:
        if len(names) != 1:
            raise DeltaConfigError(f"name which delta to export: attached are {names}")
        name = names[0]
    if name not in handle.configs:
        raise DeltaConfigError(f"no delta named {name!r}; attached: {names}")
    method = handle.configs[name].method
    if not type(handle.configs[name]).exports_to_peft():
        raise DeltaConfigError(f"PEFT has no equivalent of {method!r}; exportable methods: {peft_methods()}")
    import tempfile

    _require_peft()  # before anything is written
    config, tensors = _peft_config(model, name), _tensors(model, name)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory, prefix=".export.") as staging:
        config.save_pretrained(staging)  # PEFT's own serialisation of its config
        config_bytes = (Path(staging) / PEFT_CONFIG).read_bytes()

    def tensor_bytes(config_digest: str) -> bytes:
        return safetensors_bytes(tensors, metadata={"format": "pt", CONFIG_DIGEST_KEY: config_digest})

    # the tensors file carries the config's digest: import_peft never pairs a config with foreign tensors
    return write_pair(directory, PEFT_CONFIG, config_bytes, PEFT_TENSORS, tensor_bytes)


def _config_digest(tensor_file: bytes) -> str | None:
    """The adapter config's SHA-256 that :func:`export_peft` put in the tensors' safetensors metadata."""
    try:
        size = int.from_bytes(tensor_file[:8], "little")
        header = json.loads(tensor_file[8:8 + size])
        return (header.get("__metadata__") or {}).get(CONFIG_DIGEST_KEY)
    except (ValueError, UnicodeDecodeError, AttributeError):
        return None  # not a safetensors header: the load below says so


def read_peft_dir(directory: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The adapter config and tensors of a PEFT adapter folder (safetensors only: no pickle).

    Raises:
        CheckpointReadError: files missing or unreadable, only a pickled ``adapter_model.bin``, or (for a
            folder :func:`export_peft` wrote) a config and tensors from different saves.
    """
    from safetensors.torch import load as safetensors_load

    directory = Path(directory)
    if not (directory / PEFT_TENSORS).is_file() and (directory / "adapter_model.bin").is_file():
        raise CheckpointReadError(
            f"{str(directory)!r} holds a pickled adapter_model.bin, which lightning_delta does not unpickle; convert"
            " it once where you trust it: PeftModel.from_pretrained(base, dir).save_pretrained(dir,"
            " safe_serialization=True)")
    config, tensors = read_pair(directory, PEFT_CONFIG, PEFT_TENSORS, _config_digest)
    try:
        settings = json.loads(config)
        if not isinstance(settings, dict):
            raise ValueError(f"a JSON {type(settings).__name__}, not an object")
        return settings, safetensors_load(tensors)
    except Exception as err:  # JSON errors, safetensors' own SafetensorError
        raise CheckpointReadError(f"{str(directory)!r} is not a readable PEFT adapter folder"
                                  f" ({PEFT_CONFIG} + {PEFT_TENSORS}): {err}") from err


def _split(model: nn.Module, tensors: dict[str, torch.Tensor]):
    """An adapter's tensors sorted out against ``model``.

    Returns:
        ``parts`` (adapter tensors by target path, then by PEFT's name on the target), ``shared``
        (tensors on no target), ``backbone`` (tensors with a place in the model: heads PEFT trained
        whole, embeddings it saved beside an embedding LoRA, by backbone key) and ``heads`` (the
        modules of the former, to train).
    """
    modules = {name for name, _ in model.named_modules()}
    model_tensors = set(state_tensors(model))
    parts: dict[str, dict[str, torch.Tensor]] = {}
    shared: dict[str, torch.Tensor] = {}
    backbone: dict[str, torch.Tensor] = {}
    heads: set[str] = set()
    for key, tensor in tensors.items():
        # base_model.model.<path> for tuners; base_model.<path> for a prompt-learning adapter's head
        prefix = next((p for p in (_PREFIX, _PROMPT_LEARNING_PREFIX) if key.startswith(p)), None)
        if prefix is None:
            shared[key] = tensor
            continue
        rest = key[len(prefix):]
        plain = canonical(rest.replace("modules_to_save.", "").replace("original_module.", ""))
        if plain in model_tensors:  # a head (modules_to_save) or a wrapped embedding PEFT saved as it is
            backbone[plain] = tensor
            if ".base_layer." not in rest:
                heads.add(plain.rsplit(".", 1)[0])
            continue
        if prefix is _PROMPT_LEARNING_PREFIX:  # shared tensors of a tuner (VeRA's base_model.vera_A)
            shared[key] = tensor
            continue
        pieces = rest.split(".")
        target = next((".".join(pieces[:n]) for n in range(len(pieces) - 1, 0, -1)
                       if ".".join(pieces[:n]) in modules), None)
        if target is None:
            raise DeltaStateError(f"the adapter does not fit {type(model).__name__}: no place for {key!r}; load it"
                                  " into the base model it was trained on")
        parts.setdefault(target, {})[rest[len(target) + 1:]] = tensor
    return parts, shared, backbone, sorted(heads)


def import_peft(model: nn.Module, directory: str | Path, name: str | None = None) -> DeltaModel:
    """Attaches the PEFT adapter in ``directory`` to ``model`` as native deltas, frozen backbone and all.

    ``model`` is the base model the adapter was trained on (the transformers model, not a
    ``PeftModel``). A sequence classifier's head saved by PEFT (``modules_to_save``) is loaded into
    the backbone and made trainable. The outputs equal ``PeftModel.from_pretrained(model, directory)``'s.
    Read natively: LoRA (incl. DoRA and embedding LoRA), IA3, VeRA, LoHa, LoKr, OFT, prompt and prefix
    tuning (each config's ``from_peft`` and each delta's ``load_peft_state``); other PEFT types (AdaLoRA,
    ...) are attached through the PEFT backend (:class:`~lightning_delta.methods.peft_backend.PeftDeltaConfig`).

    Raises:
        CheckpointReadError: the folder is not a readable PEFT adapter.
        DeltaConfigError: a PEFT option the method does not have (LoRA rank/alpha patterns, bias training, ...).
        DeltaStateError: the adapter does not fit ``model``; the model is left as it was.
    """
    settings, tensors = read_peft_dir(directory)
    config_cls = peft_reader(settings)
    if config_cls is None:
        return _import_through_peft(model, settings, tensors, name)
    parts, shared, backbone, heads = _split(model, tensors)
    config = config_cls.from_peft(settings, parts, name)
    handle = DeltaModel(model)
    before = set(handle.configs)
    handle.attach(config)
    delta_name = next(n for n in handle.configs if n not in before)
    try:
        state = dict(backbone)
        for d in handle.deltas(delta_name):
            found = d.module.load_peft_state(parts.get(d.target_path, {}), shared)
            state.update({f"{d.path}.{k}" if d.path else k: v for k, v in found.items()})
        load_into(model, state, set(state), strict=True)
    except (KeyError, RuntimeError) as err:
        detach_delta(model, delta_name)
        raise DeltaStateError(f"the adapter does not fit {type(model).__name__} ({type(err).__name__}: {err});"
                              " load it into the base model it was trained on") from err
    except Exception:
        detach_delta(model, delta_name)
        raise
    return handle.freeze_backbone([*getattr(model, TRAINABLE_ATTR, ()), *heads])


def _import_through_peft(model: nn.Module, peft_config: dict[str, Any], tensors: dict[str, torch.Tensor],
                         name: str | None) -> DeltaModel:
    """A PEFT adapter without a native equivalent, injected by PEFT and handled like a native delta."""
    peft = _require_peft()
    # trainable, and no task type: PEFT would wrap a classifier head (modules_to_save) and rename its
    # tensors; the head loads into the backbone as it is, like the native path
    settings = {k: v for k, v in peft_config.items() if not k.startswith("_")}
    settings.update(inference_mode=False, task_type=None, modules_to_save=None)
    handle = DeltaModel(model)
    before = set(handle.configs)
    try:
        handle.attach(PeftDeltaConfig(peft=settings, **({"name": name} if name else {})))
    except ValueError as err:  # PEFT's own refusal, e.g. VeRA's shared state outside get_peft_model
        raise DeltaConfigError(f"PEFT cannot attach this {peft_config.get('peft_type')} adapter to a plain model"
                               f" ({err}); load it with peft.PeftModel.from_pretrained(model, dir) instead") from err
    delta_name = next(n for n in handle.configs if n not in before)
    try:
        state = {k[len(_PREFIX):] if k.startswith(_PREFIX) else k: v for k, v in tensors.items()}
        backbone_keys = set(state_tensors(model))
        adapter = {k: v for k, v in state.items() if k not in backbone_keys}
        heads = {k: v for k, v in state.items() if k not in adapter}
        result = peft.set_peft_model_state_dict(model, adapter, adapter_name=delta_name)
        if result.unexpected_keys:
            raise DeltaStateError(f"the adapter does not fit {type(model).__name__}: no place for"
                                  f" {result.unexpected_keys[:5]}; load it into the base model it was trained on")
        load_into(model, heads, set(heads), strict=True)
    except Exception:
        detach_delta(model, delta_name)
        raise
    modules = sorted({k.rsplit(".", 1)[0] for k in heads})
    return handle.freeze_backbone([*getattr(model, TRAINABLE_ATTR, ()), *modules])
