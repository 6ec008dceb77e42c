"""Channel dependency analysis: which channels of a captured network must be removed together.

Rules (one function per op kind) live in ``rules_*.py`` and register themselves in :mod:`.registry`.
"""
from . import rules_elementwise, rules_layers, rules_modes, rules_shape  # noqa: F401 - registers the rules
from .analysis import ChannelGroup, DependencyGraph, GroupMember
from .registry import channel_rule

__all__ = ["DependencyGraph", "ChannelGroup", "GroupMember", "channel_rule"]
