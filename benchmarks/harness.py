"""Shared measuring: ABBA-ordered timing with an A/A noise check, and result files."""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def seconds(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def abba(a: Callable[[], Any], b: Callable[[], Any], repeats: int = 9, warmup: int = 2) -> dict[str, Any]:
    """Times ``a`` and ``b`` alternately (A B B A ...), ``repeats`` times each after ``warmup`` each.

    Returns:
        medians, minima and maxima of both, and ``ratio`` = median(a) / median(b).
    """
    for _ in range(warmup):
        a(), b()
    times: dict[str, list[float]] = {"a": [], "b": []}
    for i in range(repeats):
        order = ("a", "b") if i % 2 == 0 else ("b", "a")
        for side in order:
            times[side].append(seconds(a if side == "a" else b))
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"a_median": med["a"], "b_median": med["b"], "ratio": med["a"] / med["b"],
            "a_min": min(times["a"]), "a_max": max(times["a"]), "b_min": min(times["b"]), "b_max": max(times["b"])}


def machine() -> str:
    return f"{platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}"


def write(name: str, payload: dict[str, Any]) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"benchmark": name, "machine": machine(), **payload}, indent=2, default=str))
    return path
