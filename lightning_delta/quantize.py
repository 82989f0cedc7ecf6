"""4-bit frozen backbones with torchao's NF4 weights (QLoRA without bitsandbytes).

:func:`quantize_nf4` replaces the weight of each frozen ``nn.Linear`` of the backbone by a
torchao ``NF4Tensor`` (4-bit NormalFloat codes in blocks of ``block_size`` values, one absmax
scale per block, the scales themselves quantized to int8 in blocks of ``scaler_block_size``:
QLoRA's double quantization), about 0.53 byte per weight instead of 4 (fp32) or 2 (bf16).
``F.linear(x, nf4_weight)`` dispatches to torchao's ``linear_nf4``: the forward computes with
the dequantized weight in the activations' dtype, and its backward passes the gradient on to
the input, so LoRA (and every other hook-based delta, kept fp32 and full precision) trains
through the 4-bit matmul. No module or parameter is renamed: ``q_proj.weight`` stays
``q_proj.weight`` with its logical shape, so targets, delta-only checkpoints and the backbone
fingerprint work as before, and a delta trained on an NF4 backbone loads into a plain one.

The quantized layers become :class:`NF4Linear` (an ``nn.Linear`` subclass that only keeps the
weight 4-bit through ``.to()`` / ``.half()`` / Lightning's ``bf16-true`` cast: the cast sets the
compute dtype instead of dequantizing). :func:`dequantize` turns them back into ``nn.Linear``
with floating weights, e.g. before ``merge()`` (merging into a 4-bit weight raises
:class:`~lightning_delta.errors.MergeError`).

Call it after the pretrained weights are loaded, before or after ``attach``, from a
LightningModule's ``configure_model`` or before ``Trainer.fit``::

    def configure_model(self):
        if self.model is None:
            self.model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.bfloat16)
            quantize_nf4(self.model)        # DeltaCallback attaches LoRA right after this hook

Needs ``torchao`` (``pip install torchao``; it runs on CPU and GPU).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from lightning_delta.errors import UnsupportedModuleError
from lightning_delta.state import TRAINABLE_ATTR, delta_owners, trainable_module_names
from lightning_delta.targets import candidate_modules, head_names, is_delta, matches, normalize_patterns
from lightning_delta.tensors import QUANTIZED_TYPES, is_quantized  # noqa: F401  (public here too)


#: Names of tensor subclasses that hold a weight in packed low-bit form (torchao; bitsandbytes).
def _torchao_nf4() -> Any:
    """torchao's NF4 module (moved from ``torchao.dtypes.nf4tensor`` in 0.18)."""
    try:
        from torchao.quantization.quantize_.workflows.nf4 import nf4_tensor
    except ImportError:
        try:
            from torchao.dtypes import nf4tensor as nf4_tensor
        except ImportError as err:
            raise ImportError("4-bit NF4 backbones need torchao: pip install torchao") from err
    return nf4_tensor


class NF4Linear(nn.Linear):
    """An ``nn.Linear`` whose ``weight`` is a torchao ``NF4Tensor`` (made by :func:`quantize_nf4`).

    The forward is ``nn.Linear``'s: torchao routes ``F.linear`` with an NF4 weight to its
    ``linear_nf4``. Only casting differs: ``.to(dtype)`` / ``.half()`` would dequantize the weight
    into a full copy, so here a cast changes the weight's compute dtype and a move moves its
    4-bit codes and scales; the bias is cast as usual.
    """

    def _apply(self, fn: Any, recurse: bool = True) -> NF4Linear:
        weight = self._parameters.get("weight")
        if not is_quantized(weight):
            return super()._apply(fn, recurse)
        self._parameters["weight"] = None  # nn.Module._apply skips it
        try:
            super()._apply(fn, recurse)
        finally:
            self._parameters["weight"] = weight
        with torch.no_grad():
            probe = fn(torch.empty(0, dtype=weight.dtype, device=weight.device))
        if not isinstance(probe, torch.Tensor) or (probe.device == weight.device and probe.dtype == weight.dtype):
            return self
        nf4 = _torchao_nf4()
        moved = weight.detach()
        if probe.device != weight.device:
            moved = moved.to(probe.device)  # no dtype: torchao moves the codes and scales, keeps NF4
        if probe.is_floating_point() and probe.dtype != moved.dtype:
            moved = nf4.NF4Tensor(*nf4.construct_nf4_args(moved, {"dtype": probe.dtype}))
        new = nn.Parameter(moved, requires_grad=weight.requires_grad)
        try:
            torch.utils.swap_tensors(weight, new)  # the same Parameter object, as nn.Module._apply keeps it
        except RuntimeError:
            self._parameters["weight"] = new
        return self

    def extra_repr(self) -> str:
        weight = self.weight
        return (f"{super().extra_repr()}, nf4 block_size={getattr(weight, 'block_size', '?')},"
                f" scaler_block_size={getattr(weight, 'scaler_block_size', '?')}")


def _residual_delta(module: nn.Module) -> str | None:
    for name, child in module.named_children():
        if is_delta(child) and child.weight_offset() is not None:
            return name
    return None


def nf4_candidates(model: nn.Module, skip: str | Iterable[str] = (), head: bool = False) -> list[str]:
    """Dotted names of the ``nn.Linear`` layers :func:`quantize_nf4` quantizes (see there)."""
    skip = normalize_patterns(skip)
    recorded = getattr(model, TRAINABLE_ATTR, None)  # set by freeze_backbone
    keep_float = list(delta_owners(model)) + trainable_module_names(model, recorded or ())
    if not head:
        keep_float += sorted(head_names(model))
    uses: dict[int, int] = {}
    for _, param in model.named_parameters(remove_duplicate=False):
        uses[id(param)] = uses.get(id(param), 0) + 1
    found = []
    for name, module in candidate_modules(model):
        if type(module) is not nn.Linear:  # NF4Linear (done), subclasses with their own forward, Conv1D
            continue
        if any(name == k or name.startswith(k + ".") for k in keep_float):
            continue
        if any(matches(name, pattern) for pattern in skip):
            continue
        weight = module.weight
        if uses[id(weight)] > 1:  # tied (e.g. to the input embedding, which must stay a float table)
            continue
        if recorded is not None and weight.requires_grad:  # trained whole after freeze_backbone
            continue
        found.append(name)
    return found


def quantize_nf4(model: nn.Module, block_size: int = 64, scaler_block_size: int = 256,
                 skip: str | Iterable[str] = (), *, head: bool = False) -> list[str]:
    """Replaces the frozen weights of the backbone's ``nn.Linear`` layers by 4-bit NF4 weights (QLoRA).

    What stays in floating point, as QLoRA (and transformers' 4-bit loading) does: the output
    head (``get_output_embeddings()`` and modules named ``lm_head``, ``classifier``, ``score``,
    ...; ``head=True`` quantizes it too), weights tied to another module, embeddings, norms,
    biases, every delta module, modules trained whole (``freeze_backbone(trainable=...)``, and any
    parameter that requires grad after ``freeze_backbone``), layers matching ``skip``, and Linear
    subclasses or transformers' ``Conv1D`` (GPT-2), whose forward does not go through ``F.linear``.
    Quantized layers are frozen (their weights cannot be trained) and become :class:`NF4Linear`;
    names and logical shapes do not change. Calling it again quantizes only new candidates.

    Args:
        model: the backbone (or any module holding it), with its pretrained weights loaded.
        block_size: weights per 4-bit block, each with its own absmax scale (QLoRA: 64).
        scaler_block_size: block scales per int8 block of the double quantization (QLoRA: 256).
        skip: patterns (as for targets) of further Linear layers to keep in floating point.
        head: quantize the output head too.

    Returns:
        The dotted names of the layers quantized by this call.

    Raises:
        ImportError: torchao is not installed.
        UnsupportedModuleError: a weight is on the meta device or sharded, its size is not a multiple of
            ``block_size * scaler_block_size``, or a LoRA with ``init='pissa'/'olora'`` holds part
            of it. Nothing is quantized then.
    """
    nf4 = _torchao_nf4()
    names = nf4_candidates(model, skip, head)
    unit = block_size * scaler_block_size
    problems = []
    for name in names:
        module = model.get_submodule(name)
        if module.weight.device.type == "meta":
            problems.append(f"{name} (on the meta device: quantize after the pretrained weights are loaded)")
        elif type(module.weight).__name__ == "DTensor":
            problems.append(f"{name} (sharded: quantize before FSDP2 / tensor parallel shards the model)")
        elif module.weight.numel() % unit:
            problems.append(f"{name} ({tuple(module.weight.shape)}: {module.weight.numel()} weights, not a multiple"
                            f" of block_size * scaler_block_size = {unit})")
        elif (residual := _residual_delta(module)) is not None:
            problems.append(f"{name} (LoRA {residual!r} with init='pissa'/'olora' holds part of this weight: quantize"
                            " before attaching it is not supported either; use init='default' on NF4 backbones)")
    if problems:
        raise UnsupportedModuleError(
            f"cannot quantize {len(problems)} Linear layer(s) to NF4: {'; '.join(problems[:5])}. Leave them out"
            " with skip=[...] or use a smaller block_size / scaler_block_size")
    for name in names:
        module = model.get_submodule(name)
        with torch.no_grad():
            quantized = nf4.to_nf4(module.weight.detach().contiguous(), block_size, scaler_block_size)
        module.weight = nn.Parameter(quantized, requires_grad=False)
        module.__class__ = NF4Linear
    return names


def dequantize(model: nn.Module) -> list[str]:
    """Turns every :class:`NF4Linear` of ``model`` back into an ``nn.Linear`` with a floating weight.

    The weight holds the dequantized values (the 4-bit rounding stays) in the layer's current
    dtype, frozen as before; deltas stay attached. Afterwards ``merge()`` / ``merge_and_unload()``
    fold deltas into these weights.

    Returns:
        The dotted names of the layers dequantized.
    """
    names = []
    for name, module in model.named_modules():
        if isinstance(module, NF4Linear) and is_quantized(module.weight):
            weight = module.weight
            with torch.no_grad():
                values = weight.get_original_weight().to(weight.dtype)
            module.weight = nn.Parameter(values, requires_grad=weight.requires_grad)
            module.__class__ = nn.Linear
            names.append(name)
    return names


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes a tensor holds: the packed codes, scales and lookup table of a quantized one."""
    if is_quantized(tensor):
        inner, _ = tensor.__tensor_flatten__()
        return sum(tensor_bytes(getattr(tensor, name)) for name in inner)
    return tensor.numel() * tensor.element_size()


def parameter_bytes(model: nn.Module) -> int:
    """Bytes of ``model``'s parameters (each shared one once), counting NF4 weights at their packed size."""
    return sum(tensor_bytes(p) for p in model.parameters())
