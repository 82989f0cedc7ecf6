"""The lightning-delta command: the offline quickstart (shortened) and every shipped config on tiny models."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lightning_delta.checkpoint import META_KEY
from lightning_delta.cli import main, switch_method
from lightning_delta.methods import METHODS, default_lr
from models import save_tiny

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
QUICKSTART = str(CONFIGS / "quickstart.yaml")
SHORT = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=3", "--trainer.limit_val_batches=1",
         "--trainer.enable_progress_bar=false", "--trainer.log_every_n_steps=1"]


def print_config(capsys, *args) -> dict:
    with pytest.raises(SystemExit) as exit_:
        main(["fit", *args, "--print_config"])
    assert exit_.value.code == 0
    return yaml.safe_load(capsys.readouterr().out)


def test_print_config_shows_the_typed_delta_section(capsys):
    config = print_config(capsys, "--config", QUICKSTART)
    method = config["delta"]["method"]
    assert method["class_path"] == "lightning_delta.LoraConfig"
    assert method["init_args"]["r"] == 8 and method["init_args"]["targets"] == ["query", "value"]
    assert config["delta"]["trainable"] == ["classifier"]


def test_every_hyperparameter_is_settable_from_the_command_line(capsys):
    config = print_config(capsys, "--config", QUICKSTART, "--delta.method.init_args.r=4",
                          "--delta.method.init_args.alpha=8", "--delta.method.init_args.rslora=true",
                          "--delta.method.init_args.dropout=0.1")
    assert {k: config["delta"]["method"]["init_args"][k] for k in ("r", "alpha", "rslora", "dropout")} == \
        {"r": 4, "alpha": 8.0, "rslora": True, "dropout": 0.1}
    other = print_config(capsys, "--config", QUICKSTART, "--delta.method=lightning_delta.BitFitConfig")
    assert other["delta"]["method"]["class_path"] == "lightning_delta.BitFitConfig"


@pytest.mark.parametrize("bad", ["--delta.method.init_args.rank=4", "--delta.trainabel=[classifier]"])
def test_misspelled_keys_are_named(capsys, bad):
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", QUICKSTART, bad, "--print_config"])
    assert exit_.value.code != 0
    assert bad.split("=")[0].rsplit(".", 1)[-1] in capsys.readouterr().err


def test_quickstart_fit_trains_the_delta_and_writes_a_delta_checkpoint(tmp_path):
    run = ["fit", "--config", QUICKSTART, f"--trainer.default_root_dir={tmp_path}", *SHORT,
           "--data.init_args.num_train=96", "--data.init_args.num_val=32"]
    main(run)
    (ckpt_path,) = tmp_path.glob("lightning_logs/version_0/checkpoints/best-*.ckpt")
    ckpt = torch.load(ckpt_path, weights_only=True)
    keys = set(ckpt["state_dict"])
    assert keys and all(".lora." in k or ".classifier." in k for k in keys)
    lora_b = [v for k, v in ckpt["state_dict"].items() if k.endswith("lora.B")]
    assert len(lora_b) == 12 and all(b.abs().sum() > 0 for b in lora_b)  # B starts at zero: it was trained
    assert ckpt[META_KEY]["specs"][0]["method"] == "lora"
    assert (tmp_path / "lightning_logs/version_0/config.yaml").is_file()
    assert list(tmp_path.glob("lightning_logs/version_0/events.out.tfevents.*"))
    main(run)  # a second run into the same folder does not trip over the saved config


TINY_FAMILY = {"roberta-base": "bert", "bert-base-uncased": "bert", "gpt2": "gpt2", "t5-small": "t5",
               "meta-llama/Llama-3.2-1B": "llama"}
MULTI_PROCESS = {"multinode-llama-fsdp2.yaml"}  # run in a subprocess below: Lightning relaunches the command
OFFLINE_CONFIGS = {"quickstart.yaml", "sft-tiny-llama-lora.yaml"}  # the latter: tests/test_sft.py
NETWORK_CONFIGS = sorted(p.name for p in CONFIGS.glob("*.yaml") if p.name not in OFFLINE_CONFIGS)


def tiny_overrides(config: dict, tmp_path) -> list[str]:
    """Command-line overrides that swap a config's hub model and dataset for tiny local ones."""
    data_args = config["data"]["init_args"]
    model_dir = save_tiny(TINY_FAMILY[config["model"]["init_args"]["model"]], tmp_path / "model")
    columns = [c for c in (data_args.get("text_column"), data_args.get("text_pair_column"),
                           data_args.get("target_column")) if c]
    rows = [{**{c: f"example {i} of {c}" for c in columns}, "label": i % 2} for i in range(8)]
    data_file = tmp_path / "data.jsonl"
    data_file.write_text("\n".join(json.dumps(r) for r in rows))
    files = json.dumps({"train": str(data_file), "validation": str(data_file)})
    return [f"--model.init_args.model={model_dir}", "--data.init_args.dataset=null",
            "--data.init_args.dataset_config=null", f"--data.init_args.data_files={files}",
            "--data.init_args.batch_size=4", "--data.init_args.max_length=16", f"--trainer.default_root_dir={tmp_path}",
            "--trainer.val_check_interval=1.0", "--trainer.limit_val_batches=1", *SHORT]


@pytest.mark.parametrize("name", sorted(set(NETWORK_CONFIGS) - MULTI_PROCESS))
def test_shipped_config_parses_and_runs_on_a_tiny_local_model(capsys, tmp_path, name):
    path = str(CONFIGS / name)
    config = print_config(capsys, "--config", path)
    main(["fit", "--config", path, *tiny_overrides(config, tmp_path)])
    state = torch.load(sorted(tmp_path.glob("**/*.ckpt"))[0], weights_only=True)["state_dict"]
    method = config["delta"]["method"]["class_path"].rsplit(".", 1)[-1]
    assert state and all((".lora." in k if method == "LoraConfig" else ".bitfit." in k or "classifier" in k)
                         or k.startswith("model.classifier.") for k in state)


def test_multinode_config_runs_fsdp2_on_two_cpu_processes(capsys, tmp_path):
    path = str(CONFIGS / "multinode-llama-fsdp2.yaml")
    config = print_config(capsys, "--config", path)
    assert config["trainer"]["num_nodes"] == 2
    command = [sys.executable, "-m", "lightning_delta.cli", "fit", "--config", path, *tiny_overrides(config, tmp_path),
               "--trainer.num_nodes=1", "--trainer.devices=2", "--trainer.accelerator=cpu",
               "--trainer.precision=32-true", "--trainer.strategy.init_args.data_parallel_size=2",
               "--trainer.callbacks.init_args.every_n_train_steps=2"]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                          timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    checkpoints = sorted(tmp_path.glob("**/*.ckpt"))
    assert checkpoints, done.stderr[-2000:]
    state = torch.load(checkpoints[0], weights_only=True)["state_dict"]
    layers = [n for n in state if n.endswith("lora.A")]
    assert len(layers) == 2 * 7 and all(".lora." in k for k in state)  # all-linear: 7 projections a layer


def test_optimizer_group_arguments_reach_the_optimizer_from_the_command_line(tmp_path):
    from lightning_delta.cli import DeltaCLI

    model_dir = save_tiny("gpt2", tmp_path / "model")
    data_file = tmp_path / "train.jsonl"
    data_file.write_text("\n".join(json.dumps({"text": f"line number {i}"}) for i in range(4)))
    config = {
        "delta": {"method": [{"class_path": "lightning_delta.LoraConfig", "init_args": {"r": 2}},
                             {"class_path": "lightning_delta.PromptConfig", "init_args": {"num_virtual_tokens": 2}}]},
        "model": {"class_path": "lightning_delta.tasks.CausalLanguageModeling",
                  "init_args": {"model": model_dir, "learning_rate": 1e-3, "weight_decay": 0.1}},
        "data": {"class_path": "lightning_delta.data.TextData",
                 "init_args": {"data_files": {"train": str(data_file)}, "batch_size": 2, "max_length": 8}},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = DeltaCLI(args=["fit", "--config", str(path), "--model.init_args.lr_by_method={prompt: 0.03}",
                         "--model.init_args.loraplus_lr_ratio=4", f"--trainer.default_root_dir={tmp_path}",
                         "--trainer.max_steps=1", "--trainer.enable_progress_bar=false", "--trainer.logger=false",
                         "--trainer.enable_checkpointing=false"])
    groups = {(g["initial_lr"], g["weight_decay"]): g["params"] for g in cli.trainer.optimizers[0].param_groups}
    backbone = cli.model.model
    (prompt,) = groups[(0.03, 0.0)]
    assert prompt is backbone.prompt.embedding
    lora = backbone.transformer.h[0].attn.c_attn.lora
    assert any(p is lora.A for p in groups[(1e-3, 0.1)]) and any(p is lora.B for p in groups[(4e-3, 0.1)])



def own_rate(method: str) -> float:
    return default_lr(METHODS[method])


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory):
    return save_tiny("bert", tmp_path_factory.mktemp("tiny") / "bert")


def fit_one_step(tmp_path, model_dir, *args: str):
    """``lightning-delta fit`` of the quickstart config on a tiny BERT for one step, as the command parses it."""
    from lightning_delta.cli import DeltaCLI

    return DeltaCLI(args=switch_method([
        "fit", "--config", QUICKSTART, *args, f"--model.init_args.model={model_dir}",
        f"--trainer.default_root_dir={tmp_path}", "--trainer.max_steps=1", "--trainer.enable_progress_bar=false",
        "--trainer.logger=false", "--trainer.limit_val_batches=0", "--data.init_args.num_train=8",
        "--data.init_args.num_val=4", "--data.init_args.batch_size=4"]))


@pytest.mark.parametrize("method", sorted(set(METHODS) - {"peft", "new_tokens"}))  # new_tokens: needs its tokens
def test_each_method_trains_at_its_own_rate_when_the_config_names_none(tmp_path, tiny_bert_dir, method):
    """The quickstart config names no learning rate: a method switched in on the command line trains, with the
    head, at that method's own rate, which --print_config shows."""
    cli = fit_one_step(tmp_path, tiny_bert_dir, f"--delta.method={method}")
    assert cli.config.fit.delta.method.init_args.lr == own_rate(method)
    assert {g["initial_lr"] for g in cli.trainer.optimizers[0].param_groups} == {own_rate(method)}


def test_a_named_learning_rate_wins_over_the_methods_own(tmp_path, tiny_bert_dir):
    cli = fit_one_step(tmp_path, tiny_bert_dir, "--delta.method=prompt", "--model.init_args.learning_rate=0.004")
    assert {g["initial_lr"] for g in cli.trainer.optimizers[0].param_groups} == {0.004}
    cli = fit_one_step(tmp_path, tiny_bert_dir, "--delta.method=prompt", "--delta.method.init_args.lr=0.005")
    assert {g["initial_lr"] for g in cli.trainer.optimizers[0].param_groups} == {0.005}


def test_switching_from_a_config_that_names_a_rate_gives_the_new_methods_own(capsys):
    config = print_config(capsys, "--config", str(CONFIGS / "sst2-roberta-lora.yaml"), "--delta.method=prompt")
    assert config["delta"]["method"]["init_args"]["lr"] == own_rate("prompt")
