"""The ``lightning-delta`` command: LightningCLI with fit / validate / test / predict driven by YAML.

The delta has its own top-level section, so every hyper-parameter is typed, shown by
``--print_config`` and settable from the command line::

    delta:
      method:
        class_path: lightning_delta.LoraConfig
        init_args: {r: 8, alpha: 16, targets: [query, value]}
      trainable: [classifier]

    lightning-delta fit --config configs/quickstart.yaml --delta.method.init_args.r=4

Model and data are any LightningModule / LightningDataModule named by ``class_path``.
The tasks in :mod:`lightning_delta.tasks` build their optimizer in ``configure_optimizers``
from the parameters that require grad, after the deltas exist; LightningCLI's automatic
``--optimizer`` wiring is therefore off.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from typing_extensions import override

from lightning_delta.callback import DeltaCallback


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
        kwargs["parser_kwargs"] = parser_kwargs
        super().__init__(*args, **kwargs)

    @override
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(DeltaCallback, "delta")


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``lightning-delta`` console script: LightningCLI's subcommands, and
    ``export``, ``merge`` and ``inspect`` (:mod:`lightning_delta.commands`)."""
    import sys

    argv = sys.argv[1:] if args is None else list(args)
    if argv and argv[0] in ("export", "merge", "inspect"):
        from lightning_delta.commands import run

        code = run(argv)
        if code:
            raise SystemExit(code)
        return
    DeltaCLI(args=args)


if __name__ == "__main__":
    main()
