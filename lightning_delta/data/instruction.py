"""Instruction and chat data for supervised fine-tuning (SFT) of causal language models.

Each example becomes ``input_ids`` and ``labels`` where only the response tokens (for chats:
the assistant turns) carry loss; the prompt, the other turns and the padding are ``-100``.
With ``packing=True`` several examples share one row of at most ``max_length`` tokens; their
``position_ids`` restart at 0 at each example, which transformers turns into a block-diagonal
causal mask (sdpa, eager, flex) or variable-length attention (flash attention), so no token
attends across an example boundary.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from typing_extensions import override

from lightning_delta.core import iter_deltas
from lightning_delta.data.splits import require_columns
from lightning_delta.data.text import _TokenizedData
from lightning_delta.hf_compat import mask_attention_implementations

IGNORE_INDEX = -100


class InstructionCollator:
    """Pads a list of examples to the longest one: ``input_ids`` with ``pad_id``, ``labels`` with -100.

    Unpacked rows get an ``attention_mask``. Packed rows get ``position_ids`` (padding continues
    as one more sequence) and no attention mask, plus ``use_cache=False``: transformers finds the
    example boundaries from ``position_ids`` only when there is neither a 2D mask nor a cache.
    """

    def __init__(self, pad_id: int, packed: bool) -> None:
        self.pad_id, self.packed = pad_id, packed

    def __call__(self, rows: Sequence[Mapping[str, list[int]]]) -> dict[str, Any]:
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        positions = torch.arange(width).repeat(len(rows), 1)
        for i, row in enumerate(rows):
            n = len(row["input_ids"])
            ids[i, :n] = torch.tensor(row["input_ids"])
            labels[i, :n] = torch.tensor(row["labels"])
            mask[i, :n] = 1
            if self.packed:
                positions[i, :n] = torch.tensor(row["position_ids"])
                positions[i, n:] = torch.arange(width - n)
        if self.packed:
            return {"input_ids": ids, "labels": labels, "position_ids": positions, "use_cache": False}
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def pack(examples: Sequence[tuple[list[int], list[int]]], max_length: int) -> dict[str, list[list[int]]]:
    """Concatenates ``(input_ids, labels)`` examples in order into rows of at most ``max_length`` tokens.

    Each example's first label is -100 (nothing before it in its own example predicts it), so no
    label at a boundary asks the previous example to predict the next one's first token.
    """
    rows: dict[str, list[list[int]]] = {"input_ids": [], "labels": [], "position_ids": []}
    current: dict[str, list[int]] = {k: [] for k in rows}
    for ids, labels in examples:
        if current["input_ids"] and len(current["input_ids"]) + len(ids) > max_length:
            for k in rows:
                rows[k].append(current[k])
            current = {k: [] for k in rows}
        current["input_ids"] += ids
        current["labels"] += [IGNORE_INDEX, *labels[1:]]
        current["position_ids"] += list(range(len(ids)))
    if current["input_ids"]:
        for k in rows:
            rows[k].append(current[k])
    return rows


class InstructionData(_TokenizedData):
    """Prompt/response pairs or chat conversations for :class:`~lightning_delta.tasks.CausalLanguageModeling`.

    The format follows the data: a ``messages_column`` (lists of ``{"role": ..., "content": ...}``)
    is rendered with the tokenizer's chat template and only the assistant turns are learned;
    otherwise ``prompt_column`` and ``response_column`` are read, the prompt (formatted by
    ``prompt_template``) is tokenized with the tokenizer's special tokens (e.g. BOS), the response
    without, and the end-of-sequence token is appended to the response.

    Args:
        dataset: a hub dataset name (needs network).
        dataset_config: its configuration.
        data_files: local files by split (``train``, ``validation``, ``test``): jsonl, json, csv, tsv or parquet.
        prompt_column: the prompt (instruction) column.
        response_column: the response column.
        messages_column: the chat column; used when the data has it.
        prompt_template: format string for the prompt, e.g. ``"### Question:\\n{prompt}\\n### Answer:\\n"``.
        chat_template: a Jinja chat template overriding (or supplying) the tokenizer's.
        add_eos: end each response with the tokenizer's EOS token (SEP where it has no EOS).
        packing: concatenate examples into rows of ``max_length`` tokens with restarting ``position_ids``.
        drop_long_prompts: drop examples whose prompt leaves no room for a response token within
            ``max_length`` instead of raising an error.
        tokenizer: tokenizer name or folder; by default the model's.
        max_length: tokens per example (responses are truncated) and, with ``packing``, per row.
        batch_size: rows per batch.
        num_workers: DataLoader workers.
    """

    def __init__(
        self,
        dataset: str | None = None,
        dataset_config: str | None = None,
        data_files: dict[str, str | list[str]] | None = None,
        prompt_column: str = "prompt",
        response_column: str = "response",
        messages_column: str = "messages",
        prompt_template: str = "{prompt}",
        chat_template: str | None = None,
        add_eos: bool = True,
        packing: bool = False,
        drop_long_prompts: bool = False,
        tokenizer: str | None = None,
        max_length: int = 512,
        batch_size: int = 8,
        num_workers: int = 0,
    ) -> None:
        super().__init__(dataset, dataset_config, data_files, tokenizer, max_length, batch_size, num_workers)
        if "{prompt}" not in prompt_template:
            raise ValueError(f"prompt_template={prompt_template!r} must contain '{{prompt}}'")
        self.save_hyperparameters()
        self.prompt_column, self.response_column, self.messages_column = prompt_column, response_column, messages_column
        self.prompt_template, self.chat_template = prompt_template, chat_template
        self.add_eos, self.packing, self.drop_long_prompts = add_eos, packing, drop_long_prompts
        self.chat = False

    # ----------------------------------------------------------------- checks before training
    def _choose_format(self, splits: Mapping[str, Any]) -> None:
        columns = splits["train"].column_names
        self.chat = self.messages_column in columns
        if self.chat:
            require_columns(splits, {"messages_column": self.messages_column})
        elif self.prompt_column in columns or self.response_column in columns:
            require_columns(splits, {"prompt_column": self.prompt_column, "response_column": self.response_column})
        else:
            raise ValueError(
                f"split 'train' has neither a chat column {self.messages_column!r} (messages_column) nor"
                f" prompt/response columns {self.prompt_column!r}/{self.response_column!r} (prompt_column,"
                f" response_column); its columns are {columns}. Name the right ones, e.g."
                " --data.init_args.prompt_column=instruction --data.init_args.response_column=output"
            )

    def _check_packing(self) -> None:
        """Packing relies on transformers building the block-diagonal mask from ``position_ids``."""
        model = getattr(self.trainer, "lightning_module", None) if self.trainer is not None else None
        if model is None:
            return
        from transformers import PreTrainedModel

        for module in model.modules():
            if isinstance(module, PreTrainedModel):
                implementation = getattr(module.config, "_attn_implementation", None)
                known = mask_attention_implementations()
                if implementation is not None and implementation not in known:
                    raise ValueError(
                        f"packing=True needs an attention implementation that separates packed examples by"
                        f" position_ids ({', '.join(known)}); the model uses {implementation!r}. Load it with"
                        " attn_implementation='sdpa', or set packing=False"
                    )
                return

    def _check_deltas(self) -> None:
        """Deltas that cannot keep packed examples apart (prompt and prefix: virtual tokens in front of each row)."""
        model = getattr(self.trainer, "lightning_module", None) if self.trainer is not None else None
        if model is None:
            return
        rewriting = sorted({d.module.config.method for d in iter_deltas(model) if not d.module.config.packs})
        if rewriting:
            raise ValueError(
                f"packing=True does not combine with {rewriting} deltas: they put virtual tokens in front of each"
                " row and drop its position_ids (prompt) or add a cache (prefix), so transformers would no longer"
                " keep packed examples apart. Use packing=False with them"
            )

    @override
    def _loader(self, split: str, shuffle: bool = False) -> Any:
        if self.packing:
            self._check_deltas()  # deltas are attached after setup, before the loaders are asked for
        return super()._loader(split, shuffle)

    def _tokenizer(self) -> Any:
        tokenizer = self.load_tokenizer()
        if self.chat_template is not None:
            tokenizer.chat_template = self.chat_template
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        if self.chat and not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                f"the data has a chat column {self.messages_column!r} but tokenizer {self.tokenizer_source()!r}"
                " has no chat template; give one with InstructionData(chat_template='{% for m in messages %}...')"
                " (CLI: --data.init_args.chat_template=...), use a chat model's tokenizer (tokenizer=...), or"
                " give prompt/response columns instead"
            )
        return tokenizer

    # ----------------------------------------------------------------- encoding
    def _encode_pair(self, tokenizer: Any, prompt: str, response: str) -> tuple[list[int], int]:
        """Token ids of prompt + response and the prompt's length."""
        prompt_ids = tokenizer(self.prompt_template.format(prompt=prompt))["input_ids"]
        response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
        eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
        if self.add_eos and eos is not None:
            response_ids = [*response_ids, eos]
        return [*prompt_ids, *response_ids], len(prompt_ids)

    def _encode_chat(self, tokenizer: Any, messages: list[dict[str, str]]) -> tuple[list[int], list[bool]]:
        """Token ids of a rendered conversation and which of them belong to assistant turns.

        Each assistant turn is the text the template adds from ``messages[:i]`` with the generation
        prompt to ``messages[:i + 1]``; the template must render a conversation as an extension
        of its beginnings (as chat templates do).
        """
        def render(upto: int, generation_prompt: bool) -> str:
            return tokenizer.apply_chat_template(messages[:upto], tokenize=False,
                                                 add_generation_prompt=generation_prompt)

        segments: list[tuple[str, bool]] = []
        done = ""
        for i, message in enumerate(messages):
            if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
                raise ValueError(f"chat message {message!r} must be a mapping with 'role' and 'content'")
            if message["role"] != "assistant":
                continue
            before, after = render(i, True), render(i + 1, False)
            if not (before.startswith(done) and after.startswith(before)):
                raise ValueError(
                    "the chat template does not render a conversation as an extension of its beginning, so the"
                    " assistant turns cannot be located; use a template without such look-ahead (chat_template=...)"
                )
            segments += [(before[len(done):], False), (after[len(before):], True)]
            done = after
        full = render(len(messages), False)
        segments.append((full[len(done):] if full.startswith(done) else "", False))
        ids: list[int] = []
        learned: list[bool] = []
        for text, is_assistant in segments:
            if text:
                part = tokenizer(text, add_special_tokens=False)["input_ids"]
                ids += part
                learned += [is_assistant] * len(part)
        return ids, learned

    def _encode_split(self, tokenizer: Any, split: str, ds: Any) -> list[tuple[list[int], list[int]]]:
        """``(input_ids, labels)`` per example, truncated to ``max_length``; checks prompt lengths."""
        examples, too_long, no_answer = [], [], 0
        for row in ds:
            if self.chat:
                ids, learned = self._encode_chat(tokenizer, row[self.messages_column])
                if not any(learned):
                    no_answer += 1
                    continue
                prompt_length = learned.index(True)
            else:
                ids, prompt_length = self._encode_pair(tokenizer, row[self.prompt_column], row[self.response_column])
                learned = [i >= prompt_length for i in range(len(ids))]
            if prompt_length >= self.max_length:
                too_long.append(prompt_length)
                continue
            ids, learned = ids[: self.max_length], learned[: self.max_length]
            examples.append((ids, [t if keep else IGNORE_INDEX for t, keep in zip(ids, learned)]))
        if no_answer:
            raise ValueError(
                f"{no_answer} of {len(ds)} conversations in split {split!r} have no assistant turn, so nothing in"
                " them would be learned; give each at least one message with role 'assistant'"
            )
        if too_long and not self.drop_long_prompts:
            what = "conversations have text before the first assistant turn" if self.chat else "examples have prompts"
            raise ValueError(
                f"{len(too_long)} of {len(ds)} {what} in split {split!r} of max_length={self.max_length} tokens or"
                f" more (the longest: {max(too_long)}), leaving no response token to learn. Raise max_length"
                f" (e.g. --data.init_args.max_length={max(too_long) + 64}), shorten them, or drop them with"
                " drop_long_prompts=True"
            )
        if not examples:
            raise ValueError(f"split {split!r} has no example left whose prompt fits in max_length={self.max_length}")
        return examples

    @override
    def setup(self, stage: str) -> None:
        if self.splits:
            return
        splits = self.load()
        require_columns(splits, {})  # no empty split
        self._choose_format(splits)
        if self.packing:
            self._check_packing()
        tokenizer = self._tokenizer()
        encoded = {}
        for split, ds in splits.items():
            examples = self._encode_split(tokenizer, split, ds)
            if self.packing:
                rows = pack(examples, self.max_length)
            else:
                rows = {"input_ids": [e[0] for e in examples], "labels": [e[1] for e in examples]}
            encoded[split] = [dict(zip(rows, values)) for values in zip(*rows.values())]
        self.splits = encoded
        self.collate = InstructionCollator(tokenizer.pad_token_id, self.packing)
