"""Run every benchmark: ``python -m benchmarks`` (each prints its table and writes results/*.json).

``python -m benchmarks vs_peft overheads`` runs only those. CPU by default; the figures are
ratios measured side by side in one process, so compare them, not the seconds, across machines.
"""

from __future__ import annotations

import importlib
import sys

ALL = ("vs_peft", "overheads", "multitask", "expert_lora", "precision", "checkpointing", "fast_lora", "gpu")


def main(names: list[str]) -> None:
    for name in names or ALL:
        if name not in ALL:
            raise SystemExit(f"unknown benchmark {name!r}; choose from {', '.join(ALL)}")
        print(f"\n== {name} ==")
        module = importlib.import_module(f"benchmarks.{name}")
        saved, sys.argv = sys.argv, [f"benchmarks.{name}"]
        try:
            module.main()
        finally:
            sys.argv = saved


if __name__ == "__main__":
    main(sys.argv[1:])
