"""Channel rule for mode selects (:class:`graph.modules.ModeSelect`): the node passes on the tensor of the current
mode, so the channels of the train-mode and the eval-mode producer are the same channels, coupled like the operands
of an element-wise op."""
from __future__ import annotations

from ..ir import Ref
from ..modules import MODE_SELECT
from .context import RuleContext
from .registry import channel_rule
from .rules_elementwise import broadcast_rule


class _BranchesContext(RuleContext):
    """The select's context with its two branches (train, eval) as its tensor arguments."""

    def tensor_args(self) -> list[Ref]:
        return [branch for branch in self.node.args[0].expr[1:] if isinstance(branch, Ref)]


@channel_rule(MODE_SELECT)
def mode_select_rule(ctx: RuleContext) -> None:
    """A mode select: its output carries the channels of both branches, which are coupled."""
    broadcast_rule(_BranchesContext(ctx._analysis, ctx.index, ctx.node, ctx.module))
