"""Serving several tasks from one backbone: one mixed batch vs one forward per task.

``python -m benchmarks.multitask``: MiniLM with four LoRA tasks (r=8 on query/value), 16 requests of
128 tokens spread over the tasks. "mixed" answers them in one forward with
``DeltaModel.mixed_batch`` (each row uses its own task's delta); "per task" switches with
``set_active`` and runs one forward per task on its rows, as one would without per-row selection.
Both give the same logits (checked here before timing). A third row, one task over all 16 rows,
shows what the per-row selection costs over a plain single-task forward.
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.harness import abba, write
from benchmarks.vs_peft import build
from lightning_delta import LoraConfig, attach

TASKS = ("a", "b", "c", "d")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    model, batch = build("minilm")
    model.eval()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    handle = attach(model, [LoraConfig(r=8, name=t, targets=["query", "value"]) for t in TASKS])
    with torch.no_grad():
        for p in handle.delta_parameters():
            p.normal_(0, 0.05)
    rows = [TASKS[i % len(TASKS)] for i in range(inputs["input_ids"].shape[0])]
    by_task = {t: torch.tensor([r == t for r in rows]) for t in TASKS}

    @torch.no_grad()
    def mixed() -> torch.Tensor:
        with handle.mixed_batch(rows):
            return model(**inputs).logits

    @torch.no_grad()
    def per_task() -> torch.Tensor:
        out = torch.empty(len(rows), model.config.num_labels)
        for task, mask in by_task.items():
            handle.set_active(task)
            out[mask] = model(**{k: v[mask] for k, v in inputs.items()}).logits
        handle.set_active(None)
        return out

    @torch.no_grad()
    def one_task() -> torch.Tensor:
        handle.set_active("a")
        logits = model(**inputs).logits
        handle.set_active(None)
        return logits

    torch.testing.assert_close(mixed(), per_task(), rtol=1e-4, atol=1e-5)
    vs_switching = abba(mixed, per_task, args.repeats)
    vs_single = abba(mixed, one_task, args.repeats)
    print("| comparison (MiniLM, 4 LoRA tasks, 16 x 128) | time ratio | medians (s) |")
    print("| --- | --- | --- |")
    print(f"| mixed batch / one forward per task (set_active) | {vs_switching['ratio']:.3f} |"
          f" {vs_switching['a_median']:.3f} / {vs_switching['b_median']:.3f} |")
    print(f"| mixed batch / one task over all rows | {vs_single['ratio']:.3f} |"
          f" {vs_single['a_median']:.3f} / {vs_single['b_median']:.3f} |")
    write("multitask", {"repeats": args.repeats, "rows": rows, "mixed_over_per_task": vs_switching,
                        "mixed_over_one_task": vs_single})


if __name__ == "__main__":
    main()
