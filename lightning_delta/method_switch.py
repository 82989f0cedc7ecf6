"""``--delta.method=X`` on the command line: X's own placement and learning rate, whatever the config said."""

from __future__ import annotations

import lightning_delta
from lightning_delta.methods import METHODS, default_lr


def _method_class_path(value: str) -> str:
    """``bitfit`` -> ``lightning_delta.BitFitConfig``; anything else unchanged."""
    cls = METHODS.get(value.lower())
    if cls is None:
        return value
    return f"lightning_delta.{cls.__name__}" if getattr(lightning_delta, cls.__name__, None) is cls \
        else f"{cls.__module__}.{cls.__name__}"


def _default_lr(class_path: str) -> str | None:
    """The ``lr`` default of the registered method config at ``class_path`` as YAML; ``None`` for other classes."""
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
