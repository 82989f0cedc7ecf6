"""Tensor parallelism: DeltaModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=2) on CPU (gloo)
with LoRA on every projection of a tiny Llama (q/k/v/gate/up column-parallel, o/down row-parallel).

    python tests/scripts/tp_train.py OUT SOURCE STATE [--late-attach] [--epochs N] [--resume CKPT]

STATE holds full LoRA tensors to start from (B non-zero). By default configure_model calls
``tensor_parallel`` (DeltaCallback's deltas are attached first); with ``--late-attach`` it calls torch's
``parallelize_module`` and DeltaCallback attaches afterwards. Rank 0 writes OUT/report.pt: logits, loss
and full LoRA gradients of the first batch before any step, the placements of each LoRA factor, the
delta state after the AdamW steps (three an epoch) and then the logits plain, merged, unmerged and in a
mixed batch; every rank joins in saving OUT/final.ckpt. With ``--resume`` the run starts from the
checkpoint instead of STATE (and reports no first-batch values).
"""

import argparse
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
from torch.utils.data import DataLoader, TensorDataset

from lightning_delta import DeltaCallback, DeltaModel, DeltaModelParallelStrategy, trainable_parameters
from lightning_delta.distributed import tensor_parallel
from lightning_delta.tensors import distributed_like, gathered
from lightning_delta.state import state_tensors

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LAYER_PLAN = {"self_attn.q_proj": ColwiseParallel(), "self_attn.k_proj": ColwiseParallel(),
              "self_attn.v_proj": ColwiseParallel(), "self_attn.o_proj": RowwiseParallel(),
              "mlp.gate_proj": ColwiseParallel(), "mlp.up_proj": ColwiseParallel(), "mlp.down_proj": RowwiseParallel()}


def batches() -> torch.Tensor:
    return torch.randint(1, 99, (12, 8), generator=torch.Generator().manual_seed(0))  # 3 batches of 4


class LlamaLM(pl.LightningModule):
    def __init__(self, source: str, late_attach: bool) -> None:
        super().__init__()
        self.source, self.late_attach = source, late_attach
        self.model = None
        self.losses = []

    def configure_model(self) -> None:
        if self.model is not None:
            return
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(self.source)
        mesh = self.device_mesh["tensor_parallel"]
        if self.late_attach:
            parallelize_module(self.model, mesh, {f"model.layers.*.{k}": v for k, v in LAYER_PLAN.items()})
        else:
            tensor_parallel(self, mesh, {f"model.model.layers.*.{k}": v for k, v in LAYER_PLAN.items()})

    def training_step(self, batch, batch_idx):
        loss = self.model(input_ids=batch[0], labels=batch[0]).loss
        self.losses.append(loss.detach().clone())
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(trainable_parameters(self), lr=1e-2)


class Report(Callback):
    def __init__(self, out: Path, state: dict | None) -> None:
        self.out, self.state, self.report = out, state, {}

    def on_train_start(self, trainer, pl_module):
        if self.state is None:  # resumed from a checkpoint
            return
        model = pl_module.model
        tensors = state_tensors(model)
        with torch.no_grad():
            for key, full in self.state.items():
                tensors[key].copy_(distributed_like(full, tensors[key]))
        ids = batches()[:4]
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        frozen = [p for p in model.parameters() if not p.requires_grad]
        self.report.update(
            logits=out.logits.detach().clone(), loss=out.loss.detach().clone(),
            grads={n: gathered(p.grad) for n, p in model.named_parameters() if p.requires_grad},
            placements={n: (type(p).__name__, str(getattr(p, "placements", None)))
                        for n, p in model.named_parameters() if p.requires_grad},
            frozen_with_grad=sum(p.grad is not None for p in frozen),
            frozen_dtensors=sum(isinstance(p, DTensor) for p in frozen),
        )
        model.zero_grad(set_to_none=True)

    def on_train_end(self, trainer, pl_module):
        model, ids = pl_module.model, batches()[:4]
        handle = DeltaModel(model)
        state = {k: gathered(v) for k, v in handle.delta_state_dict().items()}  # collective: every rank
        with torch.no_grad():
            logits = model(input_ids=ids).logits
            handle.merge()
            merged = model(input_ids=ids).logits
            handle.unmerge()
            unmerged = model(input_ids=ids).logits
            with handle.mixed_batch(["lora", None, "lora", None]):
                mixed = model(input_ids=ids).logits
        self.report.update(merged=merged, unmerged=unmerged, mixed=mixed)
        self.report.update(state=state, final_logits=logits, steps=trainer.global_step, losses=pl_module.losses,
                           optimizer_states=len(trainer.optimizers[0].state),
                           world_size=trainer.world_size)
        if trainer.is_global_zero:
            torch.save(self.report, self.out / "report.pt")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("source")
    parser.add_argument("state")
    parser.add_argument("--late-attach", action="store_true")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--resume")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    pl.seed_everything(0)
    data = DataLoader(TensorDataset(batches()), batch_size=4)
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, max_epochs=args.epochs, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        use_distributed_sampler=False,  # data_parallel_size=1: every rank sees every batch, in order
        strategy=DeltaModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=2),
        callbacks=[DeltaCallback("lora", r=4, targets=TARGETS),
                   Report(args.out, None if args.resume else torch.load(args.state, weights_only=True))],
    )
    trainer.fit(LlamaLM(args.source, args.late_attach), data, ckpt_path=args.resume)
    trainer.save_checkpoint(args.out / "final.ckpt")


if __name__ == "__main__":
    sys.exit(main())
