"""Several named deltas on one backbone: switching, per-row selection, separate files, combining, compile."""

import copy
import dataclasses

import pytest
import torch
from torch import nn

from lightning_delta import (
    DeltaConfigError,
    DeltaModel,
    DoraConfig,
    IA3Config,
    LohaConfig,
    LokrConfig,
    LoraConfig,
    VeraConfig,
    attach,
    load_delta,
    save_delta,
)
from models import family_inputs, tiny_bert, tiny_llama


def randomize(handle, names=None, seed=5):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for d in handle.deltas():
            if names is None or d.name in names:
                for p in d.module.parameters():
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.3 + (1.0 if d.module.config.method == "ia3" else 0))
    return handle


def three_tasks(model):
    """LoRA ``a`` and ``b`` on query/value, IA3 ``c`` on keys: perturbed so each changes the outputs.

    (Deltas on one target compose in attach order, and an IA3 scale does not commute with a LoRA sum:
    keeping ``c`` apart lets the tasks load back in any order.)
    """
    handle = attach(model, [LoraConfig(r=2, name="a"), LoraConfig(r=4, name="b"), IA3Config(name="c", targets="key")])
    return randomize(handle.freeze_backbone())


def only(model, name):
    """A copy of ``model`` with delta ``name`` alone attached (``None``: the bare backbone)."""
    alone = copy.deepcopy(model)
    for other in list(DeltaModel(alone).configs):
        if other != name:
            DeltaModel(alone).detach(other)
    return alone


def logits(model, batch=4):
    return model(**family_inputs("bert", batch=batch)).logits


def test_set_active_applies_and_trains_only_the_chosen_delta():
    model = tiny_bert().eval()
    handle = three_tasks(model)
    handle.set_active("b")
    assert handle.active == ["b"]
    torch.testing.assert_close(logits(model), logits(only(model, "b")), rtol=0, atol=0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".b." in n for n in trainable)

    before = {k: v.clone() for k, v in handle.delta_state_dict().items()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    logits(model).sum().backward()
    optimizer.step()
    after = handle.delta_state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".b." in k for k in changed)

    handle.set_active(None)
    assert handle.active == ["a", "b", "c"]
    with pytest.raises(DeltaConfigError, match="no delta named \\['z'\\]"):
        handle.set_active("z")


def test_each_task_saves_and_loads_separately(tmp_path):
    model = tiny_bert().eval()
    handle = three_tasks(model)
    both = logits(model)
    for name in ("a", "b", "c"):
        save_delta(model, tmp_path / name, names=name)
    from safetensors.torch import load_file

    keys = load_file(str(tmp_path / "a" / "delta.safetensors"))
    assert keys and all(".a." in k for k in keys)

    fresh = tiny_bert().eval()
    fresh.load_state_dict(only(model, None).state_dict())
    for name in ("c", "a"):  # any order, one at a time
        load_delta(fresh, tmp_path / name)
    handle.set_active(["a", "c"])
    torch.testing.assert_close(logits(fresh), logits(model), rtol=1e-6, atol=1e-6)
    handle.set_active(None)
    load_delta(fresh, tmp_path / "b")
    assert set(DeltaModel(fresh).configs) == {"a", "b", "c"}
    torch.testing.assert_close(logits(fresh), both, rtol=1e-6, atol=1e-6)
    DeltaModel(fresh).set_active("a")
    handle.set_active("a")
    torch.testing.assert_close(logits(fresh), logits(model), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("rows", [["a", "b", None, "c"], ["c", "c", "a", None], [None, None, None, None]])
def test_mixed_batch_equals_each_row_with_its_own_delta(rows):
    model = tiny_bert().eval()
    handle = three_tasks(model)
    inputs = family_inputs("bert", batch=4)
    before = logits(model)
    with handle.mixed_batch(rows):
        mixed = model(**inputs).logits
    for i, name in enumerate(rows):
        alone = only(model, name)
        row = {k: v[i : i + 1] for k, v in inputs.items()}
        torch.testing.assert_close(mixed[i : i + 1], alone(**row).logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logits(model), before, rtol=0, atol=0)  # every delta applies again
    assert all(d.module.row_mask is None for d in handle.deltas())


def test_mixed_batch_works_for_a_causal_lm_with_lora_on_every_linear():
    model = tiny_llama().eval()
    handle = randomize(attach(model, [LoraConfig(r=2, targets="all-linear", name="x"),
                                      LoraConfig(r=2, targets="all-linear", name="y")]))
    inputs = family_inputs("llama", batch=3)
    with handle.mixed_batch(["y", None, "x"]):
        mixed = model(**inputs).logits
    for i, name in enumerate(["y", None, "x"]):
        torch.testing.assert_close(mixed[i], only(model, name)(input_ids=inputs["input_ids"][i : i + 1]).logits[0],
                                   rtol=1e-5, atol=1e-5)


def test_mixed_batch_refuses_what_it_cannot_do():
    model = tiny_bert().eval()
    handle = three_tasks(model)
    with pytest.raises(DeltaConfigError, match="no delta named \\['z'\\]"):
        with handle.mixed_batch(["a", "z"]):
            pass
    with pytest.raises(DeltaConfigError, match="one delta name \\(or None\\) per row"):
        with handle.mixed_batch(["a", "b"]):
            logits(model, batch=4)
    handle.attach("dora", name="dora", r=2)
    with pytest.raises(DeltaConfigError, match="\\['dora'\\] would apply to every row"):
        with handle.mixed_batch(["a", "b", "c", None]):
            pass
    handle.detach("dora")
    handle.attach("bitfit", name="offsets")
    with pytest.raises(DeltaConfigError, match="\\['offsets'\\] would apply to every row"):
        with handle.mixed_batch(["a", "b", "c", None]):
            pass
    handle.set_active(["a", "b", "c"])  # without the BitFit delta: fine
    with handle.mixed_batch(["a", "b", "c", None]):
        logits(model)
    handle.merge("a")
    with pytest.raises(DeltaConfigError, match="\\['a'\\] would apply to every row.*unmerge"):
        with handle.mixed_batch(["a", "b", "c", None]):
            pass


# -- combining LoRAs ------------------------------------------------------------------------------
def linear_model_with(*loras):
    """One Linear(2, 2) without bias, zero weight, and LoRAs given as (name, A, B) with alpha = r (scale 1)."""
    model = nn.Sequential(nn.Linear(2, 2, bias=False))
    nn.init.zeros_(model[0].weight)
    handle = attach(model, [LoraConfig(r=a.shape[0], alpha=float(a.shape[0]), targets="0", name=n)
                            for n, a, _ in loras])
    with torch.no_grad():
        for n, a, b in loras:
            model.get_submodule(f"0.{n}").A.copy_(a)
            model.get_submodule(f"0.{n}").B.copy_(b)
    return model, handle


def effective(model, name):
    """The combined delta's update ``s * B @ A``."""
    return model.get_submodule(f"0.{name}").delta_weight(model[0])


W1 = torch.tensor([[4.0, -1.0], [0.5, -3.0]])
W2 = torch.tensor([[-2.0, 2.0], [1.0, 0.25]])


def two_updates():
    eye = torch.eye(2)
    return linear_model_with(("t1", eye, W1), ("t2", eye, W2))


def test_cat_and_svd_are_exact_weighted_sums():
    model, handle = two_updates()
    handle.combine(["t1", "t2"], [1.0, 0.5], name="cat", how="cat")
    handle.combine(["t1", "t2"], [1.0, 0.5], name="svd", how="svd", rank=2)
    expected = torch.tensor([[3.0, 0.0], [1.0, -2.875]])  # W1 + 0.5 * W2, by hand
    torch.testing.assert_close(effective(model, "cat"), expected)
    torch.testing.assert_close(effective(model, "svd"), expected, rtol=1e-5, atol=1e-5)
    assert handle.configs["cat"].r == 4 and handle.configs["svd"].r == 2
    # the combination computes what it says in a forward too
    handle.set_active("cat")
    x = torch.tensor([[1.0, 2.0]])
    torch.testing.assert_close(model(x), x @ expected.T)


def test_linear_sums_the_factors():
    a1, b1 = torch.tensor([[1.0, 0.0]]), torch.tensor([[2.0], [0.0]])
    a2, b2 = torch.tensor([[0.0, 1.0]]), torch.tensor([[0.0], [3.0]])
    model, handle = linear_model_with(("u", a1, b1), ("v", a2, b2))
    handle.combine(["u", "v"], [4.0, 1.0], name="lin", how="linear")
    # A = 2 * a1 + 1 * a2 = [2, 1]; B = 2 * b1 + 1 * b2 = [4, 3]^T; update = B @ A
    torch.testing.assert_close(effective(model, "lin"), torch.tensor([[8.0, 4.0], [6.0, 3.0]]))


def test_ties_trims_elects_signs_and_averages_agreeing_entries():
    model, handle = two_updates()
    handle.combine(["t1", "t2"], [1.0, 0.5], name="ties", how="ties", density=0.5, rank=2)
    # trimmed: W1 -> [[4, 0], [0, -3]], W2 -> [[-2, 2], [0, 0]]; signs of the sum: [[+, +], [+, -]];
    # agreeing weighted entries: (0,0) 4 (W2's -1 disagrees), (0,1) 0.5*2, (1,0) none, (1,1) -3
    torch.testing.assert_close(effective(model, "ties"), torch.tensor([[4.0, 1.0], [0.0, -3.0]]),
                               rtol=1e-5, atol=1e-5)


def test_dare_drops_and_rescales_and_is_seeded():
    model, handle = two_updates()
    handle.combine(["t1", "t2"], [1.0, 0.5], name="all", how="dare", density=1.0, rank=2)
    torch.testing.assert_close(effective(model, "all"), W1 + 0.5 * W2, rtol=1e-5, atol=1e-5)
    big = torch.randn(8, 8, generator=torch.Generator().manual_seed(0))
    model = nn.Sequential(nn.Linear(8, 8, bias=False))
    handle = attach(model, LoraConfig(r=8, alpha=8.0, targets="0", name="t"))
    with torch.no_grad():
        model.get_submodule("0.t").A.copy_(torch.eye(8))
        model.get_submodule("0.t").B.copy_(big)
    handle.combine(["t"], name="d1", how="dare", density=0.25, rank=8, seed=3)
    handle.combine(["t"], name="d2", how="dare", density=0.25, rank=8, seed=3)
    got = effective(model, "d1")
    kept = got.abs() > 1e-4
    assert 0 < kept.sum() < 64
    torch.testing.assert_close(got[kept], 4 * big[kept], rtol=1e-4, atol=1e-4)  # rescaled by 1 / density
    torch.testing.assert_close(effective(model, "d2"), got)


def test_combine_refuses_bad_input_and_leaves_the_model_alone():
    model, handle = linear_model_with(("p", torch.eye(2), W1), ("q", torch.eye(2)[:1], W2[:, :1]))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for kwargs, message in [
        ({"names": ["p", "q"], "how": "linear"}, "needs equal ranks"),
        ({"names": ["p", "q"], "how": "mean"}, "how='mean' is not one of"),
        ({"names": ["p", "q"], "weights": [1.0]}, "one weight per delta"),
        ({"names": ["p", "zz"]}, "no delta named 'zz'"),
        ({"names": ["p", "q"], "how": "ties", "density": 0.0}, "density=0.0 must be in"),
        ({"names": ["p"], "name": "q"}, "'q' is already attached"),
    ]:
        kwargs.setdefault("name", "out")
        with pytest.raises(DeltaConfigError, match=message):
            handle.combine(**kwargs)
        assert list(handle.configs) == ["p", "q"]
        assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def merged_update(model, name):
    """What merging delta ``name`` alone adds to the target's weight: a reference outside combine's code."""
    alone = only(model, name)
    before = alone[0].weight.detach().clone()
    DeltaModel(alone).merge(name)
    return alone[0].weight.detach() - before


@pytest.mark.parametrize("how", ["svd", "ties", "dare"])
def test_other_weight_updates_combine_with_lora_by_their_merged_updates(how):
    """LoHa, LoKr, VeRA and LoRA on one target: the combination is the SVD of the weighted sum of what each
    would merge (full rank, density 1: nothing trimmed or dropped)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5, bias=False))
    methods = [LoraConfig(r=2, name="lora"), LohaConfig(r=2, name="loha"), LokrConfig(r=2, name="lokr"),
               VeraConfig(r=4, name="vera")]
    handle = attach(model, [dataclasses.replace(c, targets="0") for c in methods])
    randomize(handle)
    names, weights = [c.name for c in methods], [1.0, -0.5, 2.0, 0.25]
    updates = [merged_update(model, n) for n in names]
    assert all(u.abs().max() > 1e-3 for u in updates)  # each source changes the weight
    handle.combine(names, weights, name="all", how=how, rank=5, density=1.0)
    expected = sum(w * u for w, u in zip(weights, updates))
    if how == "ties":  # density 1: each entry is the mean of the weighted entries whose sign agrees with the sum
        stacked = torch.stack(updates)
        agree = stacked.sign() == torch.where(stacked.sum(0) >= 0, 1.0, -1.0)
        weighted = stacked * torch.tensor(weights).view(-1, 1, 1)
        expected = (weighted * agree).sum(0) / agree.sum(0).clamp(min=1)
    torch.testing.assert_close(effective(model, "all"), expected, rtol=1e-4, atol=1e-5)


def test_only_weight_updates_combine_and_only_lora_factors_concatenate():
    model = nn.Sequential(nn.Linear(4, 4, bias=False))
    handle = attach(model, [LoraConfig(r=2, targets="0", name="lora"), LohaConfig(r=2, targets="0", name="loha"),
                            DoraConfig(r=2, targets="0", name="dora"), IA3Config(targets="0", name="ia3")])
    for names, how, message in [(["lora", "loha"], "cat", "'loha' is 'loha': how='cat' joins LoRA factors"),
                                (["lora", "dora"], "svd", "'dora' is 'dora', whose effect is not a weight update"),
                                (["ia3"], "svd", "'ia3' is 'ia3', whose effect is not a weight update")]:
        with pytest.raises(DeltaConfigError, match=message):
            handle.combine(names, name="out", how=how)
        assert list(handle.configs) == ["lora", "loha", "dora", "ia3"]


# -- torch.compile after switching and merging -----------------------------------------------------
def test_no_graph_breaks_after_switching_or_merging_and_compiled_matches_eager():
    torch._dynamo.reset()
    model = tiny_bert().eval()
    handle = three_tasks(model)
    inputs = family_inputs("bert", batch=2)

    def forward(ids):
        return model(input_ids=ids).logits

    for step in ("all", "switch", "merge"):
        if step == "switch":
            handle.set_active("b")
        if step == "merge":
            handle.set_active(None)
            handle.merge(["a", "b"])
        explanation = torch._dynamo.explain(forward)(inputs["input_ids"])
        assert explanation.graph_break_count == 0, (step, explanation.break_reasons)
        compiled = torch.compile(forward, backend="aot_eager", fullgraph=True)
        torch.testing.assert_close(compiled(inputs["input_ids"]), forward(inputs["input_ids"]), rtol=1e-5, atol=1e-5)


def test_residual_inits_cannot_be_switched_off_but_merge_and_unload_keeps_their_update():
    model = tiny_llama().eval()
    ids = family_inputs("llama")["input_ids"]
    handle = randomize(attach(model, [LoraConfig(r=2, name="p", init="pissa"), LoraConfig(r=2, name="q")]))
    for call, what in [(lambda: handle.set_active("q"), "switched off"),
                       (lambda: handle.mixed_batch(["p", None]).__enter__(), "used per row"),
                       (lambda: handle.combine(["p", "q"], name="pq"), "residual weight")]:
        with pytest.raises(DeltaConfigError, match=what):
            call()
    tuned = model(input_ids=ids).logits
    plain = handle.merge_and_unload()
    assert not DeltaModel(plain).deltas() and not any("lora" in k or ".p." in k for k in plain.state_dict())
    torch.testing.assert_close(plain(input_ids=ids).logits, tuned, rtol=1e-5, atol=1e-5)


def test_mixed_batch_gradients_equal_those_of_each_task_on_its_rows():
    model = tiny_bert().eval()
    handle = three_tasks(model)
    inputs = family_inputs("bert", batch=4)
    rows = ["a", "b", "a", "c"]
    with handle.mixed_batch(rows):
        (model(**inputs).logits ** 2).sum().backward()
    mixed = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    for task in ("a", "b", "c"):
        handle.set_active(task)
        picked = torch.tensor([r == task for r in rows])
        (model(**{k: v[picked] for k, v in inputs.items()}).logits ** 2).sum().backward()
    handle.set_active(None)
    separate = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert mixed.keys() == separate.keys() and any(".a." in n for n in mixed)
    for name, grad in mixed.items():
        torch.testing.assert_close(grad, separate[name], rtol=1e-4, atol=1e-6)
