"""Write a pruning plan back into the user's original model: a pruned deep copy of the same class.

:func:`apply_plan` prunes a captured network (:func:`graph.pruning.prune_channels`) and :func:`write_back` copies
the result into a deep copy of the model the network was captured from, so the copy keeps its class, its methods
(``generate``, ``save_pretrained``) and its submodule names. Node names map back to the model: a leaf node is named
after its module path and a ``param`` node after its parameter path (a second call of the same module gets a
``_1`` suffix). Three steps follow the tensor copy:

* leaf modules' size attributes are synced from their new tensors (:func:`graph.layer_sync.sync_attributes`);
* the sizes that traced-into modules read in their forward are rewritten by the handlers registered for module
  classes (:data:`SIZE_REWRITERS`): every Hugging Face model inside the copy, at the root or held by the user's own
  module (a wrapper around ``AutoModelForCausalLM``, a classifier head around a backbone), gets its config fitted
  to the pruned shapes (:mod:`graph.config_fit`; per-stage list fields and sub-configs included) and its modules
  the attributes a model built from that config has; the int attributes of every other module are rewritten where
  they equal exactly one old width of the tensors below them; a module outside those models that holds a config
  none of them refitted is refused;
* the copy's output on the example inputs must equal the pruned network's, else :class:`PruningError` names the
  first module (in forward order) whose output differs or whose forward failed.
"""
from __future__ import annotations

import copy
import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn
from torch.utils._pytree import tree_map

from .capture import iter_tensors
from .config_fit import ConfigFitter, is_config, pin_head_dim, set_field, shapes_of, sub_configs
from .errors import PruningError
from .layer_sync import snapshot, sync_attributes
from .modules import FunctionalOp, ParameterNode
from .registry import registers_in


@dataclass
class SizeChanges:
    """What pruning changed, by module path of the copy: ``dims`` the ``(old, new)`` size of every dim of every tensor
    in the module's subtree; ``constants`` the int constants of ops called in the module's own forward that pruning
    rewrote (``split(64)`` -> ``split(48)``), old value -> set of new values (unchanged ones map to themselves)."""

    dims: dict[str, list[tuple[int, int]]]
    constants: dict[str, dict[int, set[int]]]


SIZE_REWRITERS: dict[str, Callable[[nn.Module, SizeChanges], None]] = {}
rewrites_sizes = registers_in(SIZE_REWRITERS)
"""Register ``rewrite(module, changes)`` under a class name: it rewrites the sizes of every module whose class (the
first name of its MRO found here) is registered, and of that module's whole subtree; ``"Module"`` is the fallback
for the rest of the model. ``module`` is the pruned copy's sub-module (tensors already replaced), ``changes`` the
:class:`SizeChanges` of pruning with paths relative to it."""

_SUFFIX = re.compile(r"^(.*)_(\d+)$")


def apply_plan(model: nn.Module, rnet, plan, root: str = "", inputs: tuple[tuple, dict] | None = None,
               rtol: float = 1e-5, fit_config: bool = True) -> nn.Module:
    """A pruned deep copy of ``model`` (same class, methods and submodule names); ``model`` is left untouched.

    ``rnet`` was captured from ``model.get_submodule(root)`` (``root=""``: the whole model; ``"backbone"``: a
    detector's backbone, whose pruned copy then runs inside the whole detector). ``plan`` maps channel groups of
    ``rnet`` to removed indices, as for :func:`graph.pruning.prune_channels`. See :func:`write_back` for ``inputs``,
    ``rtol`` and ``fit_config``.
    """
    return write_back(model, rnet, rnet.prune_channels(plan), root=root, inputs=inputs, rtol=rtol,
                      fit_config=fit_config)


def write_back(model: nn.Module, rnet, pruned, root: str = "", inputs: tuple[tuple, dict] | None = None,
               rtol: float = 1e-5, fit_config: bool = True) -> nn.Module:
    """A deep copy of ``model`` holding the tensors of ``pruned`` (``rnet``, captured from
    ``model.get_submodule(root)``, after pruning), with the sizes its forward reads rewritten, verified on ``inputs``.

    ``inputs`` is ``(args, kwargs)`` for the sub-module's forward (default: :func:`probe_inputs`, noise at the
    captured shapes); the copy's output must match the pruned network's to ``rtol`` relative to the
    output's largest magnitude. Raises :class:`PruningError` when a node names no module or parameter of the model,
    when a Hugging Face config cannot hold the pruned sizes (heads or widths that differ between layers, head
    pruning in a model that derives its head size from the hidden size, channels no config field counts:
    :func:`graph.config_plan.config_expressible_plan` restricts a plan to what the configs hold), when a module holds
    a config apply_plan cannot refit, or when verification fails.

    ``fit_config=False`` skips the registered rewriters (no Hugging Face config is refitted) and resizes every
    module's own attributes by tensor widths and rewritten constants alone: the way to keep pruned GPT-2 or BERT
    heads, whose sizes no config can hold. The copy is verified as always and runs, ``generate`` included, but
    ``from_pretrained`` cannot rebuild it from its unchanged config: save it with ``torch.save``.
    """
    top = copy.deepcopy(model)
    sub = model_submodule(top, root)
    new_tensors = _pruned_tensors(sub, pruned)
    changes = SizeChanges(_old_dims(top, new_tensors), _rewritten_constants(rnet, pruned, root))
    _replace_tensors(top, new_tensors)
    _rewrite_sizes(top, changes, fit_config)
    _verify(sub, pruned, inputs if inputs is not None else probe_inputs(pruned), rtol)
    return top


def probe_inputs(rnet) -> tuple[tuple, dict]:
    """``(args, kwargs)`` at the captured shapes for checking a write-back: floating-point tensors are seeded normal
    noise (tensors of ones would make every token or pixel alike and hide sizes such as an attention scale); integer
    tensors (token ids, masks) are ones, captured constants as captured."""
    generator = torch.Generator().manual_seed(0)

    def noise(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            return torch.randn(value.shape, generator=generator, dtype=value.dtype).to(value.device)
        return value
    return tree_map(noise, rnet.example_inputs())


def _rewrite_sizes(top: nn.Module, changes: SizeChanges, fit_config: bool) -> None:
    """Run the registered rewriter of every outermost module whose class has one (each Hugging Face model inside the
    copy, wherever it sits) on its subtree, when pruning changed a tensor there, then the fallback on the rest.
    Refuses a module outside them that holds a Hugging Face config none of them refitted, as its config would go
    stale. ``fit_config=False``: the fallback rewrites the whole copy and configs are left as they were."""
    claimed: list[str] = []
    refitted: set[int] = set()
    for name, module in top.named_modules() if fit_config else ():
        rewriter = _own_rewriter(module)
        if rewriter is None or any(within(name, owner) for owner in claimed):
            continue
        claimed.append(name)
        relative = _relative(changes, name)
        if any(old != new for old, new in relative.dims.get("", ())):
            rewriter(module, relative)
            refitted.update(id(config) for config in _configs_of(module))
    for name, module in top.named_modules() if fit_config else ():
        config = getattr(module, "config", None)
        if is_config(config) and id(config) not in refitted and not any(within(name, owner) for owner in claimed) \
                and any(old != new for old, new in changes.dims.get(name, ())):
            raise PruningError(f"{name or 'the model'} ({type(module).__name__}) holds a {type(config).__name__} that "
                               "apply_plan cannot refit (it refits the configs of Hugging Face PreTrainedModels), so "
                               "it would no longer describe the pruned sizes; pass fit_config=False to keep it as it "
                               "is")
    rest = SizeChanges({path: dims for path, dims in changes.dims.items()
                        if not any(within(path, owner) for owner in claimed)}, changes.constants)
    _rewrite_by_width(top, rest)


def _own_rewriter(module: nn.Module) -> Callable[[nn.Module, SizeChanges], None] | None:
    """The rewriter registered for the module's class (first name of its MRO), other than the fallback."""
    return next((SIZE_REWRITERS[cls.__name__] for cls in type(module).__mro__
                 if cls.__name__ in SIZE_REWRITERS and cls is not nn.Module), None)


def within(path: str, owner: str) -> bool:
    """True when module path ``path`` is ``owner`` or inside it (every path is inside the root, ``""``)."""
    return owner == "" or path == owner or path.startswith(owner + ".")


def _relative(changes: SizeChanges, owner: str) -> SizeChanges:
    """``changes`` of the subtree at ``owner``, keyed by paths relative to it."""
    def strip(path: str) -> str:
        return path[len(owner) + 1:] if owner else path
    return SizeChanges({strip(p): d for p, d in changes.dims.items() if within(p, owner)},
                       {strip(p): c for p, c in changes.constants.items() if within(p, owner)})


def _configs_of(module: nn.Module) -> list:
    config = getattr(module, "config", None)
    return list(sub_configs(config)) if is_config(config) else []


def _rewritten_constants(rnet, pruned, root: str) -> dict[str, dict[int, set[int]]]:
    """Per module path of the copy: the int constants of functional ops called in that module's forward, each
    before pruning -> its values after."""
    constants: dict[str, dict[int, set[int]]] = defaultdict(lambda: defaultdict(set))
    for before, after in zip(rnet.graph_nodes, pruned.graph_nodes):
        if before.key is None or not isinstance(rnet.nodes[before.key], FunctionalOp):
            continue
        scope = ".".join(p for p in (root, before.name.rpartition(".")[0]) if p)
        for old, new in _int_pairs((before.args, before.kwargs), (after.args, after.kwargs)):
            constants[scope][old].add(new)
    return constants


def _int_pairs(before: Any, after: Any) -> Iterator[tuple[int, int]]:
    """``(old, new)`` for every int at the same place of two argument structures; an int that became a list of
    equal ints (``split(64)`` rewritten as ``split([48, 48, 48])``) pairs with that int."""
    if type(before) is int and type(after) is int:
        yield before, after
    elif type(before) is int and isinstance(after, (tuple, list)) and after and len(set(after)) == 1 \
            and type(after[0]) is int:
        yield before, after[0]
    elif isinstance(before, (tuple, list)) and isinstance(after, (tuple, list)):
        for a, b in zip(before, after):
            yield from _int_pairs(a, b)
    elif isinstance(before, dict) and isinstance(after, dict):
        for key in before.keys() & after.keys():
            yield from _int_pairs(before[key], after[key])


def model_submodule(top: nn.Module, root: str) -> nn.Module:
    """``top.get_submodule(root)``, or a :class:`PruningError` saying the model has no such sub-module."""
    try:
        return top.get_submodule(root)
    except AttributeError:
        raise PruningError(f"the model has no sub-module {root!r} to write the pruned network into") from None


def _model_path(name: str, table: dict[str, Any]) -> str | None:
    """The module or tensor path a node name stands for: the name itself, or the name without a repeat suffix."""
    if name in table:
        return name
    match = _SUFFIX.match(name)
    return match.group(1) if match and match.group(1) in table else None


def named_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of ``module`` by path, each tied tensor under all of its names."""
    return {**dict(module.named_parameters(remove_duplicate=False)),
            **dict(module.named_buffers(remove_duplicate=False))}


def node_sources(sub: nn.Module, pruned) -> Iterator[tuple[Any, str, nn.Module]]:
    """``(node, model path, node module)`` for every leaf-module and parameter node of ``pruned`` (a network
    captured from ``sub``, pruned or not); :class:`PruningError` for a node that names nothing in ``sub``."""
    modules = dict(sub.named_modules(remove_duplicate=False))
    tensors = named_tensors(sub)
    for node in pruned.graph_nodes:
        if node.key is None or node.op == "constant":
            continue
        module = pruned.nodes[node.key]
        if isinstance(module, FunctionalOp):
            continue
        table = tensors if isinstance(module, ParameterNode) else modules
        path = _model_path(node.name, table)
        if path is None:
            what = "parameter or buffer" if table is tensors else "sub-module"
            raise PruningError(f"{node.describe()} names no {what} of the model; was the network captured from this "
                               "model (and this root)?")
        yield node, path, module


def _pruned_tensors(sub: nn.Module, pruned) -> dict[int, torch.Tensor]:
    """``id`` of each of the copy's tensors whose shape pruning changed -> its pruned replacement."""
    tensors = named_tensors(sub)
    new: dict[int, torch.Tensor] = {}
    for node, path, module in node_sources(sub, pruned):
        if isinstance(module, ParameterNode):
            pairs = [(path, module.value)]
        else:
            pairs = [(f"{path}.{name}", t) for name, t in [*module.named_parameters(), *module.named_buffers()]]
        for name, tensor in pairs:
            old = tensors.get(name)
            if old is None or tensor.shape == old.shape:
                continue
            if id(old) in new and new[id(old)].shape != tensor.shape:
                raise PruningError(f"{name} is pruned to {tuple(new[id(old)].shape)} at one use and to "
                                   f"{tuple(tensor.shape)} at {node.describe()}")
            if tensor.dim() != old.dim():
                raise PruningError(f"{node.describe()} holds {name} with shape {tuple(tensor.shape)}, the model "
                                   f"{tuple(old.shape)}")
            value = tensor.detach().clone()
            new[id(old)] = nn.Parameter(value, requires_grad=old.requires_grad) if isinstance(old, nn.Parameter) \
                else value
    return new


def _old_dims(top: nn.Module, new_tensors: dict[int, torch.Tensor]) -> dict[str, list[tuple[int, int]]]:
    """For every module path of the (unpruned) copy: ``(old size, new size)`` of every dim of every tensor in its
    subtree, the widths the size rewriters compare attributes with."""
    dims: dict[str, list[tuple[int, int]]] = {name: [] for name, _ in top.named_modules()}
    for name, module in top.named_modules():
        own = [(old, new) for tensor in [*module._parameters.values(), *module._buffers.values()] if tensor is not None
               for old, new in zip(tensor.shape, new_tensors.get(id(tensor), tensor).shape)]
        parts = name.split(".") if name else []
        for depth in range(len(parts) + 1):
            dims[".".join(parts[:depth])].extend(own)
    return dims


def _replace_tensors(top: nn.Module, new_tensors: dict[int, torch.Tensor]) -> None:
    """Put every replacement wherever the copy holds the replaced tensor (so tied weights stay tied), then sync the
    size attributes of the modules that changed."""
    for module in top.modules():
        slots = [(table, name) for table in (module._parameters, module._buffers)
                 for name, tensor in table.items() if tensor is not None and id(tensor) in new_tensors]
        if not slots:
            continue
        old = snapshot(module)
        for table, name in slots:
            table[name] = new_tensors[id(table[name])]
        sync_attributes(module, old)


@rewrites_sizes("Module")
def _rewrite_by_width(top: nn.Module, changes: SizeChanges) -> None:
    """Any model: an int attribute of a traced-into module that equals an old width of the tensors below it is set to
    the new width when all dims of that old width agree on it; an attribute named after heads (``num_heads``) is
    scaled by the head size (``head_dim``). Where dims of that width disagree (a pruned head projection beside the
    unpruned hidden size, both 64 wide), the constants pruning rewrote in the module's own forward decide
    (``split(self.split_size)``); if they do not, the attribute is left for verification to judge."""
    for name, module in top.named_modules():
        dims = changes.dims.get(name, ())
        if not any(old != new for old, new in dims):
            continue
        head_dim = next((getattr(module, a) for a in ("head_dim", "attention_head_size")
                         if isinstance(getattr(module, a, None), int)), None)
        constants = changes.constants.get(name, {})
        for attribute, value in list(vars(module).items()):
            if type(value) is not int or attribute.startswith("_"):
                continue
            counts_heads = "head" in attribute and not any(w in attribute for w in ("dim", "size"))
            unit = head_dim if counts_heads and head_dim else 1
            targets = {new // unit for old, new in dims if old == value * unit and new % unit == 0}
            if len(targets) > 1:
                targets = {new // unit for new in constants.get(value * unit, ()) if new % unit == 0}
            if len(targets) == 1 and value not in targets:
                setattr(module, attribute, targets.pop())


@rewrites_sizes("PreTrainedModel")
def _rewrite_hf_config(model: nn.Module, changes: SizeChanges) -> None:
    """A Hugging Face model: fit its config's size fields to the pruned shapes (so ``save_pretrained`` and
    ``from_pretrained`` round-trip), then give every module the int attributes a model built from it would have."""
    fitter = ConfigFitter(model)
    fields = fitter.fit(shapes_of(model))
    pin_head_dim(model.config)
    for field, value in fields.items():
        set_field(model.config, field, value)
    after = fitter.build(model.config)
    modules, old_modules = dict(model.named_modules()), dict(fitter.before.named_modules())
    for name, module in after.named_modules():
        target, old = modules.get(name), old_modules.get(name)
        if target is None or old is None:
            continue
        for attribute, value in vars(module).items():
            if type(value) is int and vars(old).get(attribute) != value and type(vars(target).get(attribute)) is int:
                setattr(target, attribute, value)


def _verify(sub: nn.Module, pruned, inputs: tuple[tuple, dict], rtol: float) -> None:
    """Run the copy's sub-module and the pruned network on ``inputs``; when their outputs differ (or the copy fails),
    raise naming the module to blame: the first leaf (in forward order) whose output differs, if its inputs agree,
    else the module that computed its inputs."""
    args, kwargs = inputs
    sources = {node.name: path for node, path, module in node_sources(sub, pruned)
               if not isinstance(module, ParameterNode)}
    expected: list[tuple[Any, str, tuple, Any]] = []
    calls, running, handles = _record_calls(sub)
    modes = [(m, m.training) for m in (sub, pruned)]
    failure = None
    try:
        sub.eval(), pruned.eval()
        with torch.no_grad():
            reference = pruned.observe(lambda node, a, k, out: node.name in sources and expected.append(
                (node, sources[node.name], a, out)), *args, **kwargs)
            try:
                actual = sub(*args, **kwargs)
            except Exception as error:
                failure = error
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes:
            module.train(training)
    if failure is None and _close(actual, reference, rtol):
        return
    what = f"fails ({failure})" if failure is not None else "computes another output than the pruned network"
    seen: dict[str, int] = {}
    for node, path, node_args, out in expected:
        index = seen[path] = seen.get(path, -1) + 1
        record = calls.get(path, [])[index] if index < len(calls.get(path, [])) else None
        if record is not None and record[1] is not _MISSING and _close(record[1], out, rtol):
            continue
        culprit = path if record is not None and _close(record[0], node_args, rtol) else _producer(pruned, node, sub)
        raise PruningError(f"the pruned copy {what}: from {node.describe()} on its values differ; the forward of "
                           f"{_describe(sub, culprit)} depends on a size apply_plan could not rewrite") from failure
    culprit = running[-1] if failure is not None and running else ""
    raise PruningError(f"the pruned copy {what} though every captured module agrees; the forward of "
                       f"{_describe(sub, culprit)} depends on a size apply_plan could not rewrite") from failure


_MISSING = object()


def _record_calls(sub: nn.Module) -> tuple[dict[str, list[list]], list[str], list]:
    """Hooks on every module of ``sub``: ``calls[path]`` gets ``[args, output]`` per call (output ``_MISSING`` until
    it returns) and ``running`` the stack of modules being run; returns them with the hook handles."""
    names = {id(module): name for name, module in sub.named_modules(remove_duplicate=False)}
    calls: dict[str, list[list]] = {}
    running: list[str] = []

    def enter(module: nn.Module, args: tuple) -> None:
        running.append(names[id(module)])
        calls.setdefault(running[-1], []).append([args, _MISSING])

    def leave(module: nn.Module, args: tuple, output: Any) -> None:
        calls[running.pop()][-1][1] = output

    handles = [hook for module in sub.modules()
               for hook in (module.register_forward_pre_hook(enter), module.register_forward_hook(leave))]
    return calls, running, handles


def _producer(pruned, node, sub: nn.Module) -> str:
    """The module that computed ``node``'s first input: a leaf's path, or the scope a functional node ran in."""
    modules = dict(sub.named_modules())
    for index in node.inputs:
        producer = pruned.graph_nodes[index]
        if producer.op in ("input", "param", "constant"):
            continue
        name = producer.name if producer.key and not isinstance(pruned.nodes[producer.key], FunctionalOp) \
            else producer.name.rpartition(".")[0]
        return _model_path(name, modules) or ""
    return ""


def _describe(sub: nn.Module, path: str) -> str:
    return f"{path or 'the root'} ({type(sub.get_submodule(path)).__name__})"


def _close(actual: Any, expected: Any, rtol: float) -> bool:
    """True when both nested outputs hold tensors of the same shapes that agree to ``rtol`` of the largest value."""
    a, b = list(iter_tensors(actual)), list(iter_tensors(expected))
    if [p for p, _ in a] != [p for p, _ in b]:
        return False
    for (_, x), (_, y) in zip(a, b):
        if x.shape != y.shape:
            return False
        if x.is_floating_point() or y.is_floating_point():
            scale = y.abs().max().item() if y.numel() else 0.0
            if y.numel() and (x - y).abs().max().item() > rtol * max(scale, 1e-12):
                return False
        elif not torch.equal(x, y):
            return False
    return True
