"""Addressing: which modules of a model a delta touches.

A target pattern is one of:

* an exact dotted module name, ``"encoder.layer.0.attention.self.query"``;
* a suffix on a dot boundary, ``"attention.self.query"`` or ``"query"``
  (matches ``"...layer.3.attention.self.query"`` but not ``"...myquery"``);
* a regular expression after ``"re:"``, matched against the whole dotted name
  (``"re:.*layer\\.[0-3]\\..*query"``);
* ``"all-linear"``: every Linear-like module (``nn.Linear``, transformers'
  ``Conv1D``) except the model's output head;
* ``"all"``: every module the method supports, except the output head.

``targets=None`` asks for the method's preset for ``model.config.model_type``.
Modules inside delta modules are never candidates.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterable, Iterator, Sequence

from torch import nn

from lightning_delta.errors import TargetError, UnsupportedModuleError

ALL_LINEAR = "all-linear"
ALL = "all"
REGEX_PREFIX = "re:"

#: Names of task heads left out of ``"all-linear"`` and ``"all"``: they are trained
#: whole (``trainable=("classifier",)``) rather than given a delta.
HEAD_NAMES = frozenset({"lm_head", "classifier", "score", "qa_outputs", "cls", "head"})

#: Attention projections per ``config.model_type``; the default for reparameterising
#: methods such as LoRA (the placement of the LoRA paper: query and value).
ATTENTION_PRESETS: dict[str, tuple[str, ...]] = {
    "bert": ("query", "value"),
    "roberta": ("query", "value"),
    "xlm-roberta": ("query", "value"),
    "electra": ("query", "value"),
    "distilbert": ("q_lin", "v_lin"),
    "gpt2": ("c_attn",),
    "llama": ("q_proj", "v_proj"),
    "mistral": ("q_proj", "v_proj"),
    "qwen2": ("q_proj", "v_proj"),
    "t5": ("q", "v"),
    "mt5": ("q", "v"),
    "bart": ("q_proj", "v_proj"),
}

#: A preset entry is a tuple of patterns, or a tuple of such layouts when transformers renamed a
#: family's modules between releases (newest first): the first layout whose every pattern names a
#: module of the model is used.
Layouts = tuple[str, ...] | tuple[tuple[str, ...], ...]

_BERT_LIKE = ("bert", "roberta", "xlm-roberta", "electra")
_LLAMA_LIKE = ("llama", "mistral", "qwen2")

#: ViT: ``attention.{q,k,v,o}_proj`` and ``mlp.fc{1,2}`` since transformers 5.23; BERT's names before.
_VIT = {
    "attention": (("q_proj", "v_proj"), ("query", "value")),
    "attention_output": (("attention.o_proj",), ("attention.output.dense",)),
    "ffn_output": (("mlp.fc2",), (r"re:.*layer\.\d+\.output\.dense",)),
    "parallel_ffn": (("mlp",), (r"re:.*layer\.\d+\.output",)),
    "key_value": (("k_proj", "v_proj"), ("key", "value")),
}
ATTENTION_PRESETS["vit"] = _VIT["attention"]

#: Outputs of each attention block, before its residual: Houlsby adapters go here.
ATTENTION_OUTPUT_PRESETS: dict[str, tuple[str, ...]] = {
    **{k: ("attention.output.dense",) for k in _BERT_LIKE},
    **{k: ("self_attn.o_proj",) for k in _LLAMA_LIKE},
    "distilbert": ("attention.out_lin",),
    "gpt2": ("attn.c_proj",),
    "t5": ("SelfAttention.o", "EncDecAttention.o"),
    "mt5": ("SelfAttention.o", "EncDecAttention.o"),
    "bart": ("self_attn.out_proj", "encoder_attn.out_proj"),
    "vit": _VIT["attention_output"],
}

#: Outputs of each feed-forward block, before its residual: Houlsby and Pfeiffer adapters.
FFN_OUTPUT_PRESETS: dict[str, tuple[str, ...]] = {
    **{k: (r"re:.*layer\.\d+\.output\.dense",) for k in _BERT_LIKE},
    **{k: ("mlp.down_proj",) for k in _LLAMA_LIKE},
    "distilbert": ("ffn.lin2",),
    "gpt2": ("mlp.c_proj",),
    "t5": ("DenseReluDense.wo",),
    "mt5": ("DenseReluDense.wo",),
    "bart": ("fc2",),
    "vit": _VIT["ffn_output"],
}

#: Feed-forward blocks, for adapters in parallel with them. BERT-style blocks have no module
#: holding the whole feed-forward path; their ``*Output(hidden_states, input_tensor)`` receives
#: the feed-forward input as ``input_tensor``, which the parallel adapter reads and adds to.
PARALLEL_FFN_PRESETS: dict[str, tuple[str, ...]] = {
    **{k: (r"re:.*layer\.\d+\.output",) for k in _BERT_LIKE},
    **{k: ("mlp",) for k in _LLAMA_LIKE},
    "distilbert": ("ffn",),
    "gpt2": ("mlp",),
    "t5": ("DenseReluDense",),
    "mt5": ("DenseReluDense",),
    "vit": _VIT["parallel_ffn"],
}

#: Key and value projections (GPT-2 fuses q, k and v in ``c_attn``): IA3 scales their outputs.
KEY_VALUE_PRESETS: dict[str, tuple[str, ...]] = {
    **{k: ("key", "value") for k in _BERT_LIKE},
    **{k: ("k_proj", "v_proj") for k in _LLAMA_LIKE},
    "distilbert": ("k_lin", "v_lin"),
    "gpt2": ("c_attn",),
    "t5": ("k", "v"),
    "mt5": ("k", "v"),
    "bart": ("k_proj", "v_proj"),
    "vit": _VIT["key_value"],
}


def layouts(entry: Layouts) -> list[tuple[str, ...]]:
    """A preset entry as its list of layouts (one, unless the family's names changed across releases)."""
    return [tuple(layout) for layout in entry] if entry and isinstance(entry[0], tuple) else [tuple(entry)]


def preset(table: dict[str, Layouts], model: nn.Module, method: str, what: str) -> list[str]:
    """The targets ``table`` lists for ``model.config.model_type`` (the layout that fits the model's names).

    Raises:
        TargetError: the model type has no entry; the message says how to pass targets.
    """
    kind = model_type(model)
    if kind not in table:
        raise TargetError(
            f"{method!r} has no preset ({what}) for model type {kind!r}: pass targets explicitly, e.g."
            f" targets=['attention.output.dense'] or targets='all-linear'."
            f" Presets exist for: {', '.join(sorted(table))}"
        )
    options = layouts(table[kind])
    if len(options) > 1:
        names = [name for name, _ in model.named_modules()]
        options = [o for o in options if all(any(matches(n, p) for n in names) for p in o)] or options
    return list(options[0])


Pattern = str


def normalize_patterns(patterns: str | Iterable[str] | None) -> tuple[str, ...]:
    """Turns ``None``, one pattern or an iterable of patterns into a tuple, never mutating the input."""
    if patterns is None:
        return ()
    if isinstance(patterns, str):
        return (patterns,)
    result = tuple(patterns)
    for p in result:
        if not isinstance(p, str) or not p:
            raise TargetError(f"target patterns must be non-empty strings, got {p!r} in {list(result)!r}")
        if p.startswith(REGEX_PREFIX):
            try:
                re.compile(p[len(REGEX_PREFIX):])
            except re.error as err:
                raise TargetError(f"target pattern {p!r} is not a valid regular expression ({err}); e.g."
                                  r" 're:.*layer\.\d+\.output\.dense'") from err
    return result


def matches(name: str, pattern: Pattern) -> bool:
    """Whether the dotted module ``name`` is addressed by ``pattern`` (exact, dot-suffix or ``re:``)."""
    if pattern.startswith(REGEX_PREFIX):
        return re.fullmatch(pattern[len(REGEX_PREFIX) :], name) is not None
    return name == pattern or name.endswith("." + pattern)


def is_linear_like(module: nn.Module) -> bool:
    """``nn.Linear`` or transformers' ``Conv1D`` (checked without importing transformers)."""
    if isinstance(module, nn.Linear):
        return True
    return type(module).__name__ == "Conv1D" and type(module).__module__.startswith("transformers.")


def linear_in_out(module: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of a Linear (weight ``(out, in)``) or Conv1D (weight ``(in, out)``)."""
    rows, cols = module.weight.shape
    return (cols, rows) if isinstance(module, nn.Linear) else (rows, cols)


def model_type(model: nn.Module) -> str | None:
    """``model.config.model_type`` for transformers models, else ``None``."""
    return getattr(getattr(model, "config", None), "model_type", None)


def is_delta(module: nn.Module) -> bool:
    """Whether ``module`` is a delta (an instance of :class:`~lightning_delta.core.Delta`, which says so)."""
    return getattr(type(module), "is_delta", False) is True


def candidate_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Named submodules that may be targets: all but the root, deltas and anything inside a delta."""
    skip: list[str] = []
    for name, module in model.named_modules():
        if not name or any(name == s or name.startswith(s + ".") for s in skip):
            continue
        if is_delta(module):
            skip.append(name)
            continue
        yield name, module


def head_names(model: nn.Module) -> set[str]:
    """Dotted names of output heads: ``get_output_embeddings()`` and modules under a name in ``HEAD_NAMES``."""
    out = None
    get_out = getattr(model, "get_output_embeddings", None)
    if callable(get_out):
        try:
            out = get_out()
        except (NotImplementedError, AttributeError):
            out = None
    heads = set()
    for name, module in model.named_modules():
        if (out is not None and module is out) or HEAD_NAMES.intersection(name.split(".")):
            heads.add(name)
    return heads


def _closest(pattern: str, names: Sequence[str], n: int = 10) -> list[str]:
    """Up to ``n`` module names close to ``pattern``, comparing both full names and last components."""
    key = pattern[len(REGEX_PREFIX) :] if pattern.startswith(REGEX_PREFIX) else pattern
    tails: dict[str, str] = {}
    for name in names:
        tails.setdefault(name.rsplit(".", 1)[-1], name)
    close = difflib.get_close_matches(key, list(tails), n=n, cutoff=0.5)
    found = [tails[t] for t in close]
    for name in difflib.get_close_matches(key, names, n=n, cutoff=0.5):
        if name not in found:
            found.append(name)
    return found[:n] or list(names[:n])


def _no_match_message(pattern: str, names: Sequence[str], preset_hint: str) -> str:
    close = ", ".join(repr(n) for n in _closest(pattern, names))
    return (
        f"target {pattern!r} matches no module of the model. Closest module names: {close}. "
        "A target is an exact dotted name, a suffix on a dot boundary ('attention.self.query'), "
        f"'re:<regex>' (full match), '{ALL_LINEAR}' or '{ALL}'. {preset_hint}"
    )


def preset_hint() -> str:
    """One sentence naming the model types that have presets."""
    return "Presets (targets=None) exist for model types: " + ", ".join(sorted(ATTENTION_PRESETS)) + "."


def resolve_targets(
    model: nn.Module,
    patterns: str | Iterable[str],
    supports: Callable[[nn.Module], bool],
    *,
    exclude: str | Iterable[str] = (),
    method: str = "delta",
    supported_types: str = "",
) -> list[str]:
    """Dotted names of the modules ``patterns`` address, minus ``exclude``, in model order.

    Args:
        model: the model to search.
        patterns: target patterns (see the module docstring).
        supports: whether the method can attach to a module.
        exclude: patterns of modules to leave out.
        method: the method's name, for messages.
        supported_types: a readable list of the types ``supports`` accepts, for messages.

    Returns:
        The matched names, each once, in ``named_modules()`` order.

    Raises:
        TargetError: a pattern matches no module, or every match is excluded.
        UnsupportedModuleError: a named or suffix/regex pattern matches a module the method cannot handle.
    """
    patterns = normalize_patterns(patterns)
    exclude = normalize_patterns(exclude)
    if not patterns:
        raise TargetError(f"no targets given for {method!r}: pass target patterns or targets=None for the preset")
    candidates = list(candidate_modules(model))
    names = [n for n, _ in candidates]
    heads = head_names(model)
    chosen: dict[str, nn.Module] = {}
    for pattern in patterns:
        if pattern == ALL_LINEAR:
            hits = [(n, m) for n, m in candidates if is_linear_like(m) and n not in heads and supports(m)]
        elif pattern == ALL:
            hits = [(n, m) for n, m in candidates if supports(m) and n not in heads]
        else:
            hits = [(n, m) for n, m in candidates if matches(n, pattern)]
        if not hits:
            raise TargetError(_no_match_message(pattern, names, preset_hint()))
        for name, module in hits:
            if not supports(module):
                raise UnsupportedModuleError(
                    f"{method!r} cannot attach to {name!r} of type {type(module).__name__}"
                    f" (matched by target {pattern!r}); it supports {supported_types or 'other types'}."
                    " Narrow the target to those modules, e.g. a suffix such as 'attention.self.query'."
                )
            chosen[name] = module
    kept = [n for n in names if n in chosen and not any(matches(n, e) for e in exclude)]
    if not kept:
        raise TargetError(
            f"every module matched by targets {list(patterns)!r} is excluded by {list(exclude)!r}"
            f" ({len(chosen)} matched, e.g. {sorted(chosen)[:3]!r}); loosen `exclude`"
        )
    return kept
