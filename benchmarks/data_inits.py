"""Data-driven LoRA inits on real data: validation accuracy early and at the end, default vs EVA vs LoRA-GA.

``python -m benchmarks.data_inits``: the pretrained MiniLM on TREC (``../shared/data/trec``) through
``SequenceClassification``, ``TextClassificationData`` and ``DeltaCallback(LoraConfig(init=...))`` (LoRA's
defaults: r=8 on query/value, its default rate; the new head trains whole), the quick setting of
``benchmarks.quality`` (150 steps of batch 16, max_length 32), 3 seeds. Scored on 500 training
questions held out (``benchmarks.quality.split_files``) after 50, 100 and 150 steps. EVA and LoRA-GA look at
``init_batches`` (8) batches first: the time it takes is in the table. ``--lrs 0.002 0.01``: each init at
these rates instead (the default rate was picked for the default init), written to ``data_inits_lrs.json``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

from benchmarks.harness import write
from benchmarks.quality import MODEL, SETTINGS, TREC, split_files

INITS = ("default", "eva", "lora_ga")
EVERY = 50


class Scores(pl.Callback):
    """Validation accuracy after every ``EVERY`` steps, and how long the fit's start took."""

    def __init__(self) -> None:
        self.acc: dict[int, float] = {}

    def on_fit_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self.started = time.perf_counter()

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step == 0 and not hasattr(self, "first_step"):
            self.first_step = time.perf_counter() - self.started

    def on_validation_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.acc[trainer.global_step] = float(trainer.callback_metrics["val_acc"])


def run(init: str, seed: int, files: dict[str, str], lr: float | None = None) -> dict[str, Any]:
    import logging
    import warnings

    import torch

    from lightning_delta import DeltaCallback, LoraConfig
    from lightning_delta.data import TextClassificationData
    from lightning_delta.tasks import SequenceClassification

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    setting = SETTINGS["quick"]
    pl.seed_everything(seed, verbose=False)
    task = SequenceClassification(MODEL, num_labels=6)
    data = TextClassificationData(data_files=files, max_length=setting["max_length"],
                                  batch_size=setting["batch_size"])
    scores = Scores()
    with tempfile.TemporaryDirectory() as root:
        trainer = pl.Trainer(max_steps=setting["steps"], accelerator="cpu", devices=1, logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                             val_check_interval=EVERY, num_sanity_val_steps=0, default_root_dir=root,
                             callbacks=[DeltaCallback(LoraConfig(init=init, **({"lr": lr} if lr else {}))), scores])
        trainer.fit(task, datamodule=data)
    return {"init": init, "lr": lr or LoraConfig.lr, "seed": seed, "val_acc": scores.acc,
            "start_s": scores.first_step}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--lrs", type=float, nargs="*", default=[], help="these learning rates instead")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp())
    files = split_files(TREC / "train.tsv", None, folder)["sweep"]
    files = {"train": files["train"], "validation": files["test"]}
    import multiprocessing

    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(run, init, seed, files, lr) for lr in args.lrs or [None] for init in INITS
                   for seed in range(args.seeds)]
        runs = [f.result() for f in futures]
    table = {}
    for row in dict.fromkeys((r["init"], r["lr"]) for r in runs):
        init = f"{row[0]} (lr {row[1]:g})"
        mine = [r for r in runs if (r["init"], r["lr"]) == row]
        steps = sorted(mine[0]["val_acc"])
        table[init] = {str(s): (round(statistics.mean(r["val_acc"][s] for r in mine), 4),
                                round(statistics.stdev(r["val_acc"][s] for r in mine), 4) if len(mine) > 1 else 0.0)
                       for s in steps}
        table[init]["start_s"] = round(statistics.mean(r["start_s"] for r in mine), 2)
    path = write("data_inits_lrs" if args.lrs else "data_inits",
                 {"model": MODEL, "data": "TREC, 500 training questions held out", "setting": SETTINGS["quick"],
                  "seeds": args.seeds, "table": table, "runs": runs})
    steps = [k for k in next(iter(table.values())) if k != "start_s"]
    print("| init | " + " | ".join(f"val acc @ {s}" for s in steps) + " | fit start to step 1 (s) |")
    print("|---|" + "---:|" * (len(steps) + 1))
    for init, row in table.items():
        cells = " | ".join(f"{row[s][0]:.3f} ± {row[s][1]:.3f}" for s in steps)
        print(f"| {init} | {cells} | {row['start_s']} |")
    print(path)


if __name__ == "__main__":
    main()
