"""Train a tiny classifier for 4 epochs with epoch-end checkpoints; optionally SIGKILL itself.

    python tests/scripts/kill_resume.py OUT SOURCE [--kill-at-step N] [--resume CKPT]

Writes OUT/final.pt with the delta state when training ends normally.
"""

import argparse
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.callbacks import Callback, ModelCheckpoint  # noqa: E402

from lightning_delta import DeltaCallback, DeltaModel  # noqa: E402
from lightning_helpers import Classifier, loader  # noqa: E402


class KillAt(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("source")
    parser.add_argument("--kill-at-step", type=int)
    parser.add_argument("--resume")
    args = parser.parse_args()
    callbacks = [DeltaCallback("lora", r=4, trainable="classifier"),
                 ModelCheckpoint(dirpath=args.out / "ckpt", save_last=True, every_n_epochs=1, save_top_k=-1)]
    if args.kill_at_step:
        callbacks.append(KillAt(args.kill_at_step))
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=4, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=callbacks)
    module = Classifier(args.source)
    trainer.fit(module, loader(n=12, batch_size=4), ckpt_path=args.resume, weights_only=True)
    torch.save(DeltaModel(module.model).delta_state_dict(), args.out / "final.pt")


if __name__ == "__main__":
    main()
