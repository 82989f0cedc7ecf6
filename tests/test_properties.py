"""Property-based tests: addressing matches exactly what the rules define; delta state round-trips."""

import copy
import re

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lightning_delta import TargetError, attach
from lightning_delta.targets import resolve_targets

NAMES = st.sampled_from(["a", "attn", "xattn", "q", "myq", "v", "layer", "0", "10", "mlp"])  # some end in others


@st.composite
def module_trees(draw, depth=3):
    """A random tree of containers whose leaves are small Linear layers."""
    if depth == 0 or draw(st.booleans()):
        return nn.Linear(2, 2)
    children = draw(st.dictionaries(NAMES, st.deferred(lambda: module_trees(depth=depth - 1)), min_size=1, max_size=3))
    container = nn.Module()
    for name, child in children.items():
        container.add_module(name, child)
    return container


def wrap(tree):
    model = nn.Module()
    model.add_module("root", tree)
    return model


def expected(names, pattern):
    """The rules, written out independently of the library."""
    if pattern.startswith("re:"):
        return [n for n in names if re.fullmatch(pattern[3:], n)]
    return [n for n in names if n == pattern or n.endswith("." + pattern)]


@st.composite
def tree_and_pattern(draw):
    model = wrap(draw(module_trees()))
    names = [n for n, _ in model.named_modules() if n]
    kind = draw(st.sampled_from(["exact", "suffix", "partial", "regex", "random"]))
    name = draw(st.sampled_from(names))
    if kind == "exact":
        pattern = name
    elif kind == "suffix":
        parts = name.split(".")
        pattern = ".".join(parts[draw(st.integers(0, len(parts) - 1)):])
    elif kind == "partial":  # a tail of a name that may or may not start on a dot boundary
        pattern = name[draw(st.integers(0, len(name) - 1)):].lstrip(".") or name
    elif kind == "regex":
        pattern = "re:" + draw(st.sampled_from([r".*\.q", r"root\..*", r".*attn.*", r".*[01]", re.escape(name)]))
    else:
        pattern = ".".join(draw(st.lists(NAMES, min_size=1, max_size=3)))
    return model, names, pattern


@settings(max_examples=150, deadline=None)
@given(tree_and_pattern())
def test_matches_are_exactly_what_the_rules_define(case):
    model, names, pattern = case
    want = expected(names, pattern)
    if want:
        assert resolve_targets(model, [pattern], lambda m: True) == want
    else:
        try:
            resolve_targets(model, [pattern], lambda m: True)
        except TargetError as err:
            assert repr(pattern) in str(err)
        else:
            raise AssertionError(f"{pattern!r} matched although no name fits the rules")


@settings(max_examples=40, deadline=None)
@given(tree=module_trees(), r=st.integers(1, 3), seed=st.integers(0, 2**16),
       dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
def test_delta_state_round_trips(tree, r, seed, dtype):
    model = wrap(tree)
    twin = copy.deepcopy(model)  # the same backbone, no delta yet
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    handle = attach(model, "lora", targets=linears, r=r).freeze_backbone()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in handle.delta_parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    state = {k: v.to(dtype) for k, v in handle.delta_state_dict().items()}
    twin_handle = attach(twin, "lora", targets=linears, r=r).freeze_backbone()
    twin_handle.load_delta_state_dict(state)
    loaded = twin_handle.delta_state_dict()
    assert loaded.keys() == state.keys()
    for key, value in loaded.items():
        assert value.dtype == torch.float32  # cast to the delta's dtype, whatever the file held
        assert torch.equal(value, state[key].float())
