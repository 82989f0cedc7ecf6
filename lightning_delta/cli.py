"""The ``lightning-delta`` command: LightningCLI with fit / validate / test / predict driven by YAML,
and ``export``, ``merge`` and ``inspect`` (:mod:`lightning_delta.commands`).

The delta has its own top-level section, so every hyper-parameter is typed, shown by
``--print_config`` and settable from the command line::

    delta:
      method:
        class_path: lightning_delta.LoraConfig
        init_args: {r: 8, alpha: 16, targets: [query, value]}
      trainable: [classifier]

    lightning-delta fit --config configs/quickstart.yaml --delta.method.init_args.r=4

Switching the method on the command line (``--delta.method=bitfit`` or
``--delta.method=lightning_delta.BitFitConfig``, the same thing) gives that method's own placement
unless targets are named too (``--delta.method.init_args.targets=[...]``).

A user's mistake (an unknown method or key, a missing file, a model not available offline, ...)
ends in one short ``error:`` block and exit code 2; ``--debug`` (or ``LIGHTNING_DELTA_DEBUG=1``)
shows the traceback instead. This module imports Lightning only when a LightningCLI subcommand
runs, so ``lightning-delta --help`` is quick; :class:`DeltaCLI` lives in
:mod:`lightning_delta.lightning_cli`.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from lightning_delta.method_switch import switch_method
from lightning_delta.user_errors import DEBUG_ENV, DEBUG_FLAG, fail, user_errors

#: The subcommands, in the order ``--help`` lists them.
SUBCOMMANDS = {
    "fit": "train: attach the deltas, freeze the backbone, write delta-only checkpoints",
    "validate": "run the validation loop (--ckpt_path a delta checkpoint)",
    "test": "run the test loop (--ckpt_path a delta checkpoint)",
    "predict": "run prediction (--ckpt_path a delta checkpoint)",
    "export": "write a checkpoint's delta as a PEFT adapter or a delta folder",
    "merge": "fold the deltas into the backbone and save a plain transformers model",
    "inspect": "the model tree with deltas and trainable parameters marked",
}
_OWN = ("export", "merge", "inspect")

HELP = """usage: lightning-delta <command> [options]   (lightning-delta <command> --help for its options)

Delta tuning for PyTorch Lightning: a frozen pretrained backbone, small trainable deltas.

commands:
{commands}

examples:
  lightning-delta fit --config configs/quickstart.yaml
  lightning-delta fit --config configs/quickstart.yaml --delta.method=prompt
  lightning-delta fit --config configs/quickstart.yaml --print_config
  lightning-delta test --config configs/quickstart.yaml --ckpt_path <the best checkpoint fit printed>

options:
  -h, --help   show this message
  --debug      show the full traceback of an error (also: {env}=1)
"""


def __getattr__(name: str) -> Any:
    if name == "DeltaCLI":  # imported on use: it imports Lightning
        from lightning_delta.lightning_cli import DeltaCLI

        return DeltaCLI
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def print_help() -> None:
    width = max(map(len, SUBCOMMANDS))
    commands = "\n".join(f"  {name.ljust(width)}  {text}" for name, text in SUBCOMMANDS.items())
    print(HELP.format(commands=commands, env=DEBUG_ENV))


def _quiet_warnings() -> None:
    """Warnings about Lightning's and torch's own internals that say nothing to a user of the command."""
    import warnings

    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*", category=FutureWarning)


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``lightning-delta`` console script."""
    from_command_line = args is None
    argv = sys.argv[1:] if from_command_line else list(args)
    debug = DEBUG_FLAG in argv or os.environ.get(DEBUG_ENV, "").strip() not in ("", "0")
    argv = [a for a in argv if a != DEBUG_FLAG]
    if debug:
        os.environ[DEBUG_ENV] = "1"  # processes Lightning launches for other ranks see it too
    if not argv or argv[0] in ("-h", "--help"):
        print_help()
        if not argv:
            raise SystemExit(2)
        return
    command = argv[0]
    if command in _OWN:
        from lightning_delta.commands import run

        code = run(argv, debug=debug)
        if code:
            raise SystemExit(code)
        return
    if command not in SUBCOMMANDS and not command.startswith("-"):
        import difflib

        close = difflib.get_close_matches(command, SUBCOMMANDS, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        fail("", ValueError(f"unknown command {command!r}; {hint}commands: {', '.join(SUBCOMMANDS)}"))
    _quiet_warnings()
    argv = switch_method(argv)
    if from_command_line:  # Lightning relaunches sys.argv for multi-process strategies: keep it the same
        sys.argv = [sys.argv[0], *argv]
    expected = user_errors()
    try:
        from lightning_delta.lightning_cli import DeltaCLI

        DeltaCLI(args=None if from_command_line else argv)
    except expected as err:
        if debug:
            raise
        fail(command, err)


if __name__ == "__main__":
    main()
