"""The delta protocol: the delta module base class and the method config base class.

A delta is an ``nn.Module`` registered as a child of the module it changes (its *target*) under the delta's name,
so its tensors are addressed as ``<target>.<name>.<tensor>`` (``encoder.layer.0.attention.self.query.lora.A``).
It changes the target's output through a forward hook that is a bound method of the delta itself: no closure, so
the model still pickles, deep-copies and compiles. Backbone parameter and buffer names never change. Attaching
and detaching is :mod:`lightning_delta.engine`; initial values, :mod:`lightning_delta.inits`.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from lightning_delta.errors import DeltaConfigError, MergeError, UnsupportedModuleError
from lightning_delta.peft_hooks import PeftConversion
from lightning_delta.targets import ATTENTION_PRESETS, normalize_patterns, preset, resolve_targets
from lightning_delta.tensors import is_quantized

_COMMON_FIELDS = ("targets", "exclude", "name", "delta_dtype", "lr")
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class DeltaConfig(PeftConversion, abc.ABC):
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
    decays: ClassVar[bool] = True  #: weight decay on its matrices (False: offsets, scales, embeddings)
    switchable: ClassVar[bool] = True  #: whether ``DeltaModel.set_active`` can switch it on and off
    packs: ClassVar[bool] = True  #: whether it keeps packed examples (several per row) apart
    loraplus_params: ClassVar[tuple[str, ...]] = ()  #: tensors LoRA+ speeds up (``loraplus_lr_ratio``)

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

    def training_hook(self, backbone: nn.Module, name: str, total_steps: float) -> Any:
        """This delta's per-run training schedule, or ``None``: an object with ``after_backward(factor)``,
        ``after_step(step)``, ``state_dict()`` and ``load_state_dict(state)``, driven by ``DeltaCallback``."""
        return None

    def data_batches(self) -> int:
        """How many training batches :meth:`init_from_data` wants at fit start (0: it initialises without data)."""
        return 0

    def init_from_data(self, backbone: nn.Module, name: str, batches: Iterable[Any],
                       forward: Callable[[Any], Any]) -> int:
        """Initialises delta ``name`` from training ``batches`` (``forward(batch)`` runs one through the model)
        before the first step; returns the number of batches used. ``DeltaCallback`` calls it."""
        return 0

    def tie(self, deltas: list[Delta]) -> None:
        """Shares tensors across the deltas of one attach (e.g. Compacter's hypercomplex rules); no-op."""

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

    def parts_elsewhere(self) -> list[str]:
        """Paths, relative to its target, of modules outside this delta that hold its tensors (the PEFT
        backend's adapters live in PEFT's injected layers); the state selection keeps them. None here."""
        return []

    def on_attach(self, target: nn.Module) -> None:
        """Called once after the hooks are installed at attach: changes to the target itself (none here)."""

    def on_detach(self, target: nn.Module) -> None:
        """Called once before the hooks are removed at detach: undoes :meth:`on_attach`."""

    def additive_update(self) -> torch.Tensor | None:
        """The dense update ``dW`` ``(out, in)`` this delta adds to its target's weight whatever the input, or
        ``None`` where its effect is no such sum (adapters, DoRA's rescaling): what :mod:`~lightning_delta.combine`
        adds up."""
        return None

    def weight_offset(self) -> torch.Tensor | None:
        """What attach subtracted from the target's ``weight`` (in its layout), restored at detach.

        ``None`` for deltas that leave the backbone's values alone (all but LoRA's PiSSA / OLoRA
        inits); the backbone fingerprint adds it back to describe the original weights.
        """
        return None

    def tensor_parallel_layout(self, style: str) -> dict[str, int | str] | str:
        """Where each of its tensors lies on a ``style`` ("ColwiseParallel"/"RowwiseParallel") target: a shard
        dimension or ``"replicate"`` per tensor name, or why it cannot run there (the default: it cannot)."""
        return "under tensor parallelism only LoRA (init='default' or 'gaussian', dropout=0) supports such targets"

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


class MergesDeltaWeight:
    """Merge and unmerge for a delta whose ``delta_weight(target)`` is added to ``target.weight``."""

    merged: bool

    @torch.no_grad()
    def merge(self, target: nn.Module) -> None:
        if not self.merged:
            target.weight += self.delta_weight(target).to(target.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self, target: nn.Module) -> None:
        if self.merged:
            target.weight -= self.delta_weight(target).to(target.weight.dtype)
            self.merged = False


class WeightUpdateDelta(MergesDeltaWeight, Delta):
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

    def additive_update(self) -> torch.Tensor:
        return self.update()

    def delta_weight(self, target: nn.Module) -> torch.Tensor:
        """The update in the layout of ``target``'s weight (the same signature as LoRA's)."""
        update = self.update()
        return update.T if self.transposed else update



@dataclass(frozen=True)
class AttachedDelta:
    """One delta module in a model: where it sits and what it changes."""

    path: str  #: dotted name of the delta module itself
    target_path: str  #: dotted name of the module it changes
    name: str  #: the delta's name (the last component of ``path``)
    module: Delta

    @property
    def owners(self) -> list[str]:
        """Paths of the modules whose tensors are this delta's: itself and its :meth:`Delta.parts_elsewhere`."""
        return [self.path] + [".".join(filter(None, (self.target_path, p))) for p in self.module.parts_elsewhere()]


def iter_deltas(model: nn.Module, name: str | None = None) -> Iterator[AttachedDelta]:
    """Every delta attached to ``model`` (optionally only those called ``name``), in model order."""
    for path, module in model.named_modules():
        if isinstance(module, Delta):
            target_path, _, delta_name = path.rpartition(".")
            if name is None or delta_name == name:
                yield AttachedDelta(path, target_path, delta_name, module)
