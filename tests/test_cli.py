"""The lightning-delta command on the offline quickstart config, shortened."""

from pathlib import Path

import pytest
import torch

from lightning_delta.checkpoint import META_KEY
from lightning_delta.cli import main

QUICKSTART = str(Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml")


def short_run(root) -> list[str]:
    return [
        "fit", "--config", QUICKSTART, f"--trainer.default_root_dir={root}", "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=3", "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false",
        "--data.init_args.num_train=96", "--data.init_args.num_val=32",
    ]


def test_print_config_shows_the_delta_callback(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", QUICKSTART, "--print_config"])
    assert exit_.value.code == 0
    printed = capsys.readouterr().out
    assert "lightning_delta.DeltaCallback" in printed and "method: lora" in printed


def test_fit_trains_the_delta_and_writes_a_delta_checkpoint(tmp_path):
    main(short_run(tmp_path))
    (ckpt_path,) = tmp_path.glob("lightning_logs/version_0/checkpoints/*.ckpt")
    ckpt = torch.load(ckpt_path, weights_only=True)
    keys = set(ckpt["state_dict"])
    assert keys and all(".lora." in k or ".classifier." in k for k in keys)
    lora_b = [v for k, v in ckpt["state_dict"].items() if k.endswith("lora.B")]
    assert len(lora_b) == 12 and all(b.abs().sum() > 0 for b in lora_b)  # B starts at zero: it was trained
    assert ckpt[META_KEY]["specs"][0]["method"] == "lora"
    assert (tmp_path / "lightning_logs/version_0/config.yaml").is_file()
    assert list(tmp_path.glob("lightning_logs/version_0/events.out.tfevents.*"))
    # a second run into the same folder does not trip over the saved config
    main(short_run(tmp_path))
