"""Nothing unsafe is loaded: configs cannot run code, pickles are refused, files read weights-only."""

from pathlib import Path

import pytest
import torch

from lightning_delta import CheckpointReadError, load_delta
from lightning_delta.cli import main
from models import PlainNet

QUICKSTART = (Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml").read_text()


@pytest.mark.parametrize(
    "payload",
    [
        "seed_everything: !!python/object/apply:os.system ['touch {marker}']\n",
        "model:\n  class_path: os.system\n  init_args: {{command: 'touch {marker}'}}\n",
        "data:\n  class_path: subprocess.call\n  init_args: {{args: ['touch', '{marker}']}}\n",
    ],
)
def test_config_files_cannot_run_code(tmp_path, payload):
    marker = tmp_path / "pwned"
    config = tmp_path / "evil.yaml"
    config.write_text(QUICKSTART + payload.format(marker=marker))
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(config), "--print_config"])
    assert exit_.value.code != 0
    assert not marker.exists()


def test_a_pickle_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            import os

            return os.system, (f"touch {marker}",)

    torch.save({"state_dict": {}, "x": Exploit()}, tmp_path / "evil.ckpt")
    with pytest.raises(CheckpointReadError, match="refuses to unpickle.*weights_only=False"):
        load_delta(PlainNet(), tmp_path / "evil.ckpt")
    assert not marker.exists()

