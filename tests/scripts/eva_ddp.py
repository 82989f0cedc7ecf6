"""A data-driven LoRA init at fit start on DEVICES CPU processes (gloo DDP); each rank saves the factors it
starts training with.

    python tests/scripts/eva_ddp.py OUT DEVICES [INIT]   (INIT: eva, the default, or lora_ga)

The data: 8 causal-LM batches of 4 rows. On 2 processes rank r takes batches r, r + 2, ... (no distributed
sampler), so one step sees batches 2i and 2i+1; on 1 process the same pairs come concatenated.
Writes OUT/rank{r}.pt: the delta tensors after DeltaCallback's on_train_start.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ for the helpers

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.callbacks import Callback  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from lightning_delta import DeltaCallback, DeltaModel, LoraConfig  # noqa: E402
from models import tiny_llama  # noqa: E402
from test_data_inits import LM, lm_batches  # noqa: E402


class RankLM(LM):
    def __init__(self, model, batches) -> None:
        super().__init__(model)
        self.batches = batches

    def train_dataloader(self):
        return DataLoader(self.batches[self.global_rank::self.trainer.world_size], batch_size=None)


class Save(Callback):
    def __init__(self, out: Path) -> None:
        self.out = out

    def on_train_start(self, trainer, pl_module):
        state = {k: v.detach().clone() for k, v in DeltaModel(pl_module.model).delta_state_dict().items()}
        torch.save(state, self.out / f"rank{trainer.global_rank}.pt")


def main() -> None:
    out, devices = Path(sys.argv[1]), int(sys.argv[2])
    init = sys.argv[3] if len(sys.argv) > 3 else "eva"
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = tiny_llama()
    batches = lm_batches(8, vocab=7)
    if devices == 1:
        batches = [{k: torch.cat([a[k], b[k]]) for k in a} for a, b in zip(batches[::2], batches[1::2])]
    config = LoraConfig(r=4, targets=["q_proj", "v_proj"], init=init, init_batches=4, eva_tau=0.95)
    trainer = pl.Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto",
                         max_steps=1, use_distributed_sampler=False, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[DeltaCallback(config), Save(out)])
    trainer.fit(RankLM(model, batches))


if __name__ == "__main__":
    main()
