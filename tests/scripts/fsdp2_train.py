"""FSDP2 (DeltaModelParallelStrategy on CPU, gloo) with DeltaCallback and a backbone built in configure_model.

    python tests/scripts/fsdp2_train.py OUT SOURCE DEVICES MAX_EPOCHS [--resume CKPT] [--explicit-shard]
        [--checkpointing] [--targets q_proj,v_proj] [--init eva]

Rank 0 writes OUT/report.pt (the full delta state and what each rank's frozen parameters and
optimizer held) and every rank joins in saving OUT/final.ckpt.
"""

import argparse
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, TensorDataset

from lightning_delta import DeltaCallback, DeltaModel, DeltaModelParallelStrategy, trainable_parameters
from lightning_delta.distributed import is_sharded, shard
from lightning_delta.tensors import gathered


class LlamaLM(pl.LightningModule):
    def __init__(self, source: str, explicit_shard: bool) -> None:
        super().__init__()
        self.source, self.explicit_shard = source, explicit_shard
        self.model = None

    def configure_model(self) -> None:
        if self.model is not None:
            return
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(self.source)
        if self.explicit_shard:
            shard(self, self.device_mesh["data_parallel"])

    def training_step(self, batch, batch_idx):
        return self.model(input_ids=batch[0], labels=batch[0]).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(trainable_parameters(self), lr=1e-2)


class Report(Callback):
    def __init__(self, out: Path) -> None:
        self.out = out

    def on_train_end(self, trainer, pl_module):
        handle = DeltaModel(pl_module.model)
        trainable = set(map(id, trainable_parameters(pl_module)))
        frozen = [p for p in pl_module.parameters() if id(p) not in trainable]
        state = {k: gathered(v) for k, v in handle.delta_state_dict().items()}  # collective: every rank
        report = {
            "state": state,
            "sharded": is_sharded(pl_module),
            "frozen_with_grad": sum(p.grad is not None for p in frozen),
            "optimizer_states": len(trainer.optimizers[0].state),
            "trainable": len(trainable),
            "steps": trainer.global_step,
        }
        if trainer.is_global_zero:
            torch.save(report, self.out / "report.pt")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("source")
    parser.add_argument("devices", type=int)
    parser.add_argument("max_epochs", type=int)
    parser.add_argument("--resume")
    parser.add_argument("--explicit-shard", action="store_true")
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--targets", default="q_proj,v_proj", help="LoRA targets, comma-separated")
    parser.add_argument("--init", default="default", help="LoRA init")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    pl.seed_everything(0)
    ids = torch.randint(1, 99, (16, 8), generator=torch.Generator().manual_seed(0))
    data = DataLoader(TensorDataset(ids), batch_size=8 // args.devices)  # global batch 8 on any world size
    trainer = pl.Trainer(
        accelerator="cpu", devices=args.devices, max_epochs=args.max_epochs, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        strategy=DeltaModelParallelStrategy(data_parallel_size=args.devices, tensor_parallel_size=1),
        callbacks=[DeltaCallback("lora", r=4, targets=args.targets.split(","), init=args.init, init_batches=2,
                                 gradient_checkpointing=args.checkpointing), Report(args.out)],
    )
    trainer.fit(LlamaLM(args.source, args.explicit_shard), data, ckpt_path=args.resume)
    trainer.save_checkpoint(args.out / "final.ckpt")


if __name__ == "__main__":
    sys.exit(main())
