"""The delta protocol: the module base class, the config base class, attach and detach.

A delta is an ``nn.Module`` registered as a child of the module it changes (its
*target*) under the delta's name, so its tensors are addressed as
``<target>.<name>.<tensor>`` (``encoder.layer.0.attention.self.query.lora.A``).
It changes the target's output through a forward hook that is a bound method of
the delta itself: no closure, so the model still pickles, deep-copies and compiles.
Backbone parameter and buffer names never change.
"""

from __future__ import annotations

import abc
import dataclasses
import math
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from lightning_delta.errors import DeltaConfigError, DeltaError, DeltaStateError, MergeError, UnsupportedModuleError
from lightning_delta.targets import ATTENTION_PRESETS, normalize_patterns, preset, resolve_targets
from lightning_delta.tensors import is_quantized

_COMMON_FIELDS = ("targets", "exclude", "name", "delta_dtype", "lr")
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class DeltaConfig(abc.ABC):
    """What to attach and where. Each method subclasses this with its typed hyper-parameters.

    Args:
        targets: target patterns (see :mod:`lightning_delta.targets`); ``None`` for the preset
            of ``model.config.model_type``.
        exclude: patterns of modules to leave out of the matches.
        name: the delta's name, i.e. the child-module name on each target. Defaults to the
            method name, or ``<method>_2``, ... when that is taken.
        delta_dtype: storage dtype of the delta's tensors (``"float32"``, ``"bfloat16"``, ...). By
            default float32 (float64 beside a float64 target), also under a half-precision
            backbone: the delta casts at its boundary and keeps this dtype when the model is cast.
        lr: peak learning rate of this delta's tensors where the task names none (keyword-only). Each
            method's default is its recommended rate on a ready task, from ``python -m benchmarks.quality
            --sweep``; a task's ``learning_rate`` or ``lr_by_method`` overrides it
            (:func:`~lightning_delta.optim.param_groups`).
    """

    method: ClassVar[str] = ""
    supported_types: ClassVar[str] = ""

    targets: str | list[str] | None = None
    exclude: list[str] = field(default_factory=list)
    name: str | None = None
    delta_dtype: str | None = None
    lr: float = field(default=1e-3, kw_only=True)

    def __post_init__(self) -> None:
        if self.targets is not None:
            self.targets = list(normalize_patterns(self.targets))
        self.exclude = list(normalize_patterns(self.exclude))
        if self.name is not None and (not self.name.isidentifier() or "." in self.name):
            raise DeltaConfigError(f"delta name {self.name!r} must be a Python identifier, e.g. 'lora_task_a'")
        if self.delta_dtype is not None and self.delta_dtype not in DTYPES:
            raise DeltaConfigError(f"delta_dtype={self.delta_dtype!r} is not one of {sorted(DTYPES)}")
        if self.lr is not None and (isinstance(self.lr, bool) or not isinstance(self.lr, (int, float))
                                    or not self.lr > 0):
            raise DeltaConfigError(f"{self.method}: lr={self.lr!r} is invalid; it must be a positive number, e.g. 1e-3")
        for f in dataclasses.fields(self):  # no hyper-parameter of any method means anything as NaN or inf
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise DeltaConfigError(f"{self.method}: {f.name}={value!r} is invalid; it must be a finite number")
        self.validate()

    def validate(self) -> None:
        """Raises :class:`DeltaConfigError` for out-of-range hyper-parameters."""

    def storage_dtype(self, weight: torch.Tensor) -> torch.dtype:
        """The dtype of this delta's tensors beside a target weight ``weight`` (see ``delta_dtype``)."""
        if self.delta_dtype is not None:
            return DTYPES[self.delta_dtype]
        return weight.dtype if weight.dtype == torch.float64 else torch.float32

    def supports(self, module: nn.Module) -> bool:
        """Whether this method can attach to ``module``."""
        raise NotImplementedError(f"{type(self).__name__} must implement supports()")

    @abc.abstractmethod
    def build(self, module: nn.Module, seed: int, path: str) -> Delta:
        """A new, unattached delta for ``module`` (at dotted ``path``); random initial values derive from ``seed``.

        Abstract: the bases (this class, ``WholeModelConfig``, ``VirtualTokensConfig``) are not methods,
        and the command's help does not list them among the methods.
        """

    def target_names(self, model: nn.Module) -> list[str]:
        """Dotted names of the modules this config attaches to in ``model`` (targets or the preset)."""
        patterns = self.preset(model) if self.targets is None else self.targets
        return resolve_targets(model, patterns, self.supports, exclude=self.exclude, method=self.method,
                               supported_types=self.supported_types)

    def tie(self, deltas: list[Delta]) -> None:
        """Shares tensors across the deltas of one attach (e.g. Compacter's hypercomplex rules); no-op."""

    def peft_config(self, deltas: list[AttachedDelta], **common: Any) -> Any:
        """This delta as a ``peft.PeftConfig`` for :func:`~lightning_delta.export.export_peft`.

        Args:
            deltas: the delta's modules in the model.
            **common: ``task_type`` and ``modules_to_save``, for every PEFT config.

        Raises:
            DeltaConfigError: PEFT has no equivalent of this method.
        """
        raise DeltaConfigError(f"PEFT has no equivalent of {self.method!r}")

    #: PEFT's ``peft_type`` that :func:`~lightning_delta.export.import_peft` reads as this method
    peft_type: ClassVar[str | None] = None
    #: where PEFT's adapter files put modules trained whole (``modules_to_save``, a classifier head)
    peft_module_prefix: ClassVar[str] = "base_model.model."

    @classmethod
    def reads_peft(cls, settings: dict[str, Any]) -> bool:
        """Whether an adapter with this ``adapter_config.json`` is this method (by default: its ``peft_type``)."""
        return cls.peft_type is not None and str(settings.get("peft_type")) == cls.peft_type

    @classmethod
    def from_peft(cls, settings: dict[str, Any], parts: dict[str, dict[str, torch.Tensor]],
                  name: str | None) -> DeltaConfig:
        """The config of a PEFT adapter of this method (the inverse of :meth:`peft_config`).

        Args:
            settings: the adapter's ``adapter_config.json``.
            parts: its tensors by target path, then by PEFT's name on the target (``"lora_A.weight"``).
            name: the delta's name, or ``None`` for the default.

        Raises:
            DeltaConfigError: a PEFT option this method does not have.
        """
        raise DeltaConfigError(f"{cls.method!r} does not import PEFT adapters")

    @classmethod
    def refuse_peft_options(cls, settings: dict[str, Any], defaults: dict[str, Any]) -> None:
        """Raises :class:`DeltaConfigError` naming PEFT options set away from ``defaults`` (no equivalent here)."""
        unsupported = {k: settings[k] for k, v in defaults.items() if settings.get(k, v) not in (v, None)}
        if unsupported:
            raise DeltaConfigError(
                f"this PEFT adapter uses {unsupported}, which lightning_delta's {cls.method!r} does not have;"
                " load it with peft.PeftModel.from_pretrained(model, dir), or attach it through PEFT"
                " (attach(model, peft_config=...))")

    @classmethod
    def exports_to_peft(cls) -> bool:
        """Whether :meth:`peft_config` is implemented."""
        return cls.peft_config is not DeltaConfig.peft_config

    def preset(self, model: nn.Module) -> list[str]:
        """Targets used when ``targets`` is ``None``: the attention query and value projections."""
        return preset(ATTENTION_PRESETS, model, self.method, "query and value projections")

    def hparams(self) -> dict[str, Any]:
        """The method's own hyper-parameters (everything but targets, exclude and name)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in _COMMON_FIELDS}

    def settings(self) -> tuple[str, dict[str, Any]]:
        """Method and hyper-parameters: what must agree for two configs to describe the same delta."""
        return self.method, self.hparams()

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable description; ``config_from_dict`` inverts it."""
        return {"method": self.method, **dataclasses.asdict(self)}

    @classmethod
    def check_range(cls, name: str, value: Any, ok: bool, expected: str) -> None:
        """Raises a :class:`DeltaConfigError` naming the hyper-parameter, its value and the valid range."""
        if not ok:
            raise DeltaConfigError(f"{cls.method}: {name}={value!r} is invalid; {name} must be {expected}")


class WholeModelConfig(DeltaConfig):
    """Base of methods that attach to the model itself rather than to target modules (prompt,
    prefix, the PEFT backend): their delta is the child ``<name>`` of the model."""

    def target_names(self, model: nn.Module) -> list[str]:
        if self.targets not in (None, [], [""]):
            raise UnsupportedModuleError(
                f"{self.method!r} attaches to the whole model, not to targets {self.targets!r}: pass targets=None")
        if not self.supports(model):
            raise UnsupportedModuleError(
                f"{self.method!r} needs {self.supported_types}, not {type(model).__name__}; attach it to the"
                " transformers model (DeltaCallback(module=...) names it inside a LightningModule)")
        return [""]


class Delta(nn.Module):
    """Base class of delta modules.

    Subclasses implement :meth:`forward` as ``(target input, target output) -> new output``
    and, where the method allows, :meth:`merge` / :meth:`unmerge`.
    """

    is_delta: ClassVar[bool] = True  #: how :func:`~lightning_delta.targets.is_delta` tells a delta from the backbone
    mergeable: ClassVar[bool] = False
    #: whether the delta can apply to some rows of a batch only (:meth:`DeltaModel.mixed_batch`)
    row_selectable: ClassVar[bool] = False
    init_seed: int = 0  #: seed of the initial values, from the run's seed and the delta's path
    active: bool = True  #: an inactive delta leaves its target's output alone (:meth:`DeltaModel.set_active`)
    #: per-row selection while a mixed batch runs: ``(batch,)`` bools, ``None`` for every row
    row_mask: torch.Tensor | None = None

    def __init__(self, config: DeltaConfig, target: nn.Module) -> None:
        super().__init__()
        self.config = config
        self.merged = False
        weight = getattr(target, "weight", None)
        if not isinstance(weight, torch.Tensor):
            weight = next(target.parameters(), torch.empty(0))
        self.storage_dtype = config.storage_dtype(weight)
        #: keyword arguments for new tensors: the target's device, the delta's dtype
        self.factory = {"device": weight.device, "dtype": self.storage_dtype}

    def seeded(self, seed: int) -> Delta:
        """Draws the initial values from ``seed`` (the last step of ``DeltaConfig.build``)."""
        self.init_seed = seed
        self.reset_parameters()
        return self

    def reset_parameters(self) -> None:
        """Initial values from ``init_seed``; Lightning also calls this to materialise meta tensors."""

    def generator(self) -> torch.Generator:
        """A CPU generator at ``init_seed``: the same draws on every device and rank."""
        return torch.Generator().manual_seed(self.init_seed)

    def _apply(self, fn: Any, recurse: bool = True) -> Delta:
        """``.to()``, ``.half()``, ... move the delta but keep its ``storage_dtype`` (fp32 under a bf16 model)."""
        super()._apply(fn, recurse)
        for tensor in (*self.parameters(), *self.buffers()):
            if tensor.is_floating_point() and tensor.dtype != self.storage_dtype:
                tensor.data = tensor.data.to(self.storage_dtype)
                if tensor.grad is not None:
                    tensor.grad = tensor.grad.to(self.storage_dtype)
        return self

    def forward(self, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def idle(self) -> bool:
        """Whether the hooks leave the target alone: the delta is merged or inactive."""
        return self.merged or not self.active

    def row_gate(self, x: torch.Tensor) -> torch.Tensor | None:
        """The row mask shaped to broadcast over ``x`` ``(batch, ...)``, or ``None`` outside a mixed batch."""
        mask = self.row_mask
        if mask is None:
            return None
        if x.shape[0] != mask.shape[0]:
            raise DeltaConfigError(
                f"a mixed batch names a delta for {mask.shape[0]} rows, but {self.config.name!r} sees a batch of"
                f" {x.shape[0]}: give one delta name (or None) per row of the inputs"
            )
        return mask.to(x.device).view(-1, *([1] * (x.dim() - 1)))

    def forward_hook(self, target: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        """Forward hook installed on the target: applies the delta unless it is merged or inactive."""
        if self.idle:
            return output
        x = args[0] if args else next(iter(kwargs.values()))
        return self(x, output)

    def hook_into(self, target: nn.Module) -> None:
        """Installs :meth:`forward_hook` on ``target``."""
        target.register_forward_hook(self.forward_hook, with_kwargs=True)

    def unhook_from(self, target: nn.Module) -> None:
        """Removes every hook this delta installed on ``target`` (forward and pre-forward)."""
        for hooks, extras in ((target._forward_hooks, (target._forward_hooks_with_kwargs,
                                                       target._forward_hooks_always_called)),
                              (target._forward_pre_hooks, (target._forward_pre_hooks_with_kwargs,))):
            for key in [k for k, hook in hooks.items() if getattr(hook, "__self__", None) is self]:
                del hooks[key]
                for extra in extras:
                    extra.pop(key, None)

    def peft_state(self, prefix: str) -> dict[str, torch.Tensor]:
        """This delta's tensors under PEFT's names; ``prefix`` is ``base_model.model.<target path>``."""
        raise DeltaConfigError(f"PEFT has no equivalent of {self.config.method!r}")

    def load_peft_state(self, parts: dict[str, torch.Tensor],
                        shared: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This delta's tensors, by attribute name, from a PEFT adapter (the inverse of :meth:`peft_state`).

        Args:
            parts: PEFT's tensors on this delta's target, by their name there (``"lora_A.weight"``).
            shared: the adapter's tensors that sit on no target (``"prompt_embeddings"``, VeRA's projections).
        """
        raise DeltaConfigError(f"{self.config.method!r} does not import PEFT adapters")

    def on_attach(self, target: nn.Module) -> None:
        """Called once after the hooks are installed at attach: changes to the target itself (none here)."""

    def on_detach(self, target: nn.Module) -> None:
        """Called once before the hooks are removed at detach: undoes :meth:`on_attach`."""

    def weight_offset(self) -> torch.Tensor | None:
        """What attach subtracted from the target's ``weight`` (in its layout), restored at detach.

        ``None`` for deltas that leave the backbone's values alone (all but LoRA's PiSSA / OLoRA
        inits); the backbone fingerprint adds it back to describe the original weights.
        """
        return None

    def merge_blocker(self, target: nn.Module) -> str | None:
        """Why this delta cannot be merged into ``target``, or ``None`` if it can (not into a 4-bit weight)."""
        if not self.mergeable:
            return f"{self.config.method!r} has no merge"
        weight = getattr(target, "weight", None)
        if is_quantized(weight):
            return (f"the weight of {type(target).__name__} is quantized ({type(weight).__name__}): merging would"
                    " re-quantize it; dequantize first (torchao NF4: lightning_delta.quantize.dequantize(model)),"
                    " or merge into a floating-point copy of the backbone")
        return None

    def merge(self, target: nn.Module) -> None:
        """Folds the delta into the target's weights (inference then runs at base speed)."""
        raise MergeError(self.merge_blocker(target) or f"{type(self).__name__} does not implement merge")

    def unmerge(self, target: nn.Module) -> None:
        """Undoes :meth:`merge`."""
        raise MergeError(self.merge_blocker(target) or f"{type(self).__name__} does not implement unmerge")


class WeightUpdateDelta(Delta):
    """A delta on a Linear-like target whose effect is a dense weight update ``dW`` ``(out, in)``.

    Subclasses implement :meth:`update`; merging adds it to the target's weight (transposed for
    transformers' ``Conv1D``, which stores ``(in, out)``), and the default forward adds ``x @ dW.T``.
    """

    mergeable = True

    def __init__(self, config: DeltaConfig, target: nn.Module) -> None:
        super().__init__(config, target)
        self.transposed = not isinstance(target, nn.Linear)  # Conv1D stores its weight as (in, out)

    def update(self) -> torch.Tensor:
        """``dW`` in ``(out, in)`` layout."""
        raise NotImplementedError(f"{type(self).__name__} must implement update()")

    def forward(self, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """``output + x @ dW.T``; x ``(..., in)``, output ``(..., out)``."""
        return output + F.linear(x, self.update().to(x.dtype)).to(output.dtype)

    def delta_weight(self) -> torch.Tensor:
        """The update in the layout of the target's weight."""
        update = self.update()
        return update.T if self.transposed else update

    @torch.no_grad()
    def merge(self, target: nn.Module) -> None:
        if not self.merged:
            target.weight += self.delta_weight().to(target.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self, target: nn.Module) -> None:
        if self.merged:
            target.weight -= self.delta_weight().to(target.weight.dtype)
            self.merged = False


@dataclass(frozen=True)
class AttachedDelta:
    """One delta module in a model: where it sits and what it changes."""

    path: str  #: dotted name of the delta module itself
    target_path: str  #: dotted name of the module it changes
    name: str  #: the delta's name (the last component of ``path``)
    module: Delta


def iter_deltas(model: nn.Module, name: str | None = None) -> Iterator[AttachedDelta]:
    """Every delta attached to ``model`` (optionally only those called ``name``), in model order."""
    for path, module in model.named_modules():
        if isinstance(module, Delta):
            target_path, _, delta_name = path.rpartition(".")
            if name is None or delta_name == name:
                yield AttachedDelta(path, target_path, delta_name, module)


def as_shape(tensor: torch.Tensor | None, shape: torch.Size | tuple[int, ...], name: str) -> torch.Tensor:
    """An imported tensor in ``shape``, where only the layout differs: singleton dimensions (PEFT's
    ``(1, in)`` IA3 vector, ``(out, r, 1, 1)`` conv factor) or a flattened kernel (``(r, in, kh, kw)``).
    A tensor with other dimensions (e.g. transposed) is refused rather than reshaped into garbage.

    Raises:
        DeltaStateError: missing, or another shape; the message names ``name`` and both shapes.
    """
    shape = tuple(shape)
    if tensor is None:
        raise DeltaStateError(f"the adapter has no {name!r} (expected shape {shape})")
    have = tuple(tensor.shape)
    same = have == shape or [d for d in have if d != 1] == [d for d in shape if d != 1] \
        or (tensor.dim() > 2 and tuple(tensor.flatten(1).shape) == shape)
    if not same:
        raise DeltaStateError(f"the adapter's {name!r} has shape {have}; this delta needs {shape}: it was saved"
                              " for other dimensions or transposed, and is refused rather than reshaped")
    return tensor.reshape(shape)


def fill_(param: torch.Tensor, draw: Callable[[torch.Tensor], Any]) -> None:
    """Fills ``param`` with values ``draw`` writes into a CPU tensor (meta tensors stay empty)."""
    if param.device.type != "meta":
        values = torch.empty(param.shape, dtype=param.dtype)
        draw(values)
        with torch.no_grad():
            param.copy_(values.to(param.device))


def kaiming_(param: torch.Tensor, generator: torch.Generator) -> None:
    """Kaiming-uniform as ``nn.Linear`` initialises its weight, drawn from ``generator``."""
    fill_(param, lambda t: nn.init.kaiming_uniform_(t, a=math.sqrt(5), generator=generator))


def delta_seed(seed: int, path: str) -> int:
    """The initialisation seed of the delta at dotted ``path`` in a run seeded with ``seed``.

    Every rank that attaches the same delta with the same seed draws the same initial values,
    so no broadcast is needed (FSDP does not broadcast initial values).
    """
    return (seed * 1_000_003 + zlib.crc32(path.encode())) % 2**63


def require_linear(method: str, deltas: Iterable[AttachedDelta]) -> None:
    """For PEFT exports of methods whose PEFT layers take only ``nn.Linear``: refuses ``Conv1D`` targets."""
    transposed = [d.target_path for d in deltas if getattr(d.module, "transposed", False)]
    if transposed:
        raise DeltaConfigError(f"PEFT's {method} takes only nn.Linear targets, not the Conv1D {transposed[:3]}:"
                               " this delta cannot be exported to PEFT's format")


def _free_name(model: nn.Module, config: DeltaConfig) -> str:
    taken = {d.name for d in iter_deltas(model)}
    if config.name is not None:
        if config.name in taken:
            raise DeltaConfigError(
                f"a delta named {config.name!r} is already attached; give the new one another name"
                f" (name='{config.name}_2') or detach the old one first"
            )
        return config.name
    name, n = config.method, 1
    while name in taken:
        n += 1
        name = f"{config.method}_{n}"
    return name


def attach_config(model: nn.Module, config: DeltaConfig, seed: int | None = None) -> str:
    """Attaches one delta described by ``config`` to ``model``; returns the delta's name.

    Every target is resolved and every delta built before the model is touched, so a
    failure leaves the model as it was. Random initial values derive from ``seed`` (default:
    ``torch.initial_seed()``) and each delta's path, see :func:`delta_seed`.
    """
    seed = torch.initial_seed() if seed is None else seed
    names = config.target_names(model)
    name = _free_name(model, config)
    built: list[tuple[nn.Module, Delta]] = []
    for target_name in names:
        target = model.get_submodule(target_name)
        if hasattr(target, name):
            raise DeltaConfigError(
                f"{target_name!r} already has an attribute {name!r}; pass another delta name, e.g. name='{name}_delta'"
            )
        _refuse_zero3_partition(target, target_name)
        built.append((target, config.build(target, delta_seed(seed, f"{target_name}.{name}"), target_name)))
    config.tie([delta for _, delta in built])
    config = dataclasses.replace(config, name=name)
    placed: list[tuple[nn.Module, Delta]] = []
    try:
        for target, delta in built:
            delta.config = config
            target.add_module(name, delta)
            placed.append((target, delta))
            delta.hook_into(target)
            delta.on_attach(target)
    except Exception:  # e.g. a library refusing to hook: leave the model as it was
        for target, delta in placed:
            delta.unhook_from(target)
            delattr(target, name)
        raise
    return name


def _refuse_zero3_partition(target: nn.Module, path: str) -> None:
    """Deltas are shaped from whole weights: a DeepSpeed ZeRO-3 placeholder (built under ``zero.Init``) has none."""
    for key, param in target.named_parameters(recurse=False):
        if hasattr(param, "ds_shape") and param.numel() == 0:
            raise UnsupportedModuleError(
                f"{path or 'the target'}.{key} is a DeepSpeed ZeRO-3 partition (full shape"
                f" {tuple(param.ds_shape)}), built under deepspeed.zero.Init: deltas attach to whole weights. Build"
                " or load the backbone in the LightningModule's __init__, not in configure_model, so DeltaCallback"
                " attaches before DeepSpeed partitions it (the strategy still shards it, deltas included)"
            )


def detach_delta(model: nn.Module, name: str) -> None:
    """Removes every module of the delta ``name``, unmerging first; the backbone is as before attach."""
    found = list(iter_deltas(model, name))
    if not found:
        names = sorted({d.name for d in iter_deltas(model)})
        raise DeltaError(f"no delta named {name!r} is attached; attached deltas: {names or 'none'}")
    for d in found:
        target = model.get_submodule(d.target_path)
        if d.module.merged:
            d.module.unmerge(target)
        d.module.on_detach(target)
        d.module.unhook_from(target)
        delattr(target, d.name)


def check_merge(model: nn.Module, deltas: Iterable[AttachedDelta]) -> None:
    """Raises :class:`MergeError` naming every delta that cannot merge, before anything is merged."""
    blocked = [
        f"{d.path} ({reason})"
        for d in deltas
        if (reason := d.module.merge_blocker(model.get_submodule(d.target_path))) is not None
    ]
    if blocked:
        raise MergeError(
            f"cannot merge {len(blocked)} delta module(s): {', '.join(blocked[:5])}."
            " Merge only deltas that support it: merge(names=[...])"
        )
