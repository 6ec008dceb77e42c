"""The registry of channel rules: one small function per op kind, looked up by the node's ``op``."""
from __future__ import annotations

from typing import Callable

import torch.nn as nn

from ..ir import Node
from ..registry import registers_in

ChannelRule = Callable[["RuleContext"], None]  # noqa: F821 - documented type
RULES: dict[str, ChannelRule] = {}


channel_rule = registers_in(RULES)
"""Register ``rule(context)`` for the given op names (leaf type names such as ``Conv2d`` or function names)."""


def find_rule(node: Node, module: nn.Module | None) -> ChannelRule | None:
    """The rule for a node, or ``None`` (the analysis then blocks every channel flowing into it)."""
    return RULES.get(node.op)
