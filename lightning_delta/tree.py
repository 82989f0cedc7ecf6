"""The model tree ``lightning-delta inspect`` shows: repeated blocks folded, deltas and trainable parameters marked.

:func:`model_tree` builds a JSON-ready tree; :func:`render_plain` and :func:`render_rich` draw it.
Consecutive siblings with numeric names and the same structure (types, shapes, deltas, trainable
flags) fold into one node, e.g. ``layer.0-11`` (12 x ``BertLayer``), with counts for all of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from lightning_delta.core import Delta


@dataclass
class Node:
    """One module, or a run of identical sibling blocks (``repeat > 1``)."""

    name: str
    type: str
    parameters: int  #: all parameters below (for a run: of all its blocks)
    trainable: int  #: of those, the ones that require grad
    delta: str | None = None  #: the method, for a delta module
    repeat: int = 1
    children: list[Node] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "type": self.type, "parameters": self.parameters, "trainable": self.trainable,
                "delta": self.delta, "repeat": self.repeat, "children": [c.to_dict() for c in self.children]}


def _signature(module: nn.Module) -> tuple:
    own = tuple((n, tuple(p.shape), p.requires_grad) for n, p in module.named_parameters(recurse=False))
    return (type(module).__name__, own, tuple((n, _signature(c)) for n, c in module.named_children()))


def _node(name: str, module: nn.Module) -> Node:
    params = list(module.parameters())
    children = _fold([_node(n, c) for n, c in module.named_children()], list(module.named_children()))
    return Node(name=name, type=type(module).__name__, parameters=sum(p.numel() for p in params),
                trainable=sum(p.numel() for p in params if p.requires_grad),
                delta=module.config.method if isinstance(module, Delta) else None, children=children)


def _fold(nodes: list[Node], modules: list[tuple[str, nn.Module]]) -> list[Node]:
    out: list[Node] = []
    i = 0
    while i < len(nodes):
        j = i + 1
        if nodes[i].name.isdigit():
            sig = _signature(modules[i][1])
            while j < len(nodes) and nodes[j].name.isdigit() and _signature(modules[j][1]) == sig:
                j += 1
        run = nodes[i:j]
        if len(run) > 1:
            first = run[0]
            out.append(Node(name=f"{first.name}-{run[-1].name}", type=first.type,
                            parameters=sum(n.parameters for n in run), trainable=sum(n.trainable for n in run),
                            delta=first.delta, repeat=len(run), children=first.children))
        else:
            out.append(nodes[i])
        i = j
    return out


def model_tree(model: nn.Module) -> Node:
    """The folded tree of ``model`` (children of a run are those of its first block)."""
    return _node("", model)


def _label(node: Node, rich: bool) -> str:
    name = node.name or node.type
    kind = f" ({node.repeat} x {node.type})" if node.repeat > 1 else (f" ({node.type})" if node.name else "")
    counts = f"{node.parameters:,} params"
    if node.trainable:
        counts += f", trainable {node.trainable:,}"
    if node.delta:
        return f"[bold green]{name} \\[delta {node.delta}][/]{kind}  {counts}" if rich else \
            f"{name} [delta {node.delta}]{kind}  {counts}"
    if rich:
        return f"[bold yellow]{name}[/]{kind}  {counts}" if node.trainable else f"{name}[dim]{kind}  {counts}[/]"
    return f"{name}{kind}  {counts}"


def render_plain(node: Node, max_depth: int | None = None) -> str:
    """The tree as indented plain text (for pipes and logs)."""
    lines = [_label(node, rich=False)]

    def walk(children: list[Node], indent: str, depth: int) -> None:
        if max_depth is not None and depth > max_depth:
            return
        for k, child in enumerate(children):
            last = k == len(children) - 1
            lines.append(f"{indent}{'└── ' if last else '├── '}{_label(child, rich=False)}")
            walk(child.children, indent + ("    " if last else "│   "), depth + 1)

    walk(node.children, "", 1)
    return "\n".join(lines)


def render_rich(node: Node, max_depth: int | None = None) -> Any:
    """The tree as a ``rich.tree.Tree`` (deltas green, trainable modules yellow)."""
    from rich.tree import Tree

    tree = Tree(_label(node, rich=True))

    def walk(branch: Tree, children: list[Node], depth: int) -> None:
        if max_depth is not None and depth > max_depth:
            return
        for child in children:
            walk(branch.add(_label(child, rich=True)), child.children, depth + 1)

    walk(tree, node.children, 1)
    return tree
