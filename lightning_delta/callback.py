"""``DeltaCallback``: delta tuning for any LightningModule, with delta-only checkpoints."""

from __future__ import annotations

import os
import sys
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.plugins.precision import BitsandbytesPrecision, HalfPrecision
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import nn
from typing_extensions import override

from lightning_delta.checkpoint import META_KEY, DeltaCheckpointHooks, checkpoint_metadata, spec_differences
from lightning_delta.checkpoint_io import AtomicCheckpointIO
from lightning_delta.configure_model import AttachAfterConfigureModel
from lightning_delta.core import DeltaConfig
from lightning_delta.distributed import install_wrap_policy
from lightning_delta.engine import detach_delta
from lightning_delta.errors import DeltaConfigError, DeltaStateError, NonFiniteError
from lightning_delta.fingerprint import compare_fingerprint
from lightning_delta.fit_batches import forward_only, train_batches, untouched_random_state
from lightning_delta.handle import DeltaModel, ensure_attached, to_configs
from lightning_delta.hf_compat import new_modules
from lightning_delta.precision import KeepDeltasThroughLayerSwap, KeepTrainableFp32
from lightning_delta.recompute import enable_checkpointing
from lightning_delta.state import TRAINABLE_ATTR, local_shard, non_finite_keys, trainable_module_names
from lightning_delta.targets import normalize_patterns

try:  # let LightningCLI / jsonargparse accept `class_path: lightning_delta.LoraConfig` for a DeltaConfig
    from jsonargparse import set_parsing_settings

    set_parsing_settings(subclasses_enabled=[DeltaConfig])
except (ImportError, TypeError):  # pragma: no cover - jsonargparse missing or too old: Python use still works
    pass


def find_backbone(pl_module: nn.Module) -> str:
    """The dotted path of the one top-level transformers ``PreTrainedModel`` inside ``pl_module``.

    Raises:
        DeltaConfigError: none or several found; the message lists the candidates.
    """
    found: list[str] = []
    transformers = sys.modules.get("transformers")
    if transformers is not None:
        base = transformers.PreTrainedModel
        for name, module in pl_module.named_modules():
            if isinstance(module, base) and not any(name.startswith(f + ".") for f in found):
                found.append(name)
    if len(found) == 1:
        return found[0]
    children = [f"{n} ({type(m).__name__}, {sum(p.numel() for p in m.parameters()):,} params)"
                for n, m in pl_module.named_children()]
    if not found:
        raise DeltaConfigError(
            f"{type(pl_module).__name__} holds no transformers PreTrainedModel to attach deltas to; name the"
            f" backbone with DeltaCallback(..., module='<attribute path>'). Its submodules: {children or 'none'}"
        )
    raise DeltaConfigError(
        f"{type(pl_module).__name__} holds several transformers models: {found}; pick one with"
        f" DeltaCallback(..., module='{found[0]}')"
    )


class DeltaCallback(Callback):
    """Attaches deltas to a LightningModule's backbone, freezes the rest and keeps checkpoints delta-only.

    In YAML (``lightning-delta`` or any LightningCLI), give the method as a config so that every
    hyper-parameter is typed: ``method: {class_path: lightning_delta.LoraConfig, init_args: {r: 8}}``;
    ``method: lora`` takes the defaults.

    Args:
        method: a method name (``"lora"``, ``"bitfit"``), a config (``LoraConfig(r=8)``) or a list of configs.
        targets: target patterns (``None``: the method's default placement for the backbone's
            ``config.model_type``). With ``method`` a config, give them in the config instead
            (``LoraConfig(targets=[...])``; YAML ``delta.method.init_args.targets``): the command refuses
            ``delta.targets`` then, and naming them in both places is an error.
        trainable: patterns of backbone modules trained whole, e.g. ``["classifier"]``. ``None`` (the
            default): the modules the backbone's checkpoint lacked, which ``from_pretrained`` initialized at
            random (the new head of the ready tasks' models, e.g. ``classifier``); ``[]``: none.
        module: dotted path of the backbone inside the LightningModule; by default the one
            transformers ``PreTrainedModel`` it holds.
        exclude: patterns of matched modules to leave out.
        name: the delta's name (default: the method name).
        gradient_checkpointing: recompute the backbone's blocks in backward instead of keeping their
            activations (non-reentrant; see :mod:`lightning_delta.recompute`).
        every_n_layers: with ``gradient_checkpointing``, checkpoint every n-th block only.
        peft_config: instead of ``method``, any ``peft.PeftConfig`` (the PEFT backend; needs ``peft``).
        check_finite: stop training with :class:`NonFiniteError` at the first NaN/inf loss, or NaN/inf
            delta after an optimizer step (naming the step), and never checkpoint non-finite tensors.
            Steps a ``16-mixed`` GradScaler skips for inf gradients leave the deltas finite: not errors.
        active: names of the deltas that apply and train (default: all). Others attached to the
            backbone (e.g. earlier tasks loaded with ``load_delta``) stay frozen and unused, see
            :meth:`DeltaModel.set_active`.
        **hparams: the method's hyper-parameters, e.g. ``r=8, alpha=16, dropout=0.05``.

    Raises:
        DeltaConfigError: at construction, for unknown methods or hyper-parameters.
    """

    def __init__(
        self,
        method: DeltaConfig | list[DeltaConfig] | str = "lora",
        targets: str | list[str] | None = None,
        trainable: str | list[str] | None = None,
        module: str | None = None,
        exclude: str | list[str] | None = None,
        name: str | None = None,
        gradient_checkpointing: bool = False,
        every_n_layers: int = 1,
        peft_config: Any = None,
        active: str | list[str] | None = None,
        check_finite: bool = True,
        **hparams: Any,
    ) -> None:
        if peft_config is not None and method == "lora":
            method = None  # the default method gives way to the PEFT config
        self._configs = to_configs(method, targets, exclude, name, hparams, peft_config)
        self._trainable = None if trainable is None else normalize_patterns(trainable)
        self._module = module
        if every_n_layers < 1:
            raise DeltaConfigError(f"every_n_layers={every_n_layers} must be at least 1")
        self._checkpointing = every_n_layers if gradient_checkpointing else 0
        self._active = None if active is None else list(normalize_patterns(active))
        self._check_finite = check_finite
        self._trained: list | None = None  # what check_finite watches, found at the first optimizer step
        self._hooks: dict[str, Any] = {}  # per-run training hooks of the deltas (AdaLoRA's rank allocator)
        self._hook_state: dict[str, Any] = {}
        self._last_step = -1

    @property
    def configs(self) -> list[DeltaConfig]:
        """The delta configs this callback attaches (a copy)."""
        return list(self._configs)

    def backbone_path(self, pl_module: nn.Module) -> str:
        """Where the backbone sits in ``pl_module``."""
        if self._module is None:
            return find_backbone(pl_module)
        try:
            pl_module.get_submodule(self._module)
        except AttributeError as err:
            raise DeltaConfigError(
                f"DeltaCallback(module={self._module!r}): {type(pl_module).__name__} has no such submodule;"
                f" its children: {[n for n, _ in pl_module.named_children()]}"
            ) from err
        return self._module

    def attach(self, pl_module: nn.Module) -> DeltaModel:
        """Attaches this callback's deltas to ``pl_module``'s backbone (once), freezes it, installs
        the delta-only checkpoint hooks, and returns the backbone's handle."""
        path = self.backbone_path(pl_module)
        backbone = pl_module.get_submodule(path)
        # Initial values are seeded from the run's seed (seed_everything, else 0) and each delta's
        # path, so every rank draws the same ones without a broadcast.
        grads = {p: p.requires_grad for p in backbone.parameters()}
        recorded = backbone.__dict__.get(TRAINABLE_ATTR)
        added = ensure_attached(backbone, self._configs, seed=int(os.environ.get("PL_GLOBAL_SEED", 0)))
        try:
            handle = DeltaModel(backbone).freeze_backbone(self.trainable_patterns(backbone))
            if self._active is not None:
                handle.set_active(self._active)
        except Exception:  # e.g. trainable=["nomatch"]: leave the model as it was, so a corrected retry works
            for name in added:
                detach_delta(backbone, name)
            for p, flag in grads.items():
                p.requires_grad_(flag)
            backbone.__dict__.pop(TRAINABLE_ATTR, None)
            if recorded is not None:
                backbone.__dict__[TRAINABLE_ATTR] = recorded
            raise
        if self._checkpointing:
            enable_checkpointing(backbone, every_n_layers=self._checkpointing)
        DeltaCheckpointHooks.install(pl_module, path)
        strategy = getattr(getattr(pl_module, "_trainer", None), "strategy", None)
        if isinstance(strategy, FSDPStrategy):
            install_wrap_policy(strategy, backbone)
        whole = ", ".join(self.trainable_patterns(backbone))
        if whole and self._trainable is None:
            whole += " (newly initialized: not in the checkpoint)"
        rank_zero_info(f"lightning_delta: {handle.summary()}" + (f"; trained whole: {whole}" if whole else ""))
        return handle

    def attach_before_sharding(self, pl_module: nn.Module) -> nn.Module:
        """Attaches (once) and returns the backbone: :func:`~lightning_delta.distributed.shard` calls it first."""
        self.attach(pl_module)
        return pl_module.get_submodule(self.backbone_path(pl_module))

    def trainable_patterns(self, backbone: nn.Module) -> tuple[str, ...]:
        """The modules of ``backbone`` trained whole: those named, else the ones loaded without weights."""
        if self._trainable is not None:
            return self._trainable
        return tuple(new_modules(backbone))

    def has_backbone(self, pl_module: nn.Module) -> bool:
        """Whether ``pl_module`` holds the backbone yet (tasks may build it in ``configure_model``)."""
        try:
            self.backbone_path(pl_module)
        except DeltaConfigError:
            return False
        return True

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not self.has_backbone(pl_module) and is_overridden("configure_model", pl_module):
            # The backbone is built in configure_model, after this hook: attach right after it,
            # before the strategy shards and wraps the model.
            AttachAfterConfigureModel.install(pl_module, self)
        else:
            self.attach(pl_module)  # setup runs for every stage: attach is idempotent
        if type(getattr(trainer.strategy, "checkpoint_io", None)) is TorchCheckpointIO:  # Lightning's default
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        plugin = trainer.strategy.precision_plugin
        if isinstance(plugin, BitsandbytesPrecision) and not isinstance(plugin.convert_module,
                                                                        KeepDeltasThroughLayerSwap):
            # the plugin swaps every nn.Linear for a quantized layer after this hook: keep the deltas, and
            # leave modules trained whole in full precision
            path = self.backbone_path(pl_module)
            backbone = pl_module.get_submodule(path)
            prefix = f"{path}." if path else ""
            plugin.ignore_modules = set(plugin.ignore_modules) | {
                prefix + name for name in trainable_module_names(backbone, self.trainable_patterns(backbone))}
            plugin.convert_module = KeepDeltasThroughLayerSwap(plugin.convert_module, path)
        if isinstance(plugin, HalfPrecision) and not isinstance(plugin.convert_module, KeepTrainableFp32):
            # Lightning casts the whole module after this hook; trained tensors must stay fp32.
            plugin.convert_module = KeepTrainableFp32(plugin.convert_module, plugin._desired_input_dtype)
        if isinstance(trainer.strategy.launcher, _MultiProcessingLauncher):
            rank_zero_warn(
                f"strategy={type(trainer.strategy).__name__}(start_method={trainer.strategy._start_method!r})"
                " (ddp_spawn/ddp_fork) trains the deltas in worker processes and copies weights back with"
                " strict=False: the model in your main process will not hold the trained deltas. Load them after"
                " fit with lightning_delta.load_delta(model, trainer.checkpoint_callback.best_model_path), or use"
                " strategy='ddp'."
            )
        if str(trainer.precision) == "16-true":
            rank_zero_warn(
                "precision='16-true' has no GradScaler: small gradients reaching the fp32 deltas through the"
                " fp16 backbone can underflow to zero. Prefer precision='bf16-true' (same memory, no underflow)"
                " or '16-mixed' (fp16 compute with loss scaling)."
            )

    # -- methods' own training hooks (AdaLoRA: rank allocation on the Trainer's step counter) ----------
    @property
    def allocators(self) -> dict[str, Any]:
        """The training hooks of this run by delta name, e.g. AdaLoRA's rank allocators (empty before training)."""
        return dict(self._hooks)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._trained = None
        backbone = pl_module.get_submodule(self.backbone_path(pl_module))
        if trainer.ckpt_path is None:  # a resumed run has its trained values: no data-driven init again
            self._init_from_data(trainer, pl_module, backbone)
        self._hooks = {}
        for name, config in DeltaModel(backbone).configs.items():
            hook = config.training_hook(backbone, name, trainer.estimated_stepping_batches)
            if hook is not None:
                if name in self._hook_state:  # resumed: e.g. AdaLoRA's importance averages and history
                    hook.load_state_dict(self._hook_state[name])
                self._hooks[name] = hook
        self._hook_state = {}
        self._last_step = trainer.global_step

    def _init_from_data(self, trainer: pl.Trainer, pl_module: pl.LightningModule, backbone: nn.Module) -> None:
        """Deltas that start from the training data (LoRA ``init="eva"``) look at the first batches now."""
        for name, config in DeltaModel(backbone).configs.items():
            if config.data_batches():
                with untouched_random_state():
                    used = config.init_from_data(backbone, name, train_batches(trainer),
                                                 forward_only(trainer, pl_module))
                rank_zero_info(f"{name}: {config.method} initialised from {used} training batches")

    @override
    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The hooks' gradient terms after each backward (AdaLoRA's orthogonal regulariser).

        The gradients equal those of ``loss + orth_reg_weight * R`` (Lightning divides the loss by
        ``accumulate_grad_batches`` and a GradScaler multiplies it by its scale: so is ``R`` here),
        without touching the user's ``training_step`` or running a second backward through the model.
        """
        if not self._hooks:
            return
        factor = 1.0 / trainer.accumulate_grad_batches
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None and scaler.is_enabled():
            factor *= float(scaler.get_scale())
        for hook in self._hooks.values():
            hook.after_backward(factor)

    @override
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        """A NaN/inf loss stops training before its backward pass and optimizer step (every rank at once)."""
        if self._check_finite and self._any_rank(trainer, not bool(torch.isfinite(loss.detach()).all())):
            raise NonFiniteError(
                f"the training loss is {loss.item()} at step {trainer.global_step} (epoch {trainer.current_epoch}, on"
                " this or another rank): training stopped before the backward pass, so no delta or checkpoint took"
                " it. Lower the learning rate, check the data for empty or extreme rows, or clip gradients"
                " (Trainer(gradient_clip_val=1.0)); DeltaCallback(check_finite=False) turns this check off")

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        """After an optimizer step: the trained tensors are checked, then AdaLoRA's importance update and
        reallocation run (after ``optimizer.step()``, before the next ``zero_grad()``, which Lightning
        calls inside the next step's closure)."""
        if trainer.global_step == self._last_step:
            return  # an accumulating batch: no optimizer step, nothing changed
        self._last_step = trainer.global_step
        if self._check_finite:
            self._stop_if_not_finite(trainer, pl_module)
        for hook in self._hooks.values():
            hook.after_step(trainer.global_step)

    @staticmethod
    def _any_rank(trainer: pl.Trainer, flag: bool) -> bool:
        if trainer.world_size > 1:
            return bool(trainer.strategy.reduce_boolean_decision(flag, all=False))
        return flag

    def _stop_if_not_finite(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """One fused reduction over every trained tensor (its local shard, when sharded) per optimizer step."""
        if self._trained is None:
            self._trained = [(n, p) for n, p in pl_module.named_parameters() if p.requires_grad]
        local = [(n, t) for n, t in ((n, local_shard(p)) for n, p in self._trained) if t.numel()]
        norms = torch._foreach_norm([t for _, t in local], float("inf")) if local else []
        bad = bool(norms) and not bool(torch.stack([n.float() for n in norms]).isfinite().all())
        if self._any_rank(trainer, bad):
            name = next((n for (n, _), norm in zip(local, norms) if not bool(norm.isfinite())), "on another rank")
            raise NonFiniteError(
                f"{name} became NaN or infinite after the optimizer step at step {trainer.global_step} (epoch"
                f" {trainer.current_epoch}): training stopped and no checkpoint was written with it. Lower the"
                " learning rate or clip gradients (Trainer(gradient_clip_val=1.0));"
                " DeltaCallback(check_finite=False) turns this check off")

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"hooks": {name: h.state_dict() for name, h in self._hooks.items()}} if self._hooks else {}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # checkpoints written before hooks were generic say "adalora"
        self._hook_state = dict(state_dict.get("hooks", state_dict.get("adalora", {})))

    @override
    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        broken = non_finite_keys(checkpoint.get("state_dict", {})) if self._check_finite else []
        if broken:
            raise NonFiniteError(f"the checkpoint at step {trainer.global_step} would hold NaN or infinite values in"
                                 f" {broken[:3]}: nothing was written; the previous checkpoint is kept")
        checkpoint[META_KEY] = checkpoint_metadata(pl_module, self.backbone_path(pl_module))

    @override
    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        meta = checkpoint.get(META_KEY)
        if meta is None:
            return
        backbone = pl_module.get_submodule(self.backbone_path(pl_module))
        differences = spec_differences(meta["specs"], DeltaModel(backbone).configs)
        if differences:
            raise DeltaStateError(
                f"the checkpoint's deltas differ from those this DeltaCallback attached: {differences}."
                " Resume with the same method and hyper-parameters"
            )
        for note in compare_fingerprint(meta["fingerprint"], backbone):
            rank_zero_warn(note)
