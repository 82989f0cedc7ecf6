"""Export a delta to PEFT's adapter format: ``adapter_config.json`` + ``adapter_model.safetensors``,
loadable with ``peft.PeftModel.from_pretrained(base_model, directory)`` and giving the same outputs.

Supported: ``lora`` (incl. rslora and every ``init``), ``dora``, ``adalora``, ``ia3``, ``prompt`` and
``prefix`` (without the projection, or after ``fold()``). Methods PEFT has no equivalent for raise a clear error, and so
do trainable backbone modules (``trainable=[...]``), which this first version does not export.

A PiSSA / OLoRA LoRA trains beside the residual ``W - s B0 A0``, but the export is loaded onto the
original weight ``W``: as PEFT's own conversion (``path_initial_model_for_weight_conversion``), it
is written as the rank-``2r`` LoRA ``A' = [A; A0]``, ``B' = [B, -B0]`` with ``alpha' = 2 alpha``
(``sqrt(2) alpha`` with rslora), so ``W + s (B A - B0 A0)`` is what our model computes.

An AdaLoRA delta is written with its ``rank_pattern`` (PEFT's format): per target only the kept
triplets (mask on, or a singular value not zero) of ``lora_A``, ``lora_E``, ``lora_B``; PEFT
resizes its layers to those ranks on load, keeping the scale ``alpha / init_r``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lightning_delta.core import iter_deltas
from lightning_delta.errors import DeltaConfigError
from lightning_delta.handle import DeltaModel
from lightning_delta.state import TRAINABLE_ATTR

PEFT_METHODS = ("lora", "dora", "adalora", "ia3", "prompt", "prefix")


def _task_type(model: nn.Module) -> str | None:
    name = type(model).__name__
    if name.endswith("ForSequenceClassification"):
        return "SEQ_CLS"
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return "SEQ_2_SEQ_LM"
    if name.endswith(("ForCausalLM", "LMHeadModel")):
        return "CAUSAL_LM"
    return None


def _kept_triplets(module: nn.Module) -> torch.Tensor:
    """AdaLoRA: the triplets that contribute to the output (mask on, or a regrown singular value)."""
    return module.rank_mask | (module.E.detach().view(-1) != 0)


def _relative_to_residual(module: nn.Module) -> bool:
    """Whether a LoRA delta trains beside a residual weight (PiSSA / OLoRA)."""
    return getattr(module, "residual", False)


def _peft_config(model: nn.Module, name: str):
    import peft

    deltas = list(iter_deltas(model, name))
    config = deltas[0].module.config
    targets = [d.target_path for d in deltas]
    task = _task_type(model)
    if config.method in ("lora", "dora"):
        fan_in_fan_out = any(getattr(d.module, "transposed", False) for d in deltas)
        if _relative_to_residual(deltas[0].module):  # rank 2r, same scale (see the module docstring)
            alpha = config.alpha * (2**0.5 if config.rslora else 2)
            return peft.LoraConfig(r=2 * config.r, lora_alpha=alpha, lora_dropout=config.dropout,
                                   use_rslora=config.rslora, target_modules=targets, fan_in_fan_out=fan_in_fan_out,
                                   task_type=task)
        return peft.LoraConfig(r=config.r, lora_alpha=config.alpha, lora_dropout=config.dropout,
                               use_rslora=config.rslora, use_dora=config.method == "dora", target_modules=targets,
                               fan_in_fan_out=fan_in_fan_out, task_type=task)
    if config.method == "adalora":
        fan_in_fan_out = any(d.module.transposed for d in deltas)
        rank_pattern = {f"{d.target_path}.lora_E": _kept_triplets(d.module).tolist() for d in deltas}
        return peft.AdaLoraConfig(
            init_r=config.init_r, target_r=config.target_r, lora_alpha=config.alpha, lora_dropout=config.dropout,
            tinit=config.tinit, tfinal=config.tfinal, deltaT=config.deltaT, beta1=config.beta1, beta2=config.beta2,
            orth_reg_weight=config.orth_reg_weight, total_step=config.total_step or config.tinit + config.tfinal + 1,
            rank_pattern=rank_pattern, target_modules=targets, fan_in_fan_out=fan_in_fan_out, task_type=task)
    if config.method == "ia3":
        return peft.IA3Config(target_modules=targets, task_type=task,
                              feedforward_modules=[d.target_path for d in deltas if d.module.on_input])
    extra = {"num_transformer_submodules": 1} if task == "SEQ_2_SEQ_LM" else {}
    if config.method == "prompt":
        return peft.PromptTuningConfig(task_type=task, num_virtual_tokens=config.num_virtual_tokens, **extra)
    if config.projection:
        raise DeltaConfigError("export the prefix after model.prefix.fold(): PEFT's format holds plain prefixes")
    return peft.PrefixTuningConfig(task_type=task, num_virtual_tokens=config.num_virtual_tokens)


def _tensors(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    out = {}
    for d in iter_deltas(model, name):
        module, prefix = d.module, f"base_model.model.{d.target_path}"
        method = module.config.method
        if method in ("prompt", "prefix"):
            out["prompt_embeddings"] = module.states().detach()
        elif method == "adalora":
            keep = _kept_triplets(module)
            out[f"{prefix}.lora_A"], out[f"{prefix}.lora_E"] = module.A.detach()[keep], module.E.detach()[keep]
            out[f"{prefix}.lora_B"] = module.B.detach()[:, keep]
        elif method == "ia3":
            scale = module.scale.detach()
            out[f"{prefix}.ia3_l"] = scale[None, :] if module.on_input else scale[:, None]
        elif _relative_to_residual(module):  # W_res + s B A = W + s [B, -B0] [A; A0]
            out[f"{prefix}.lora_A.weight"] = torch.cat([module.A.detach(), module.A0.to(module.A.dtype)], dim=0)
            out[f"{prefix}.lora_B.weight"] = torch.cat([module.B.detach(), -module.B0.to(module.B.dtype)], dim=1)
        else:
            out[f"{prefix}.lora_A.weight"], out[f"{prefix}.lora_B.weight"] = module.A.detach(), module.B.detach()
            if method == "dora":
                out[f"{prefix}.lora_magnitude_vector"] = module.magnitude.detach()
    if _task_type(model) == "SEQ_CLS":  # PEFT keeps the classification head as a module to save
        for head in ("classifier", "score"):
            if isinstance(getattr(model, head, None), nn.Module):
                out.update({f"base_model.model.{head}.{k}": v.detach()
                            for k, v in getattr(model, head).state_dict().items()})
    return {k: v.contiguous().cpu() for k, v in out.items()}


def export_peft(model: nn.Module, directory: str | Path, name: str | None = None) -> Path:
    """Writes delta ``name`` (default: the only one attached) of ``model`` in PEFT's adapter format.

    Raises:
        DeltaConfigError: no such delta, a method PEFT has no equivalent for, or trainable
            backbone modules that this export would leave out.
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
    if method not in PEFT_METHODS:
        raise DeltaConfigError(f"PEFT has no equivalent of {method!r}; exportable methods: {list(PEFT_METHODS)}")
    trainable = getattr(model, TRAINABLE_ATTR, ())
    if trainable:
        raise DeltaConfigError(
            f"modules trained whole (trainable={list(trainable)}) are not exported to PEFT's format yet;"
            " save them separately, or export a model without them")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _peft_config(model, name).save_pretrained(str(directory))
    save_file(_tensors(model, name), str(directory / "adapter_model.safetensors"))
    return directory
