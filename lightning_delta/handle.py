"""``attach()`` and the :class:`DeltaModel` handle.

The handle holds nothing but the model: which deltas exist, their configs and merge
state are read off the delta modules themselves, so a deep-copied or unpickled model
gives a correct handle again with ``DeltaModel(model)``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lightning_delta.combine import combine_lora
from lightning_delta.core import AttachedDelta, DeltaConfig, iter_deltas
from lightning_delta.engine import attach_config, check_merge, detach_delta
from lightning_delta.errors import DeltaConfigError
from lightning_delta.methods import make_config
from lightning_delta.methods.peft_backend import PeftDeltaConfig
from lightning_delta.state import (
    TRAINABLE_ATTR,
    delta_owners,
    is_under,
    kept_keys,
    load_into,
    state_tensors,
    trainable_module_names,
)
from lightning_delta.targets import normalize_patterns

MethodSpec = str | DeltaConfig


@dataclass(frozen=True)
class DeltaSummary:
    """Parameter counts of a model with deltas."""

    total: int  #: all parameters, backbone and deltas
    trainable: int  #: parameters that require grad
    delta: int  #: parameters of delta modules
    per_delta: dict[str, int]  #: delta parameters by delta name

    def __str__(self) -> str:
        def pct(n: int) -> str:
            return f"{100 * n / self.total:.3f}%" if self.total else "n/a"

        parts = ", ".join(f"{name}: {n:,}" for name, n in self.per_delta.items()) or "none"
        return (
            f"trainable {self.trainable:,} of {self.total:,} parameters ({pct(self.trainable)});"
            f" delta {self.delta:,} ({pct(self.delta)}) [{parts}];"
            f" AdamW state ~{self.adam_state_bytes / 2**20:.1f} MiB"
        )

    @property
    def adam_state_bytes(self) -> int:
        """Estimated AdamW state: two fp32 moments per trainable parameter."""
        return 8 * self.trainable


def to_configs(
    method: MethodSpec | Sequence[MethodSpec] | None, targets: Any, exclude: Any, name: Any, hparams: dict,
    peft_config: Any = None,
) -> list[DeltaConfig]:
    """Normalises ``attach``-style arguments into configs (a list of specs takes no extra arguments).

    ``peft_config`` (a ``peft.PeftConfig``) stands for ``method``: it becomes a :class:`PeftDeltaConfig`.
    """
    if peft_config is not None:
        if method is not None or targets is not None or hparams:
            raise DeltaConfigError(
                "peft_config replaces method, targets and hyper-parameters (PEFT's config carries them);"
                " to combine, pass a list: [LoraConfig(...), PeftDeltaConfig.from_peft(peft_config)]"
            )
        return [PeftDeltaConfig.from_peft(peft_config, **({"name": name} if name is not None else {}))]
    if method is None:
        raise DeltaConfigError("no delta given: pass a method ('lora'), a config, a list of configs or peft_config=")
    if isinstance(method, (list, tuple)):
        if targets is not None or exclude or name is not None or hparams:
            raise DeltaConfigError(
                "with a list of delta specs, give targets and hyper-parameters inside each spec,"
                " e.g. [LoraConfig(r=8, targets=['query']), BitFitConfig()]"
            )
        return [make_config(m) for m in method]
    overrides = dict(hparams)
    if targets is not None:
        if isinstance(method, DeltaConfig) and method.targets is not None:
            raise DeltaConfigError(
                f"targets given twice: {targets!r} beside the config's own targets={method.targets!r}; name them"
                " once, in the config (YAML: delta.method.init_args.targets)")
        overrides["targets"] = targets
    if exclude:
        overrides["exclude"] = list(normalize_patterns(exclude))
    if name is not None:
        overrides["name"] = name
    return [make_config(method, **overrides)]


def trainable_parameters(module: nn.Module) -> list[nn.Parameter]:
    """Parameters that require grad: what ``configure_optimizers`` should hand the optimizer."""
    return [p for p in module.parameters() if p.requires_grad]


def ensure_attached(model: nn.Module, configs: Iterable[DeltaConfig], seed: int | None = None) -> list[str]:
    """Attaches each config whose delta name is not attached yet; returns the names it attached.

    A delta already attached under a config's name must have the same method and
    hyper-parameters, so calling this again (e.g. ``setup`` for every stage) is a no-op.

    Raises:
        DeltaConfigError: a delta of that name is attached with other settings.
    """
    added: list[str] = []
    for config in configs:
        name = config.name or config.method
        have = DeltaModel(model).configs.get(name)
        if have is None:
            added.append(attach_config(model, config, seed))
        elif have.settings() != config.settings():
            raise DeltaConfigError(
                f"delta {name!r} is already attached as {have}, not as {config}; detach it first or pick another name"
            )
    return added


class DeltaModel:
    """A view of a model with deltas attached: counts, state, freezing, merging, detaching.

    Args:
        model: any ``nn.Module``, with or without deltas attached.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    # -- what is attached -------------------------------------------------------------------
    def deltas(self, name: str | None = None) -> list[AttachedDelta]:
        """Every attached delta module (only those of delta ``name`` if given)."""
        return list(iter_deltas(self.model, name))

    @property
    def configs(self) -> dict[str, DeltaConfig]:
        """The config of each attached delta, by delta name, in attach order."""
        return {d.name: d.module.config for d in self.deltas()}

    @property
    def merged(self) -> bool:
        """Whether every attached delta module is merged (read off the modules)."""
        found = self.deltas()
        return bool(found) and all(d.module.merged for d in found)

    def attach(
        self,
        method: MethodSpec | Sequence[MethodSpec] | None = None,
        targets: str | Iterable[str] | None = None,
        exclude: str | Iterable[str] = (),
        name: str | None = None,
        peft_config: Any = None,
        **hparams: Any,
    ) -> DeltaModel:
        """Attaches more deltas; see :func:`attach`. On any error the model is left as it was."""
        attached: list[str] = []
        try:
            for config in to_configs(method, targets, exclude, name, hparams, peft_config):
                attached.append(attach_config(self.model, config))
        except Exception:
            for delta_name in attached:
                detach_delta(self.model, delta_name)
            raise
        return self

    def detach(self, name: str | None = None) -> nn.Module:
        """Removes delta ``name`` (all deltas if ``None``); returns the model, as it was before attach."""
        for delta_name in [name] if name is not None else list(self.configs):
            detach_delta(self.model, delta_name)
        return self.model

    # -- several deltas on one backbone ------------------------------------------------------
    @property
    def active(self) -> list[str]:
        """Names of the deltas that apply in forward (all, unless :meth:`set_active` chose some)."""
        return [name for name in self.configs if any(d.module.active for d in self.deltas(name))]

    def set_active(self, names: str | Iterable[str] | None) -> DeltaModel:
        """Applies and trains only deltas ``names`` (``None``: all); the others stay attached, frozen, unused.

        Train one task's delta while the others wait: ``set_active("task_b")`` makes only
        ``task_b``'s tensors require grad and only ``task_b`` change the outputs.

        Raises:
            DeltaConfigError: an unknown name, or a PEFT-backend delta (PEFT switches its own adapters).
        """
        chosen = {d.name for d in self._selected(names)}
        fixed = [n for n, c in self.configs.items() if not c.switchable]
        if fixed:
            methods = sorted({self.configs[n].method for n in fixed})
            raise DeltaConfigError(f"set_active does not switch {methods} deltas {fixed} (PEFT-backend deltas: PEFT"
                                   " switches its own adapters); detach them first")
        self._refuse_residual({d.name for d in self.deltas() if d.name not in chosen}, "switched off")
        for d in self.deltas():
            d.module.active = d.name in chosen
            d.module.requires_grad_(d.name in chosen)
        return self

    @contextmanager
    def mixed_batch(self, delta_names: Sequence[str | None]) -> Iterator[DeltaModel]:
        """Within the block, row ``i`` of every forward uses only delta ``delta_names[i]`` (``None``: none).

        One forward serves several tasks, each row as if its delta alone were attached (LoRA and
        IA3, not merged). Other deltas must be inactive (:meth:`set_active`)::

            with handle.mixed_batch(["task_a", "task_b", None]):
                logits = model(**batch).logits   # batch of 3 rows

        Raises:
            DeltaConfigError: an unknown name, a method without per-row selection that would apply
                to every row, or a merged delta.
        """
        rows = list(delta_names)
        named = sorted({n for n in rows if n is not None})
        self._selected(named)  # unknown names raise
        selectable = [d for d in self.deltas() if d.module.row_selectable]
        blocking = sorted({d.name for d in self.deltas() if not d.module.row_selectable and d.module.active}
                          | {d.name for d in selectable if d.module.merged})
        if blocking:
            raise DeltaConfigError(
                f"deltas {blocking} would apply to every row of a mixed batch (only unmerged LoRA and IA3 select"
                " rows): set_active([...]) without them, or unmerge() first")
        self._refuse_residual({d.name for d in selectable}, "used per row")
        saved = [(d.module, d.module.active) for d in selectable]
        try:
            for d in selectable:
                d.module.active = True
                d.module.row_mask = torch.tensor([n == d.name for n in rows], dtype=torch.bool)
            yield self
        finally:
            for module, was_active in saved:
                module.active, module.row_mask = was_active, None

    def _refuse_residual(self, names: Iterable[str], what: str) -> None:
        """Deltas that moved part of the frozen weight into themselves (PiSSA / OLoRA) cannot be left out."""
        residual = sorted({d.name for d in self.deltas() if d.name in names and d.module.weight_offset() is not None})
        if residual:
            raise DeltaConfigError(
                f"deltas {residual} hold part of the frozen weights (LoRA init='pissa'/'olora': the backbone keeps"
                f" only the residual), so they cannot be {what}; use init='default' or 'gaussian' for switchable tasks")

    def combine(self, names: Sequence[str], weights: Sequence[float] | None = None, *, name: str,
                how: str = "cat", rank: int | None = None, density: float = 0.5, seed: int = 0) -> DeltaModel:
        """Attaches LoRA delta ``name`` combining the weight updates of deltas ``names``: see
        :mod:`lightning_delta.combine`."""
        combine_lora(self.model, names, weights, name=name, how=how, rank=rank, density=density, seed=seed)
        return self

    # -- parameters and state ---------------------------------------------------------------
    def delta_parameters(self) -> list[nn.Parameter]:
        """The parameters of every delta module, each once."""
        owners = delta_owners(self.model)  # our deltas and the PEFT backend's parts (some ParameterDict entries)
        return [p for key, p in self.model.named_parameters() if is_under(key, owners)]

    def freeze_backbone(self, trainable: str | Iterable[str] = ()) -> DeltaModel:
        """Freezes every parameter but the deltas' and those of modules matching ``trainable``.

        Args:
            trainable: patterns (as for targets) of extra modules to train whole, e.g. ``"classifier"``.

        Raises:
            TargetError: a ``trainable`` pattern matches no module.
        """
        patterns = normalize_patterns(trainable)
        keep = {id(p) for p in self.delta_parameters()}
        for module_name in trainable_module_names(self.model, patterns):
            keep.update(id(p) for p in self.model.get_submodule(module_name).parameters())
        for p in self.model.parameters():
            p.requires_grad_(id(p) in keep)
        setattr(self.model, TRAINABLE_ATTR, patterns)
        return self

    def delta_state_dict(self) -> dict[str, torch.Tensor]:
        """Delta tensors, tensors of ``trainable`` modules and other parameters that require grad, detached."""
        keys = kept_keys(self.model)
        return {k: t.detach() for k, t in state_tensors(self.model).items() if k in keys}

    def load_delta_state_dict(self, state_dict: dict[str, torch.Tensor], strict: bool = True) -> None:
        """Loads what :meth:`delta_state_dict` returned, casting dtype and device.

        Raises:
            DeltaStateError: unknown keys, shape mismatches, frozen backbone keys (a full state
                dict), or, with ``strict``, missing delta keys. Nothing is loaded then.
        """
        load_into(self.model, state_dict, kept_keys(self.model), strict=strict)

    # -- merging ----------------------------------------------------------------------------
    def _selected(self, names: str | Iterable[str] | None) -> list[AttachedDelta]:
        if names is None:
            return self.deltas()
        wanted = list(normalize_patterns(names))
        unknown = [n for n in wanted if n not in self.configs]
        if unknown:
            raise DeltaConfigError(f"no delta named {unknown}; attached: {list(self.configs)}")
        return [d for d in self.deltas() if d.name in wanted]

    def merge(self, names: str | Iterable[str] | None = None) -> DeltaModel:
        """Folds deltas into the backbone weights; checks every one can merge before touching any."""
        selected = self._selected(names)
        check_merge(self.model, selected)
        for d in selected:
            d.module.merge(self.model.get_submodule(d.target_path))
        return self

    def unmerge(self, names: str | Iterable[str] | None = None) -> DeltaModel:
        """Undoes :meth:`merge`."""
        for d in self._selected(names):
            d.module.unmerge(self.model.get_submodule(d.target_path))
        return self

    def merge_and_unload(self) -> nn.Module:
        """Folds every delta into the backbone weights and removes the delta modules: a plain model again.

        The result holds no lightning_delta module or hook (``save_pretrained`` writes a stock model).

        Raises:
            MergeError: a delta cannot merge (nothing is changed then).
        """
        selected = self.deltas()
        check_merge(self.model, selected)
        for d in selected:
            target = self.model.get_submodule(d.target_path)
            d.module.merge(target)
            d.module.unhook_from(target)  # no on_detach: the merged weight is the tuned one
            delattr(target, d.name)
        self.model.__dict__.pop(TRAINABLE_ATTR, None)
        return self.model

    # -- reporting --------------------------------------------------------------------------
    def summary(self) -> DeltaSummary:
        """Total, trainable and delta parameter counts."""
        params = dict((id(p), p) for p in self.model.parameters())
        owned: dict[str, dict[int, int]] = {}  # delta name -> unique parameters (shared ones once)
        for d in self.deltas():
            owned.setdefault(d.name, {}).update((id(p), p.numel()) for p in d.module.parameters())
        per_delta = {name: sum(sizes.values()) for name, sizes in owned.items()}
        return DeltaSummary(
            total=sum(p.numel() for p in params.values()),
            trainable=sum(p.numel() for p in params.values() if p.requires_grad),
            delta=sum(per_delta.values()),
            per_delta=per_delta,
        )

    def __repr__(self) -> str:
        return f"DeltaModel({type(self.model).__name__}, {self.summary()})"


def attach(
    model: nn.Module,
    method: MethodSpec | Sequence[MethodSpec] | None = None,
    targets: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] = (),
    name: str | None = None,
    peft_config: Any = None,
    **hparams: Any,
) -> DeltaModel:
    """Attaches delta modules to ``model`` without changing its code or its parameter names.

    Args:
        model: any ``nn.Module`` (a transformers model gets presets from ``config.model_type``).
        method: a method name (``"lora"``, ``"bitfit"``), a config (``LoraConfig(r=4)``), or a
            list of configs to attach several deltas at once.
        targets: target patterns; ``None`` uses the method's preset for the model type.
        exclude: patterns of matched modules to leave out.
        name: the delta's name; defaults to the method name (``lora_2``, ... when taken).
        peft_config: instead of ``method``, any ``peft.PeftConfig``, injected with PEFT
            (:mod:`lightning_delta.methods.peft_backend`); needs the ``peft`` package.
        **hparams: the method's hyper-parameters, e.g. ``r=8, alpha=16``.

    Returns:
        A :class:`DeltaModel` handle. The backbone is not frozen: call ``freeze_backbone()``.

    Raises:
        DeltaConfigError: unknown method or hyper-parameter, or a value out of range.
        TargetError: a target matches nothing, or everything it matches is excluded.
        UnsupportedModuleError: a target is of a type the method cannot handle.
    """
    return DeltaModel(model).attach(method, targets, exclude, name, peft_config, **hparams)
