"""Two-process CPU DDP run with DeltaCallback; each rank reports what it communicated and holds.

    python tests/scripts/ddp_train.py OUT_DIR [STRATEGY]

Writes OUT_DIR/rank{r}.pt with the rank's delta state and the bytes its DDP communication
hook saw, and a checkpoint under OUT_DIR/ckpt (rank 0 only, as Lightning does).
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ for the helpers

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.callbacks import Callback, ModelCheckpoint  # noqa: E402
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook  # noqa: E402

from lightning_delta import DeltaCallback, DeltaModel  # noqa: E402
from lightning_helpers import Classifier, loader, save_pretrained_bert  # noqa: E402


class CountCommunication(Callback):
    """Registers a DDP communication hook that counts gradient bytes before all-reducing them."""

    def __init__(self, out: Path) -> None:
        self.out, self.bytes = out, 0

    def hook(self, state, bucket):
        self.bytes += bucket.buffer().numel() * bucket.buffer().element_size()
        return allreduce_hook(state, bucket)

    def on_train_start(self, trainer, pl_module):
        trainer.strategy.model.register_comm_hook(None, self.hook)

    def on_train_end(self, trainer, pl_module):
        handle = DeltaModel(pl_module.model)
        torch.save({"bytes": self.bytes, "steps": trainer.global_step,
                    "trainable_bytes": sum(p.numel() * p.element_size() for p in pl_module.parameters()
                                           if p.requires_grad),
                    "total_bytes": sum(p.numel() * p.element_size() for p in pl_module.parameters()),
                    "state": handle.delta_state_dict()}, self.out / f"rank{trainer.global_rank}.pt")


def main() -> None:
    out = Path(sys.argv[1])
    strategy = sys.argv[2] if len(sys.argv) > 2 else "ddp"
    source = out / "bert"
    if int(os.environ.get("LOCAL_RANK", 0)) == 0 and not source.exists():
        save_pretrained_bert(source)
    pl.seed_everything(3)
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy=strategy, max_epochs=2, logger=False,
        enable_progress_bar=False, enable_model_summary=False,
        callbacks=[DeltaCallback("lora", r=4, trainable="classifier"), CountCommunication(out),
                   ModelCheckpoint(dirpath=out / "ckpt", save_top_k=1)],
    )
    trainer.fit(Classifier(str(source)), loader(n=16))


if __name__ == "__main__":
    main()
