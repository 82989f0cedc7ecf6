"""DeepSpeed ZeRO (DeltaDeepSpeedStrategy on the CPU, gloo) with DeltaCallback, LoRA on a tiny Llama.

    python tests/scripts/deepspeed_train.py OUT SOURCE DEVICES MAX_EPOCHS STAGE [--resume CKPT]

Rank 0 writes OUT/report.pt (the trained values as the model holds them after fit, what ZeRO
partitioned, the bytes the collectives moved while the checkpoint was written) and every rank
joins in saving OUT/final.ckpt.
"""

import argparse
import importlib
import os
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.callbacks import Callback  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from lightning_delta import DeltaCallback, DeltaDeepSpeedStrategy, trainable_parameters  # noqa: E402

# DeepSpeed's CPU accelerator compiles a shared-memory all-reduce (inference only) at init: ~55 s of g++
importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


class LlamaLM(pl.LightningModule):
    def __init__(self, source: str, in_configure_model: bool = False) -> None:
        super().__init__()
        self.source, self.model, self.in_configure_model = source, None, in_configure_model
        if not in_configure_model:
            self.configure_model()

    def configure_model(self) -> None:
        if self.model is None:  # under ZeRO-3 Lightning runs this inside deepspeed.zero.Init
            from transformers import AutoConfig, AutoModelForCausalLM

            self.model = AutoModelForCausalLM.from_pretrained(self.source) if not self.in_configure_model else \
                AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(self.source))

    def training_step(self, batch, batch_idx):
        return self.model(input_ids=batch[0], labels=batch[0]).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(trainable_parameters(self), lr=1e-2)


class CommBytes:
    """Bytes the collectives write while on: DeepSpeed's communication backend, patched."""

    NAMES = ("all_gather_into_tensor", "all_gather", "broadcast", "all_reduce", "reduce_scatter_tensor")

    def __enter__(self):
        from deepspeed.comm import comm

        self.backend, self.bytes = comm.cdb, 0

        def counting(call):
            def counted(*args, **kwargs):
                first = args[0] if args else next(iter(kwargs.values()))
                for t in first if isinstance(first, (list, tuple)) else [first]:
                    self.bytes += t.numel() * t.element_size()
                return call(*args, **kwargs)
            return counted

        for name in self.NAMES:
            setattr(self.backend, name, counting(getattr(self.backend, name)))
        return self

    def __exit__(self, *exc):
        for name in self.NAMES:
            delattr(self.backend, name)  # the instance attributes: the class's methods show again


def full_value(param: torch.Tensor) -> torch.Tensor:
    """A parameter's full value: under ZeRO-3 every rank's partition (``ds_tensor``) all-gathered and unpadded."""
    if not hasattr(param, "ds_tensor"):
        return param.detach().clone()
    part = param.ds_tensor.detach().clone()
    parts = [torch.empty_like(part) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(parts, part)
    return torch.cat(parts)[: param.ds_numel].view(param.ds_shape).clone()


class Report(Callback):
    def __init__(self, out: Path) -> None:
        self.out = out

    def on_train_end(self, trainer, pl_module):
        frozen = [p for p in pl_module.parameters() if not p.requires_grad]
        self.partitioned = sum(p.numel() == 0 for p in frozen)
        self.frozen_with_grad = sum(p.grad is not None for p in frozen)
        self.dtypes = {"frozen": sorted({str(p.dtype) for p in frozen}),
                       "trained": sorted({str(p.dtype) for p in pl_module.parameters() if p.requires_grad})}
        # the live values, each rank's ZeRO-3 partition of the module's parameter gathered by hand: independent
        # of the strategy's path (the fp32 master copies), and of DeepSpeed 0.16's GatheredParameters, which
        # now and then handed back a buffer before its all-gather had filled it
        self.state = {k: full_value(p) for k, p in sorted(pl_module.named_parameters()) if p.requires_grad}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("source")
    parser.add_argument("devices", type=int)
    parser.add_argument("max_epochs", type=int)
    parser.add_argument("stage", type=int)
    parser.add_argument("--resume")
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--configure-model", action="store_true")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    pl.seed_everything(0)
    ids = torch.randint(1, 99, (16, 8), generator=torch.Generator().manual_seed(0))
    data = DataLoader(TensorDataset(ids), batch_size=8 // args.devices)  # global batch 8 on any world size
    report = Report(args.out)
    strategy = DeltaDeepSpeedStrategy(stage=args.stage, logging_batch_size_per_gpu=8 // args.devices,
                                      config=None if args.stage < 3 else {
                                          "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
                                          "train_micro_batch_size_per_gpu": 8 // args.devices})
    trainer = pl.Trainer(
        accelerator="cpu", devices=args.devices, max_epochs=args.max_epochs, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, strategy=strategy,
        precision=args.precision,
        callbacks=[DeltaCallback("lora", r=4, targets=["q_proj", "v_proj"]), report],
    )
    module = LlamaLM(args.source, args.configure_model)
    trainer.fit(module, data, ckpt_path=args.resume)
    with CommBytes() as comm:
        trainer.save_checkpoint(args.out / "final.ckpt")
    if trainer.is_global_zero:
        torch.save({"state": report.state, "steps": trainer.global_step, "partitioned": report.partitioned,
                    "frozen_with_grad": report.frozen_with_grad, "dtypes": report.dtypes,
                    "save_comm_bytes": comm.bytes,
                    "frozen_bytes": sum(p.ds_numel * 4 if hasattr(p, "ds_numel") else p.numel() * 4
                                        for p in module.parameters() if not p.requires_grad),
                    "optimizer": type(trainer.optimizers[0]).__name__}, args.out / "report.pt")


if __name__ == "__main__":
    sys.exit(main())
