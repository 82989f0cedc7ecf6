"""PEFT-format export: PeftModel.from_pretrained(base, dir) gives our attached model's outputs."""

import copy

import peft
import pytest
import torch

from lightning_delta import DeltaConfigError, DeltaModel, attach, load_delta
from lightning_delta.peft_format import export_peft
from models import FAMILIES, family_inputs, family_output, tiny_bert, tiny_gpt2

CASES = [("lora", "bert", {"r": 4, "rslora": True}), ("lora", "gpt2", {"r": 4}), ("dora", "bert", {"r": 4}),
         ("ia3", "bert", {}), ("ia3", "llama", {}), ("prompt", "gpt2", {"num_virtual_tokens": 3}),
         ("prompt", "t5", {"num_virtual_tokens": 3}), ("prefix", "gpt2", {"num_virtual_tokens": 3}),
         ("prefix", "llama", {"num_virtual_tokens": 3}), ("prefix", "t5", {"num_virtual_tokens": 3})]


@pytest.mark.parametrize(("method", "family", "hparams"), CASES, ids=[f"{m}-{f}" for m, f, _ in CASES])
def test_peft_loads_the_export_and_gives_the_same_outputs(tmp_path, method, family, hparams):
    base = FAMILIES[family]().eval()
    model = copy.deepcopy(base)
    handle = attach(model, method, **hparams)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in handle.delta_parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.2)
    export_peft(model, tmp_path / "adapter")
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "adapter")).eval()
    inputs = family_inputs(family)
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    ours = family_output(model, inputs)
    plain = family_output(base, inputs)
    assert ours.shape != plain.shape or not torch.allclose(ours, plain, rtol=0, atol=1e-5)  # the delta matters
    torch.testing.assert_close(family_output(loaded, inputs), ours, rtol=1e-5, atol=1e-5)


def test_methods_without_a_peft_equivalent_are_refused(tmp_path):
    model = tiny_bert()
    attach(model, "adapter")
    with pytest.raises(DeltaConfigError, match="PEFT has no equivalent of 'adapter'"):
        export_peft(model, tmp_path)


def test_trainable_backbone_modules_are_exported_as_modules_to_save(tmp_path):
    base = tiny_gpt2().eval()
    model = copy.deepcopy(base)
    attach(model, "lora").freeze_backbone(trainable="ln_f")
    with torch.no_grad():
        model.transformer.ln_f.weight.mul_(1.5)
        for d in DeltaModel(model).deltas():
            d.module.B.add_(0.2)
    export_peft(model, tmp_path)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    inputs = family_inputs("gpt2")
    torch.testing.assert_close(family_output(loaded, inputs), family_output(model, inputs), rtol=1e-5, atol=1e-5)


# -- import: a PEFT adapter folder attached as native deltas -----------------------------------------
IMPORTS = [
    ("bert", lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS")),
    ("gpt2", lambda: peft.LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True, use_rslora=True)),
    ("llama", lambda: peft.LoraConfig(r=2, target_modules=["embed_tokens", "q_proj", "down_proj"])),
    ("llama", lambda: peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], use_dora=True)),
    ("bert", lambda: peft.IA3Config(target_modules=["key", "output.dense"], feedforward_modules=["output.dense"])),
    ("gpt2", lambda: peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)),
    ("llama", lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)),
    ("bert", lambda: peft.VeraConfig(r=8, target_modules=["query", "value"])),
    ("bert", lambda: peft.LoHaConfig(r=4, alpha=6, target_modules=["query", "value"], task_type="SEQ_CLS")),
    ("llama", lambda: peft.LoKrConfig(r=2, alpha=3, target_modules=["q_proj", "v_proj"])),
    ("llama", lambda: peft.OFTConfig(r=0, oft_block_size=8, target_modules=["q_proj", "v_proj"])),
]


@pytest.mark.parametrize(("family", "make"), IMPORTS, ids=["lora-bert-cls", "lora-gpt2-conv1d", "lora-llama-embed",
                                                            "dora-llama", "ia3-bert", "prompt-gpt2", "prefix-llama",
                                                            "vera-bert", "loha-bert-cls", "lokr-llama", "oft-llama"])
def test_imported_peft_adapter_gives_peft_outputs(tmp_path, family, make):
    from lightning_delta.peft_format import import_peft

    base = FAMILIES[family]().eval()
    trained = peft.get_peft_model(copy.deepcopy(base), make())
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # move every trainable tensor (adapter and head) away from its init
        for p in trained.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen))
    trained.save_pretrained(str(tmp_path / "adapter"))
    reference = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "adapter")).eval()

    model = copy.deepcopy(base)
    handle = import_peft(model, tmp_path / "adapter")
    inputs = family_inputs(family)
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    expected, plain = family_output(reference, inputs), family_output(base, inputs)
    assert expected.shape != plain.shape or not torch.allclose(plain, expected, atol=1e-4)  # the adapter matters
    torch.testing.assert_close(family_output(model, inputs), expected, rtol=1e-5, atol=1e-5)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters()
                         if any(n.startswith(d.path + ".") for d in handle.deltas())
                         or (make().task_type == "SEQ_CLS" and n.startswith("classifier."))}
    # and back out: our export of the imported delta loads in PEFT to the same outputs
    if not any(m in handle.configs for m in ("prefix",)) and family != "bert":
        export_peft(model, tmp_path / "again")
        again = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "again")).eval()
        torch.testing.assert_close(family_output(again, inputs), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make", [lambda: peft.HRAConfig(r=2, target_modules=["query", "value"], task_type="SEQ_CLS"),
                                  lambda: peft.AdaLoraConfig(init_r=4, target_r=2, total_step=10,
                                                             target_modules=["query"])],
                         ids=["hra-cls", "adalora"])
def test_other_peft_types_import_through_the_peft_backend(tmp_path, make):
    from lightning_delta.peft_format import import_peft

    base = tiny_bert().eval()
    trained = peft.get_peft_model(copy.deepcopy(base), make())
    with torch.no_grad():
        for p in trained.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(0)) * 0.5)
    trained.save_pretrained(str(tmp_path))
    reference = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    model = copy.deepcopy(base)
    handle = import_peft(model, tmp_path)
    assert handle.configs[next(iter(handle.configs))].method == "peft"
    inputs = family_inputs("bert")
    expected = family_output(reference, inputs)
    assert not torch.allclose(family_output(base, inputs), expected, atol=1e-5)
    torch.testing.assert_close(family_output(model, inputs), expected, rtol=1e-5, atol=1e-5)
    heads = {n for n, p in model.named_parameters() if p.requires_grad and n.startswith("classifier.")}
    assert bool(heads) == (make().task_type == "SEQ_CLS")
    # and the delta-only state round-trips like a native delta's
    fresh = copy.deepcopy(base)
    import_peft(fresh, tmp_path)
    DeltaModel(fresh).load_delta_state_dict(handle.delta_state_dict())
    torch.testing.assert_close(family_output(fresh, inputs), expected, rtol=1e-5, atol=1e-5)


def test_import_refuses_what_it_cannot_represent(tmp_path):
    from lightning_delta import CheckpointReadError
    from lightning_delta.peft_format import import_peft

    base = tiny_bert()
    for folder, config in [("pattern", peft.LoraConfig(target_modules=["query", "value"], rank_pattern={"query": 2}))]:
        peft.get_peft_model(copy.deepcopy(base), config).save_pretrained(str(tmp_path / folder))
    model = copy.deepcopy(base)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    peft.get_peft_model(copy.deepcopy(base), peft.LoHaConfig(target_modules=["query"], rank_dropout=0.1)
                        ).save_pretrained(str(tmp_path / "dropout"))
    with pytest.raises(DeltaConfigError, match="uses {'rank_dropout': 0.1}.*'loha' does not have"):
        import_peft(model, tmp_path / "dropout")
    with pytest.raises(DeltaConfigError, match="rank_pattern"):
        import_peft(model, tmp_path / "pattern")
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "adapter_config.json").write_text("{}")
    torch.save({}, tmp_path / "pickled" / "adapter_model.bin")
    with pytest.raises(CheckpointReadError, match="pickled adapter_model.bin"):
        import_peft(model, tmp_path / "pickled")
    assert model.state_dict().keys() == before.keys() and all(torch.equal(before[k], v)
                                                               for k, v in model.state_dict().items())


def test_load_delta_reads_peft_folders_into_a_module_holding_the_backbone(tmp_path):
    base = tiny_bert().eval()
    trained = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, target_modules=["query"]))
    with torch.no_grad():
        for p in trained.parameters():
            if p.requires_grad:
                p.add_(0.5)
    trained.save_pretrained(str(tmp_path))
    holder = torch.nn.Module()
    holder.model = copy.deepcopy(base)
    handle = DeltaModel(load_delta(holder, tmp_path, module="model"))
    assert handle.model is holder and list(DeltaModel(holder.model).configs) == ["lora"]
    inputs = family_inputs("bert")
    torch.testing.assert_close(holder.model(**inputs).logits, trained.eval()(**inputs).logits, rtol=1e-5, atol=1e-5)


class LocalHub:
    """Stands in for huggingface_hub.HfApi offline: uploads land in a local directory."""

    def __init__(self, root):
        self.root, self.created = root, []

    def create_repo(self, repo_id, private=False, exist_ok=False, repo_type=None):
        self.created.append((repo_id, private, exist_ok))

    def upload_folder(self, repo_id, folder_path, commit_message, repo_type=None):
        import shutil

        shutil.copytree(folder_path, self.root / repo_id, dirs_exist_ok=True)
        return f"local://{repo_id}"


def test_push_to_hub_uploads_a_loadable_adapter_with_a_model_card(tmp_path):
    from lightning_delta.hub import push_to_hub

    base = tiny_bert().eval()
    model = copy.deepcopy(base)
    handle = attach(model, "lora", r=4).freeze_backbone(trainable="classifier")
    with torch.no_grad():
        for d in handle.deltas():
            d.module.B.add_(0.3)
    hub = LocalHub(tmp_path)
    url = push_to_hub(model, "me/tiny-lora", metrics={"val_acc": 0.875}, private=True, api=hub)
    assert url == "local://me/tiny-lora" and hub.created == [("me/tiny-lora", True, True)]
    folder = tmp_path / "me" / "tiny-lora"
    card = (folder / "README.md").read_text()
    summary = handle.summary()
    for expected in ("library_name: peft", "- lora", "# me/tiny-lora", "`query`, `value`", "r=4",
                     f"{summary.trainable:,} of {summary.total:,}", "| val_acc | 0.8750 |",
                     "PeftModel.from_pretrained(base_model, 'me/tiny-lora')"):
        assert expected in card, expected
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(folder)).eval()
    inputs = family_inputs("bert")
    torch.testing.assert_close(family_output(loaded, inputs), family_output(model, inputs), rtol=1e-5, atol=1e-5)


def test_push_to_hub_refuses_before_uploading(tmp_path):
    from lightning_delta.hub import push_to_hub

    model = tiny_bert()
    attach(model, "adapter")
    hub = LocalHub(tmp_path)
    with pytest.raises(DeltaConfigError, match="PEFT has no equivalent of 'adapter'"):
        push_to_hub(model, "me/x", api=hub)
    assert hub.created == [] and not (tmp_path / "me").exists()
