"""What the offline quickstart shows: LoRA against the frozen backbone with only its head trained.

``python -m benchmarks.quickstart``: runs README command 1's ``lightning-delta fit --config
configs/quickstart.yaml`` as a user does (a subprocess, wall time included) and reads its best
validation accuracy; then trains the classifier head alone on the frozen MiniLM over the same
synthetic data, epochs and batches, at the quickstart's learning rate (LoRA's own) and at 10x it. Writes
``benchmarks/results/quickstart.json`` and prints a table. The synthetic set negates and turns
opinions, so the words alone do not give the label: the head alone should trail LoRA clearly.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.harness import write

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "quickstart.yaml"


def lora_via_the_command(root: Path) -> dict:
    command = ["lightning-delta", "fit", "--config", str(CONFIG), f"--trainer.default_root_dir={root}",
               "--trainer.enable_progress_bar=false"]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                          cwd=ROOT)
    wall = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"the quickstart failed:\n{done.stderr[-2000:]}")
    (best,) = root.glob("lightning_logs/version_*/checkpoints/best-*.ckpt")
    accuracy = float(re.search(r"val_acc=([0-9.]+)\.ckpt$", best.name).group(1))
    return {"val_acc": accuracy, "fit_wall_s": round(wall, 1)}


def head_only(learning_rate: float, root: Path) -> dict:
    """The quickstart's task, data and trainer settings; no delta, only ``model.classifier`` trains."""
    import lightning.pytorch as pl
    import yaml

    from lightning_delta.data import SyntheticSentimentData
    from lightning_delta.tasks import SequenceClassification

    config = yaml.safe_load(CONFIG.read_text())
    pl.seed_everything(config["seed_everything"], verbose=False)
    task_args = {**config["model"]["init_args"], "learning_rate": learning_rate}
    task = SequenceClassification(**task_args)
    for name, parameter in task.named_parameters():
        parameter.requires_grad_(name.startswith("model.classifier."))
    data = SyntheticSentimentData(**config["data"]["init_args"])
    seen: list[float] = []

    class Best(pl.Callback):  # the best epoch, as the quickstart's ModelCheckpoint(monitor="val_acc") keeps
        def on_validation_end(self, trainer, module):
            if not trainer.sanity_checking:
                seen.append(float(trainer.callback_metrics["val_acc"]))

    trainer = pl.Trainer(max_epochs=config["trainer"]["max_epochs"], accelerator="cpu", devices=1,
                         default_root_dir=root, enable_progress_bar=False, enable_checkpointing=False,
                         logger=False, enable_model_summary=False, callbacks=[Best()])
    start = time.perf_counter()
    trainer.fit(task, datamodule=data)
    wall = time.perf_counter() - start
    accuracy = max(seen)
    return {"val_acc": round(accuracy, 3), "fit_wall_s": round(wall, 1), "learning_rate": learning_rate}


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        lora = lora_via_the_command(Path(tmp) / "lora")
        from lightning_delta import LoraConfig

        base_lr = LoraConfig().lr  # the quickstart config names no rate: LoRA trains at its own
        heads = [head_only(lr, Path(tmp) / f"head-{lr}") for lr in (base_lr, 10 * base_lr)]
    rows = [("LoRA r=8 on query/value + head (the quickstart command)", lora)]
    rows += [(f"head only, frozen backbone, lr {h['learning_rate']}", h) for h in heads]
    width = max(len(r[0]) for r in rows)
    print(f"{'run'.ljust(width)}  val_acc  fit wall s")
    for name, row in rows:
        print(f"{name.ljust(width)}  {row['val_acc']:.3f}    {row['fit_wall_s']:.1f}")
    path = write("quickstart", {"python": sys.version.split()[0], "rows": [{"run": n, **r} for n, r in rows]})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
