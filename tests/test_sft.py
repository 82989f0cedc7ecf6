"""Instruction / chat SFT data: loss only on responses, packing without cross-example attention, errors."""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lightning_delta import DeltaCallback
from lightning_delta.data import InstructionData
from lightning_delta.data.instruction import IGNORE_INDEX, pack
from lightning_delta.tasks import BUNDLED_MINILM, CausalLanguageModeling
from lightning_helpers import trainer
from models import save_tiny

#: A tiny chat template for the BERT tokenizer of the tiny models: "role: content [SEP] " per message.
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} [SEP] {% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")

PAIRS = [{"prompt": f"what is {a} plus {b} ?", "response": f"it is {a + b}" + " surely" * b}
         for a in range(4) for b in range(3)]
CHATS = [{"messages": [{"role": "system", "content": "be brief"},
                       {"role": "user", "content": f"name colour {i}"},
                       {"role": "assistant", "content": ["red", "green", "blue"][i % 3]},
                       {"role": "user", "content": "and again"},
                       {"role": "assistant", "content": f"still {['red', 'green', 'blue'][i % 3]}"}]}
         for i in range(6)]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    from transformers import AutoTokenizer

    from transformers import LlamaConfig, LlamaForCausalLM

    path = save_tiny("llama", tmp_path_factory.mktemp("tiny") / "llama")
    # Weights drawn wider than the default (0.02): a frozen random head over 30k tokens can then
    # express a peaked next-token distribution, and LoRA alone lowers the loss visibly.
    config = LlamaConfig.from_pretrained(path)
    config.initializer_range = 0.3
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(path)
    return path


def jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return str(path)


def data_module(tmp_path, rows, tokenizer, **kwargs):
    files = {"train": jsonl(tmp_path / "train.jsonl", rows), "validation": jsonl(tmp_path / "val.jsonl", rows[:4])}
    data = InstructionData(data_files=files, tokenizer=tokenizer, **kwargs)
    data.setup("fit")
    return data


def learned_text(data, batch, row):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(data.tokenizer_source())
    labels = batch["labels"][row]
    return tokenizer.decode(labels[labels != IGNORE_INDEX])


def test_prompt_response_labels_cover_only_the_response_and_eos(llama, tmp_path):
    data = data_module(tmp_path, PAIRS, llama, batch_size=4)
    batch = next(iter(data.val_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    for row, pair in enumerate(PAIRS[:4]):
        assert learned_text(data, batch, row) == f"{pair['response']} [SEP]"
    padding = batch["attention_mask"] == 0
    assert padding.any() and (batch["labels"][padding] == IGNORE_INDEX).all()
    # the labels equal the input ids wherever they are learned
    learned = batch["labels"] != IGNORE_INDEX
    assert torch.equal(batch["labels"][learned], batch["input_ids"][learned])


def test_prompt_template_and_column_names(llama, tmp_path):
    rows = [{"q": r["prompt"], "a": r["response"]} for r in PAIRS]
    data = data_module(tmp_path, rows, llama, prompt_column="q", response_column="a",
                       prompt_template="question : {prompt} answer :", add_eos=False, batch_size=4)
    batch = next(iter(data.val_dataloader()))
    assert learned_text(data, batch, 0) == PAIRS[0]["response"]
    assert "question : what is 0 plus 0? answer :" in learned_text(data, {"labels": batch["input_ids"]}, 0)


def test_chat_labels_cover_only_the_assistant_turns(llama, tmp_path):
    data = data_module(tmp_path, CHATS, llama, batch_size=4)
    batch = next(iter(data.val_dataloader()))
    for row in range(4):
        colour = ["red", "green", "blue"][row % 3]
        assert learned_text(data, batch, row) == f"{colour} [SEP] still {colour} [SEP]"


def test_chat_template_argument_overrides_the_tokenizer(tmp_path):
    template = CHAT_TEMPLATE.replace("[SEP] ", "| ")
    data = data_module(tmp_path, CHATS, BUNDLED_MINILM, chat_template=template, batch_size=4)
    batch = next(iter(data.val_dataloader()))
    assert learned_text(data, batch, 0) == "red | still red |"


def test_a_tokenizer_without_chat_template_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="has no chat template.*chat_template="):
        data_module(tmp_path, CHATS, BUNDLED_MINILM)


@pytest.mark.parametrize(("rows", "kwargs", "message"), [
    ([{"instruction": "x", "output": "y"}], {}, r"neither a chat column 'messages'.*\['instruction', 'output'\]"),
    ([{"prompt": "x", "answer": "y"}], {}, "no column 'response' \\(response_column\\)"),
    ([{"prompt": "x", "response": "y"}], {"response_column": "output"}, "no column 'output'"),
    ([{"messages": [{"role": "user", "content": "hi"}]}], {}, "1 of 1 conversations .* have no assistant turn"),
    ([{"messages": [{"content": "hi"}]}], {}, "must be a mapping with 'role' and 'content'"),
])
def test_bad_columns_and_conversations_are_named(llama, tmp_path, rows, kwargs, message):
    with pytest.raises(ValueError, match=message):
        data_module(tmp_path, rows, llama, **kwargs)


def test_empty_split_is_named(llama, tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    files = {"train": jsonl(tmp_path / "train.jsonl", PAIRS), "validation": str(tmp_path / "empty.jsonl")}
    data = InstructionData(data_files=files, tokenizer=llama)
    with pytest.raises(ValueError, match="empty.jsonl' \\(validation\\) is empty; give it rows or leave the split out"):
        data.setup("fit")
    (tmp_path / "empty.jsonl").write_text(json.dumps({"prompt": "word " * 40, "response": "ok"}))
    data = InstructionData(data_files=files, tokenizer=llama, max_length=16, drop_long_prompts=True)
    with pytest.raises(ValueError, match="split 'validation' has no example left whose prompt fits in max_length=16"):
        data.setup("fit")


def test_prompts_longer_than_max_length_are_counted_with_the_fix(llama, tmp_path):
    rows = PAIRS[:3] + [{"prompt": "word " * 40, "response": "ok"}, {"prompt": "word " * 30, "response": "ok"}]
    with pytest.raises(ValueError, match=r"2 of 5 examples have prompts in split 'train' of max_length=16 tokens or "
                                         r"more \(the longest: 42\).*max_length=106.*drop_long_prompts=True"):
        data_module(tmp_path, rows, llama, max_length=16)
    data = data_module(tmp_path, rows, llama, max_length=16, drop_long_prompts=True)
    assert len(data.splits["train"]) == 3
    # a response that does not fit is truncated, not an error
    data = data_module(tmp_path, [{"prompt": "hi", "response": "word " * 40}], llama, max_length=16)
    assert len(data.splits["train"][0]["input_ids"]) == 16


def test_pack_restarts_positions_and_masks_every_first_label():
    rows = pack([([1, 2, 3], [-100, 2, 3]), ([4, 5], [4, 5]), ([6, 7, 8, 9], [-100, -100, 8, 9])], max_length=6)
    assert rows["input_ids"] == [[1, 2, 3, 4, 5], [6, 7, 8, 9]]
    assert rows["position_ids"] == [[0, 1, 2, 0, 1], [0, 1, 2, 3]]
    assert rows["labels"] == [[-100, 2, 3, -100, 5], [-100, -100, 8, 9]]


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("rows", [PAIRS, CHATS], ids=["pairs", "chat"])
def test_packed_rows_give_the_logits_of_each_example_run_alone(llama, tmp_path, attention, rows):
    from transformers import AutoModelForCausalLM

    packed = data_module(tmp_path, rows, llama, packing=True, max_length=64, batch_size=64)
    single = data_module(tmp_path, rows, llama, packing=False, max_length=64, batch_size=1)
    examples = [e["input_ids"] for e in single.splits["train"]]
    assert len(packed.splits["train"]) < len(examples)  # several examples share a row
    model = AutoModelForCausalLM.from_pretrained(llama, attn_implementation=attention).train()  # as in fit
    batch = next(iter(packed.train_dataloader()))
    assert set(batch) == {"input_ids", "labels", "position_ids", "use_cache"}
    with torch.no_grad():
        logits = model(**batch).logits
        checked = 0
        for row in range(len(batch["input_ids"])):
            starts = (batch["position_ids"][row] == 0).nonzero().flatten().tolist() + [batch["input_ids"].shape[1]]
            for start, end in zip(starts, starts[1:]):
                ids = batch["input_ids"][row, start:end]
                if ids.tolist() not in examples:
                    continue  # padding after the row's last example
                alone = model(input_ids=ids[None]).logits[0]
                torch.testing.assert_close(logits[row, start:end], alone, atol=1e-5, rtol=1e-5)
                # nothing learns to predict an example's first token from the previous example
                assert batch["labels"][row, start] == IGNORE_INDEX
                checked += 1
    assert checked == len(examples)


def test_packing_needs_an_attention_that_separates_examples(llama, tmp_path):
    from transformers import AutoModelForCausalLM

    files = {"train": jsonl(tmp_path / "train.jsonl", PAIRS)}
    data = InstructionData(data_files=files, tokenizer=llama, packing=True)
    backbone = AutoModelForCausalLM.from_pretrained(llama)
    backbone.config._attn_implementation = "my_kernel"
    data.trainer = SimpleNamespace(lightning_module=torch.nn.ModuleDict({"model": backbone}))
    with pytest.raises(ValueError, match="packing=True needs .*'my_kernel'.*attn_implementation='sdpa'"):
        data.setup("fit")


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_packing_refuses_deltas_that_put_tokens_in_front(llama, tmp_path, method):
    from transformers import AutoModelForCausalLM

    from lightning_delta import attach

    data = data_module(tmp_path, PAIRS, llama, packing=True)
    backbone = AutoModelForCausalLM.from_pretrained(llama)
    attach(backbone, method, num_virtual_tokens=2)
    data.trainer = SimpleNamespace(lightning_module=torch.nn.ModuleDict({"model": backbone}))
    with pytest.raises(ValueError, match=f"packing=True does not combine with \\['{method}'\\] deltas"):
        data.train_dataloader()


class LossLog(__import__("lightning.pytorch", fromlist=["Callback"]).Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_lora_sft_fit_lowers_the_loss(llama, tmp_path, packing):
    files = {"train": jsonl(tmp_path / "train.jsonl", CHATS), "validation": jsonl(tmp_path / "val.jsonl", CHATS)}
    data = InstructionData(data_files=files, packing=packing, max_length=64, batch_size=6)
    log = LossLog()
    model = CausalLanguageModeling(llama, learning_rate=5e-2, warmup_ratio=0.0)
    t = trainer(tmp_path, [DeltaCallback("lora", targets="all-linear", r=4), log], max_epochs=20)
    t.fit(model, data)
    first, last = log.losses[0], sum(log.losses[-3:]) / 3
    print(f"packing={packing}: train loss {first:.3f} -> {last:.3f} over {len(log.losses)} steps")
    assert last < 0.5 * first
    assert "val_ppl" in t.callback_metrics


ROOT = Path(__file__).resolve().parents[1]


def test_shipped_sft_config_runs_through_the_command_and_lowers_the_validation_loss(tmp_path):
    from lightning_delta.checkpoint import META_KEY
    from lightning_delta.cli import DeltaCLI

    model_dir = tmp_path / "tiny-llama"
    done = subprocess.run([sys.executable, str(ROOT / "examples/make_tiny_llama.py"), "--out", str(model_dir)],
                          capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    data_file = str(ROOT / "examples/data/sft-tiny.jsonl")
    args = ["--config", str(ROOT / "configs/sft-tiny-llama-lora.yaml"), f"--model.init_args.model={model_dir}",
            f"--data.init_args.data_files={json.dumps({'train': data_file, 'validation': data_file})}",
            f"--trainer.default_root_dir={tmp_path}", "--trainer.enable_progress_bar=false"]
    before = DeltaCLI(args=["validate", *args]).trainer.callback_metrics["val_loss"].item()
    after = DeltaCLI(args=["fit", *args, "--trainer.max_epochs=10"]).trainer.callback_metrics["val_loss"].item()
    print(f"sft config: val_loss {before:.3f} -> {after:.3f}")
    assert after < 0.6 * before
    (checkpoint,) = tmp_path.glob("lightning_logs/version_*/checkpoints/*.ckpt")
    saved = torch.load(checkpoint, weights_only=True)
    assert saved["state_dict"] and all(".lora." in k for k in saved["state_dict"])
    assert saved[META_KEY]["specs"][0]["method"] == "lora"
