"""``DeltaCLI``: the LightningCLI behind ``lightning-delta fit / validate / test / predict``, with a
top-level ``delta:`` section (a :class:`DeltaCallback`; see :mod:`lightning_delta.cli` for the YAML).

Model and data are any LightningModule / LightningDataModule named by ``class_path``.
The tasks in :mod:`lightning_delta.tasks` build their optimizer in ``configure_optimizers``
from the parameters that require grad, after the deltas exist; LightningCLI's automatic
``--optimizer`` wiring is therefore off.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from typing_extensions import override

import lightning_delta.data  # noqa: F401  (listed under --data in the help)
import lightning_delta.tasks  # noqa: F401  (listed under --model in the help)
from lightning_delta.callback import DeltaCallback
from lightning_delta.errors import DeltaConfigError


class DeltaCLI(LightningCLI):
    """LightningCLI with a ``delta:`` section (a :class:`DeltaCallback`) and a re-savable config."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("auto_configure_optimizers", False)
        parser_kwargs = dict(kwargs.get("parser_kwargs") or {})
        parser_kwargs.setdefault("description", "Delta tuning with Lightning: fit, validate, test, predict from YAML"
                                 " configs. Also: lightning-delta export | merge | inspect --help (delta checkpoints"
                                 " to PEFT/delta folders, merged transformers models, the model tree).")
        parser_kwargs.setdefault("exit_on_error", False)  # lightning_delta.cli.main prints one short error
        kwargs["parser_kwargs"] = parser_kwargs
        super().__init__(*args, **kwargs)

    @override
    def add_core_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # the delta section first: `fit --help` shows it before Lightning's ~400 lines of trainer options
        parser.add_lightning_class_args(DeltaCallback, "delta")
        super().add_core_arguments_to_parser(parser)

    @override
    def before_instantiate_classes(self) -> None:
        """One place says where a delta goes: the method config's ``targets``."""
        config = self.config.get(self.subcommand) if self.subcommand else self.config
        delta = config.get("delta") if config is not None else None
        if delta is None or isinstance(delta.get("method"), str):
            return
        for key in ("targets", "exclude"):
            if delta.get(key) not in (None, [], ()):
                raise DeltaConfigError(
                    f"delta.{key}={delta.get(key)!r}: with the method given as a config, {key} belong to it; set"
                    f" delta.method.init_args.{key} (command line: --delta.method.init_args.{key}=...) and drop"
                    f" delta.{key}")

    def after_fit(self) -> None:
        """Says where the checkpoints are (rank 0), with the command that tests the best one."""
        if not self.trainer.is_global_zero:
            return
        lines = []
        for callback in self.trainer.checkpoint_callbacks:
            for label, path in (("best", callback.best_model_path), ("last", callback.last_model_path)):
                if path and Path(path).is_file():
                    lines.append(f"  {label}: {_shown(path)}")
        if lines:
            lines = list(dict.fromkeys(lines))
            print("lightning-delta fit: checkpoints (delta only)\n" + "\n".join(lines), flush=True)


def _shown(path: str) -> str:
    """``path`` relative to the working directory when it lies under it."""
    try:
        return os.path.relpath(path) if not os.path.relpath(path).startswith("..") else path
    except ValueError:  # another drive
        return path
