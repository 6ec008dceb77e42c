"""``copy.deepcopy`` of an ``nn.Module``, faster.

Every module holds a dozen hook and state dicts (``_forward_hooks``, ``_state_dict_pre_hooks`` …) that are almost
always empty; ``copy.deepcopy`` rebuilds each through ``__reduce_ex__``, which is most of the Python time of copying
a network of hundreds of small modules (capture copies the model, pruning copies the network). Putting fresh empty
containers in the memo up front gives the same copy in about two thirds of the time.
"""
from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Any, TypeVar

import torch.nn as nn

_EMPTY_CONTAINER_TYPES = (OrderedDict, dict, set, list)
ModuleT = TypeVar("ModuleT", bound=nn.Module)


def deepcopy_module(module: ModuleT, memo: dict[int, Any] | None = None) -> ModuleT:
    """``copy.deepcopy(module, memo)``: the same independent copy (shared objects stay shared), made faster by
    memoising a fresh container for every empty dict, ordered dict, set or list held directly by a submodule."""
    memo = {} if memo is None else memo
    for submodule in module.modules():
        for value in vars(submodule).values():
            if type(value) in _EMPTY_CONTAINER_TYPES and not value and id(value) not in memo:
                memo[id(value)] = type(value)()
    return copy.deepcopy(module, memo)
