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
from lightning_delta.errors import CheckpointReadError, DeltaConfigError
from lightning_delta.handle import DeltaModel
from lightning_delta.state import TRAINABLE_ATTR, canonical, trainable_module_names

def peft_methods() -> list[str]:
    """The registered methods :func:`export_peft` can write (those whose config implements ``peft_config``)."""
    from lightning_delta.methods import METHODS

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
    """Modules trained whole, written as PEFT's ``modules_to_save``: ``trainable=`` ones and a classifier head."""
    paths = trainable_module_names(model, getattr(model, TRAINABLE_ATTR, ()))
    if _task_type(model) == "SEQ_CLS":  # PEFT always keeps the classification head as a module to save
        paths += [h for h in ("classifier", "score") if isinstance(getattr(model, h, None), nn.Module)]
    return list(dict.fromkeys(paths))


def _peft_config(model: nn.Module, name: str):
    deltas = list(iter_deltas(model, name))
    common = {"task_type": _task_type(model), "modules_to_save": _saved_modules(model) or None}
    return deltas[0].module.config.peft_config(deltas, **common)


def _tensors(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for d in iter_deltas(model, name):
        out.update(d.module.peft_state(f"base_model.model.{d.target_path}"))
    for path in _saved_modules(model):
        state = model.get_submodule(path).state_dict()
        out.update({f"base_model.model.{path}.{k}": v.detach() for k, v in state.items()})
    return {k: v.contiguous().cpu() for k, v in out.items()}


def export_peft(model: nn.Module, directory: str | Path, name: str | None = None) -> Path:
    """Writes delta ``name`` (default: the only one attached) of ``model`` in PEFT's adapter format.

    Modules trained whole (``trainable=[...]``, a sequence classifier's head) are written as PEFT's
    ``modules_to_save``.

    Raises:
        DeltaConfigError: no such delta, or a method PEFT has no equivalent for.
    """
    from safetensors.torch import save_file

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
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _peft_config(model, name).save_pretrained(str(directory))
    save_file(_tensors(model, name), str(directory / "adapter_model.safetensors"))
    return directory


PEFT_CONFIG, PEFT_TENSORS = "adapter_config.json", "adapter_model.safetensors"
_PREFIX = "base_model.model."
_PEFT_PARTS = {"lora_A.weight": "A", "lora_B.weight": "B", "lora_embedding_A": "A", "lora_embedding_B": "B",
               "lora_magnitude_vector": "magnitude", "ia3_l": "scale", "lora_magnitude_vector.weight": "magnitude"}


def read_peft_dir(directory: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The adapter config and tensors of a PEFT adapter folder (safetensors only: no pickle).

    Raises:
        CheckpointReadError: files missing or unreadable, or only a pickled ``adapter_model.bin``.
    """
    from safetensors.torch import load_file

    directory = Path(directory)
    if not (directory / PEFT_TENSORS).is_file() and (directory / "adapter_model.bin").is_file():
        raise CheckpointReadError(
            f"{str(directory)!r} holds a pickled adapter_model.bin, which lightning_delta does not unpickle; convert"
            " it once where you trust it: PeftModel.from_pretrained(base, dir).save_pretrained(dir,"
            " safe_serialization=True)")
    try:
        return json.loads((directory / PEFT_CONFIG).read_text()), load_file(str(directory / PEFT_TENSORS))
    except (OSError, ValueError) as err:
        raise CheckpointReadError(f"{str(directory)!r} is not a readable PEFT adapter folder"
                                  f" ({PEFT_CONFIG} + {PEFT_TENSORS}): {err}") from err


def _split(tensors: dict[str, torch.Tensor]):
    """Adapter tensors by target path and part; the other tensors by backbone key; which of those PEFT wrapped."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    others: dict[str, torch.Tensor] = {}
    wrapped: set[str] = set()
    for key, tensor in tensors.items():
        rest = key[len(_PREFIX):] if key.startswith(_PREFIX) else key
        for suffix, part in _PEFT_PARTS.items():
            if rest.endswith("." + suffix):
                parts.setdefault(rest[: -len(suffix) - 1], {})[part] = tensor
                break
        else:  # a head PEFT trained whole (modules_to_save), or an embedding it saved beside a LoRA
            others[canonical(rest.replace("modules_to_save.", "").replace("original_module.", ""))] = tensor
            if ".base_layer." in rest:
                wrapped.add(canonical(rest))
    return parts, others, wrapped


def _import_config(peft_config: dict[str, Any], parts: dict[str, dict[str, torch.Tensor]], name: str | None):
    from lightning_delta.methods import make_config

    kind = peft_config.get("peft_type")
    common = {"name": name} if name else {}
    if kind == "LORA":
        unsupported = {k: peft_config[k] for k in ("rank_pattern", "alpha_pattern") if peft_config.get(k)}
        if peft_config.get("bias", "none") != "none":
            unsupported["bias"] = peft_config["bias"]
        if unsupported:
            raise DeltaConfigError(
                f"this PEFT LoRA uses {unsupported}, which lightning_delta's LoRA does not have (one rank and alpha"
                " per delta, no bias training); attach it through PEFT instead: attach(model, peft_config=...)")
        method = "dora" if peft_config.get("use_dora") else "lora"
        return make_config(method, r=int(peft_config["r"]), alpha=float(peft_config["lora_alpha"]),
                           dropout=float(peft_config.get("lora_dropout") or 0.0),
                           rslora=bool(peft_config.get("use_rslora")), targets=sorted(parts), **common)
    if kind == "IA3":
        feedforward = sorted(path for path, t in parts.items() if t["scale"].shape[0] == 1 and t["scale"].dim() == 2)
        return make_config("ia3", targets=sorted(parts), feedforward=feedforward, **common)
    if kind in ("PROMPT_TUNING", "PREFIX_TUNING"):
        if peft_config.get("num_transformer_submodules") not in (None, 1):
            raise DeltaConfigError(
                f"num_transformer_submodules={peft_config['num_transformer_submodules']}: lightning_delta's soft"
                " prompts and prefixes are single (the encoder side for T5); attach through PEFT instead")
        method = "prompt" if kind == "PROMPT_TUNING" else "prefix"
        return make_config(method, num_virtual_tokens=int(peft_config["num_virtual_tokens"]), **common)
    return None  # no native equivalent: PEFT's own layers (see _import_through_peft)


def import_peft(model: nn.Module, directory: str | Path, name: str | None = None) -> DeltaModel:
    """Attaches the PEFT adapter in ``directory`` to ``model`` as native deltas, frozen backbone and all.

    ``model`` is the base model the adapter was trained on (the transformers model, not a
    ``PeftModel``). A sequence classifier's head saved by PEFT (``modules_to_save``) is loaded into
    the backbone and made trainable. The outputs equal ``PeftModel.from_pretrained(model, directory)``'s.
    PEFT types without a native equivalent (LoHa, LoKr, VeRA, OFT, AdaLoRA, ...) are attached through
    the PEFT backend (:class:`~lightning_delta.methods.peft_backend.PeftDeltaConfig`), needing ``peft``.

    Raises:
        CheckpointReadError: the folder is not a readable PEFT adapter.
        DeltaConfigError: a LoRA option without a native equivalent (rank/alpha patterns, bias).
        DeltaStateError: the adapter does not fit ``model``; the model is left as it was.
    """
    from lightning_delta.core import detach_delta
    from lightning_delta.errors import DeltaStateError
    from lightning_delta.state import load_into, state_tensors

    peft_config, tensors = read_peft_dir(directory)
    parts, others, wrapped = _split(tensors)
    config = _import_config(peft_config, parts, name)
    if config is None:
        return _import_through_peft(model, peft_config, tensors, name)
    handle = DeltaModel(model)
    before = set(handle.configs)
    model_tensors = state_tensors(model)
    unknown = [k for k in others if k not in model_tensors and k != "prompt_embeddings"]
    if unknown:
        raise DeltaStateError(f"the adapter does not fit {type(model).__name__}: no place for {unknown[:5]};"
                              " load it into the base model it was trained on")
    # modules PEFT trained whole (its modules_to_save) train here too; an embedding PEFT saved beside an
    # embedding LoRA (its keys name the wrapped ``base_layer``) loads as it is and stays frozen
    heads = sorted({k.rsplit(".", 1)[0] for k in others if k != "prompt_embeddings" and k not in wrapped})
    handle.attach(config)
    delta_name = next(n for n in handle.configs if n not in before)
    try:
        state = {k: v for k, v in others.items() if k != "prompt_embeddings"}
        for d in handle.deltas(delta_name):
            if d.module.config.method in ("prompt", "prefix"):
                state[f"{d.path}.embedding"] = others["prompt_embeddings"]
                continue
            for part, tensor in parts[d.target_path].items():
                mine = getattr(d.module, part)
                state[f"{d.path}.{part}"] = tensor.reshape(mine.shape)
        load_into(model, state, set(state), strict=True)
    except Exception:
        detach_delta(model, delta_name)
        raise
    return handle.freeze_backbone([*getattr(model, TRAINABLE_ATTR, ()), *heads])


def _import_through_peft(model: nn.Module, peft_config: dict[str, Any], tensors: dict[str, torch.Tensor],
                         name: str | None) -> DeltaModel:
    """A PEFT adapter without a native equivalent, injected by PEFT and handled like a native delta."""
    from lightning_delta.core import detach_delta
    from lightning_delta.errors import DeltaStateError
    from lightning_delta.methods.peft_backend import PeftDeltaConfig, _require_peft
    from lightning_delta.state import load_into, state_tensors

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
        adapter = {k: v for k, v in state.items() if k not in state_tensors(model)}
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
