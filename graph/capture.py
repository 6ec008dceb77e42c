"""Capture: run a real forward pass and record every op it executes as graph nodes.

Module forward hooks see module calls (leaf modules become one node each, others are traced into and give node
names their scope); a ``TorchFunctionMode`` sees every torch function and ``Tensor`` method in between. Because the
real forward runs, Python control flow, asserts and shape-dependent code just work; sizes read from tensors are
:class:`~graph.symbolic.TracedInt` so replay recomputes them, and branches on them become guards.
"""
from __future__ import annotations

import builtins
import inspect
import os
import sys
from collections import Counter
from functools import lru_cache
from typing import Any, Iterator

import torch
import torch.nn as nn
from torch.autograd.function import Function
from torch.overrides import TorchFunctionMode

from . import oplib, symbolic
from .errors import CaptureError
from .generalize import generalize_size_one, grown_inputs
from .ir import Node, Ref, Struct, Sym, iter_refs
from .leaves import leaf_type
from .module_copy import deepcopy_module
from .modes import branches_on_training, merge_modes
from .modules import ConstantNode, FunctionalOp, ParameterNode, make_functional
from .oplib import OpKind
from .symbolic import TracedFloat, TracedInt, TracedSize, TrainingFlag

_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_OWN_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
_SCALARS = (bool, int, float, complex)
_PLAIN_CONSTANTS = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.layout,
                    torch.memory_format, type(Ellipsis))
# What an output may hold besides containers; any other object (a key/value cache, say) would replay frozen.
_REPLAYABLE_LEAVES = (torch.Tensor, torch.device, TrainingFlag, *_PLAIN_CONSTANTS)
# Reads of a one-element tensor's value that capture can replay when the tensor depends only on sizes and constants.
_VALUE_READS = {"Tensor.item": None, "Tensor.__bool__": bool, "Tensor.__int__": int, "Tensor.__index__": int,
                "Tensor.__float__": float}


def source_line() -> str | None:
    """``file:line in function`` of the innermost caller outside torch and this package.

    The walk starts at the direct caller rather than a fixed depth: Tensor methods implemented in C reach the
    function mode with no Python frame of torch's in between, so a fixed depth would skip the user's line.
    """
    frame = sys._getframe(1)
    while frame is not None:
        filename = frame.f_code.co_filename
        if not (filename.startswith(_TORCH_DIR) or filename.startswith(_OWN_DIR)) and "<frozen" not in filename:
            return f"{_short_path(filename)}:{frame.f_lineno} in {frame.f_code.co_name}"
        frame = frame.f_back
    return None


def _short_path(filename: str) -> str:
    return _path_below(filename, tuple(sys.path))


@lru_cache(maxsize=4096)
def _path_below(filename: str, search_path: tuple[str, ...]) -> str:
    """``filename`` relative to the longest entry of ``search_path`` holding it (cached: every node asks)."""
    for root in sorted((p for p in search_path if p), key=len, reverse=True):
        if filename.startswith(root + os.sep):
            return os.path.relpath(filename, root)
    return filename


def iter_leaves(value: Any, path: tuple = ()) -> Iterator[tuple[tuple, Any]]:
    """``(path, value)`` for every non-container value in a nested output (tuples, lists, dicts, ``ModelOutput``)."""
    if isinstance(value, (tuple, list)):
        for i, item in enumerate(value):
            yield from iter_leaves(item, path + (i,))
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from iter_leaves(item, path + (key,))
    else:
        yield path, value


def iter_tensors(value: Any, path: tuple = ()) -> Iterator[tuple[tuple, torch.Tensor]]:
    """``(path, tensor)`` for every tensor in a nested output (tuples, lists, dicts, ``ModelOutput``)."""
    return ((p, leaf) for p, leaf in iter_leaves(value, path) if isinstance(leaf, torch.Tensor))


def describe(value: Any) -> Any:
    """Shapes of a nested output: a tuple per tensor, lists/dicts mirroring containers, ``None`` otherwise."""
    if isinstance(value, torch.Tensor):
        return tuple(value.shape)
    if isinstance(value, (tuple, list)):
        return [describe(v) for v in value]
    if isinstance(value, dict):
        return {k: describe(v) for k, v in value.items()}
    return None


def plain(value: Any) -> Any:
    """The value with traced ints/floats/sizes/training flags replaced by plain Python values."""
    if isinstance(value, TracedInt):
        return value.value
    if isinstance(value, TracedFloat):
        return value.value
    if isinstance(value, TrainingFlag):
        return value.value
    if isinstance(value, (list, tuple)) and not isinstance(value, torch.Size):
        if not any(isinstance(v, (TracedInt, TracedFloat, TrainingFlag, list, tuple, dict, slice)) for v in value):
            return value
        items = [plain(v) for v in value]
        if hasattr(value, "_fields"):
            return type(value)(*items)
        return items if isinstance(value, list) else tuple(items)
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, slice):
        return slice(plain(value.start), plain(value.stop), plain(value.step))
    return value


def _contains_tensor(value: Any) -> bool:
    return next(iter_tensors(value), None) is not None


class Tracer(TorchFunctionMode):
    """Records one forward pass of ``root`` into :class:`~graph.ir.Node` records and their modules."""

    def __init__(self, root: nn.Module):
        super().__init__()
        self.root = root
        self.nodes: list[Node] = []
        self.node_modules: list[nn.Module | None] = []
        self.guards: dict[tuple, str | None] = {}
        self.signature = inspect.signature(root.forward)
        self.input_constants: dict[str, Any] = {}
        self.output_template: Any = None
        self.example_inputs: tuple[tuple, dict] | None = None  # the root's (args, kwargs) of the recorded call
        self.training = root.training
        self.grad_at_start = True  # grad mode at start(): nodes record no_grad only where the forward turned it off
        self._device: torch.device | None = None
        self._producer: dict[int, Ref] = {}
        self._shape_only: set[int] = set()
        self._alive: list[Any] = []
        self._tensor_names: dict[int, str] = {}
        self._module_names: dict[int, str] = {}
        self._scope: list[str] = []
        self._pending_leaf: list[tuple] = []
        self._leaf_depth = 0
        self._mode_lifted = False  # True while a leaf module runs with this mode off the torch-function stack
        self._paused = 0
        self._names: Counter = Counter()
        self._handles: list = []
        self._saved_training: list[tuple[nn.Module, bool]] = []
        self._saved_range = None
        self._saved_apply = None
        self._saved_exporting = False
        self._started = self._finished = False
        for name, tensor in [*root.named_parameters(remove_duplicate=False), *root.named_buffers(remove_duplicate=False)]:
            self._tensor_names.setdefault(id(tensor), name)
        for name, module in root.named_modules(remove_duplicate=False):
            self._module_names.setdefault(id(module), name)

    # ----------------------------------------------------------------- lifecycle
    def start(self) -> "Tracer":
        """Install hooks, training flags and the function mode; the next forward of ``root`` is recorded."""
        if symbolic._recorder is not None:
            raise CaptureError("another capture is already running; end it first (insertCaptureBoundaryEnd)")
        seen: set[int] = set()
        for module in self.root.modules():
            if id(module) in seen:
                continue
            seen.add(id(module))
            self._handles.append(module.register_forward_pre_hook(self._pre_hook, with_kwargs=True))
            self._handles.append(module.register_forward_hook(self._post_hook, with_kwargs=True))
        for module in self._traced_into_modules():
            self._saved_training.append((module, module.training))
            module.__dict__["training"] = TrainingFlag(module.training)
        self._saved_range = builtins.range
        builtins.range = symbolic.guarded_range
        self._saved_apply = Function.__dict__["apply"]
        Function.apply = classmethod(self._guarded_apply)
        # Capture, like torch.export, must record a graph valid for every input: libraries that ask
        # torch.compiler.is_exporting() then skip data-dependent shortcuts (transformers materialises attention
        # masks instead of checking whether this particular mask has padding).
        self._saved_exporting = torch.compiler._is_exporting_flag
        torch.compiler._is_exporting_flag = True
        self.grad_at_start = torch.is_grad_enabled()
        symbolic.set_recorder(self)
        self.__enter__()
        self._started = True
        return self

    def stop(self) -> None:
        """Remove everything :meth:`start` installed; safe to call twice and after a failed forward."""
        if not self._started:
            return
        self._started = False
        self._restore_mode()
        self.__exit__(None, None, None)
        symbolic.set_recorder(None)
        builtins.range = self._saved_range
        Function.apply = self._saved_apply
        torch.compiler._is_exporting_flag = self._saved_exporting
        for module, training in self._saved_training:
            module.__dict__["training"] = training
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._alive.clear()

    def _traced_into_modules(self) -> Iterator[nn.Module]:
        stack, seen = [self.root], set()
        while stack:
            module = stack.pop()
            if id(module) in seen or leaf_type(module) is not None:
                continue
            seen.add(id(module))
            yield module
            stack.extend(module.children())

    # ---------------------------------------------------------------- guards
    def _guarded_apply(self, function: type, *args: Any, **kwargs: Any) -> Any:
        """``Function.apply`` during capture: a custom autograd Function applied by the recorded forward itself (not
        inside a leaf module or a recorded op) is refused, since replaying its traced forward would lose its custom
        backward, with or without grad mode."""
        if not self._paused and not self._leaf_depth and torch._C._is_torch_function_mode_enabled():
            raise CaptureError(
                f"the custom autograd Function {function.__name__} is applied at {source_line()}; its backward "
                "cannot be replayed from recorded ops. Make the module that applies it a leaf, or capture without it.")
        return self._saved_apply.__get__(None, function)(*args, **kwargs)

    def add_guard(self, expr: Any, value: Any) -> None:
        """Remember that replay must find ``expr == value`` (called by traced ints on control flow)."""
        if self._leaf_depth == 0 and (expr, value) not in self.guards:
            self.guards[(expr, value)] = source_line()

    # ----------------------------------------------------------------- module hooks
    # Hooks run with this mode lifted off the torch-function stack, so the tensor attributes they read (shapes,
    # dtypes) do not go through __torch_function__; it stays lifted while a leaf module runs.
    def _pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._lift_mode()
        self._paused += 1
        try:
            self._enter_module(module, args, kwargs)
        finally:
            self._paused -= 1
            if not self._leaf_depth:
                self._restore_mode()

    def _post_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        self._lift_mode()
        self._paused += 1
        try:
            self._exit_module(module, output)
        finally:
            self._paused -= 1
            if not self._leaf_depth:
                self._restore_mode()

    def _enter_module(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._leaf_depth:
            self._leaf_depth += 1
            return
        if module is self.root:
            if self._finished:
                raise CaptureError("the captured module was called twice between the capture boundaries")
            self._record_inputs(args, kwargs)
            self.example_inputs = (args, kwargs)
        if leaf_type(module) is not None:
            self._pending_leaf.append((module, self.template(args), self.template(kwargs), source_line(),
                                       torch.is_grad_enabled()))
            self._leaf_depth = 1
        else:
            self._scope.append(self._module_names.get(id(module), type(module).__name__))

    def _lift_mode(self) -> None:
        """Take this mode off the torch-function stack (for hooks and while a leaf module runs): nothing there is
        recorded, and every op would otherwise go through the mode's dispatch (most of capture's overhead on
        BatchNorm-heavy networks). Left in place when the forward pushed a mode of its own on top."""
        depth = torch._C._len_torch_function_stack()
        if depth and torch._C._get_function_stack_at(depth - 1) is self:
            torch._C._pop_torch_function_stack()
            self._mode_lifted = True

    def _restore_mode(self) -> None:
        """Put back the mode :meth:`_lift_mode` took off (after a hook, when a leaf returns, when a failed capture
        stops)."""
        if self._mode_lifted:
            torch._C._push_on_torch_function_stack(self)
            self._mode_lifted = False

    def _exit_module(self, module: nn.Module, output: Any) -> None:
        if self._leaf_depth > 1:
            self._leaf_depth -= 1
            return
        if self._leaf_depth == 1:
            self._leaf_depth = 0
            leaf, arg_template, kwarg_template, source, grad = self._pending_leaf.pop()
            name = self._module_names.get(id(leaf), type(leaf).__name__) or type(leaf).__name__
            self._add_node(name, leaf_type(leaf).__name__, leaf, arg_template, kwarg_template, source, output, grad)
        else:
            self._scope.pop()
        if module is self.root:
            opaque = next(((p, leaf) for p, leaf in iter_leaves(output) if not isinstance(leaf, _REPLAYABLE_LEAVES)),
                          None)
            if opaque is not None:
                path, obj = opaque
                raise CaptureError(
                    f"the forward returns a {type(obj).__name__} object at output{''.join(f'[{k!r}]' for k in path)}, "
                    "which replay cannot rebuild (only tensors, plain constants and tuples, lists, dicts or "
                    "ModelOutputs of them); make the forward return tensors instead (for a transformers model "
                    "that returns its key/value cache: pass use_cache=False)")
            self.output_template = self.template(output)
            self._finished = True

    # ----------------------------------------------------------------- function mode
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self._leaf_depth or self._paused or not self._scope:
            return func(*args, **kwargs)
        if torch._C._functorch.maybe_current_level() is not None:
            raise CaptureError(
                f"{getattr(func, '__qualname__', func)!r} runs inside a torch.func transform (vmap, grad, jacrev, ...) "
                f"at {source_line()}; ops on the transform's batched or wrapped tensors cannot be recorded as graph "
                "nodes. Write that part with ordinary broadcasting ops, or make the module that uses it a leaf.")
        name = oplib.name_of(func)
        kind = oplib.kind_of(name)
        if kind is OpKind.SIZE:
            return self._traced_size(name, args, kwargs)
        if kind is OpKind.METADATA:
            return func(*plain(args), **plain(kwargs))
        if kind is OpKind.DATA_TO_PYTHON:
            return self.read_value(name, args)
        involves_tensors = _contains_tensor((args, kwargs))
        if name is None or not oplib.is_replayable(name):
            if involves_tensors:
                raise CaptureError(
                    f"unsupported op {getattr(func, '__qualname__', func)!r} called at {source_line()}: it is not "
                    "on the allow-list of replayable torch functions, so the graph could not reproduce it")
            out = func(*plain(args), **plain(kwargs))
            if _contains_tensor(out):
                raise CaptureError(f"unsupported op {func!r} called at {source_line()} created a tensor")
            return out
        arg_template, kwarg_template = self.template(args), self.template(kwargs)
        out = func(*plain(args), **plain(kwargs))
        if name == "Tensor.__setitem__":
            self._add_functional(name, arg_template, kwarg_template, args[0])
            return out
        if _contains_tensor(out):
            self._add_functional(name, arg_template, kwarg_template, out)
        elif isinstance(out, _SCALARS) and involves_tensors:
            raise self._data_to_python_error(name)
        return out

    def read_value(self, name: str, args: tuple) -> Any:
        """A Python value read from a tensor (``bool(t)``, ``t.item()``, ``int(t)``) during capture.

        Allowed only when the tensor was computed from sizes and constants alone (``torch.arange(n)``, masks built
        from it), never from input data or parameters: replay recomputes it, so ``t.item()`` returns a traced number
        whose expression reads the replayed value, and a conversion records a guard that replay re-checks.
        """
        tensor = args[0] if args else None
        if name not in _VALUE_READS or not isinstance(tensor, torch.Tensor):
            raise self._data_to_python_error(name)
        ref = self._ref(tensor)
        if ref.index not in self._shape_only:
            raise self._data_to_python_error(name)
        value = tensor.item()
        expr = ("item", ref)
        if name == "Tensor.item" and type(value) in (int, float):
            return symbolic.traced(value, expr)
        self.add_guard(expr, value)
        convert = _VALUE_READS[name]
        return value if convert is None else convert(value)

    def _data_to_python_error(self, name: str) -> CaptureError:
        return CaptureError(
            f"{name} at {source_line()} turns tensor data into a Python value, so the captured graph would depend "
            "on this particular input (data-dependent control flow). Use tensor ops instead (torch.where, masks), "
            "or capture the part of the network that does not need it.")

    def _traced_size(self, name: str, args: tuple, kwargs: dict) -> Any:
        tensor = args[0]
        ref = self._ref(tensor)
        sizes = TracedSize(TracedInt(size, ("size", ref, dim)) for dim, size in enumerate(tensor.shape))
        if name == "Tensor.size":
            dim = args[1] if len(args) > 1 else kwargs.get("dim")
            return sizes if dim is None else sizes[plain(dim)]
        if name == "Tensor.shape":
            return sizes
        if name == "Tensor.__len__":
            if not sizes:
                raise TypeError("len() of a 0-d tensor")
            return sizes[0]
        return sizes.numel()

    # ----------------------------------------------------------------- templates
    def template(self, value: Any) -> Any:
        """The argument template of ``value``: tensors become :class:`Ref`, traced numbers :class:`Sym`."""
        if isinstance(value, torch.Tensor):
            return self._ref(value)
        if isinstance(value, (TracedInt, TracedFloat, TrainingFlag)):
            return Sym(value.expr)
        if isinstance(value, _PLAIN_CONSTANTS):
            return value
        if isinstance(value, torch.device):
            return Sym(("device",)) if value == self._device else value
        if isinstance(value, tuple) and hasattr(value, "_fields"):
            return Struct(type(value), {f: self.template(getattr(value, f)) for f in value._fields})
        if isinstance(value, (tuple, list)):
            items = [self.template(v) for v in value]
            return items if isinstance(value, list) else tuple(items)
        if isinstance(value, dict):
            fields = {k: self.template(v) for k, v in value.items()}
            return fields if type(value) is dict else Struct(type(value), fields)
        if isinstance(value, slice):
            return slice(self.template(value.start), self.template(value.stop), self.template(value.step))
        return value

    def _ref(self, tensor: torch.Tensor) -> Ref:
        ref = self._producer.get(id(tensor))
        if ref is not None:
            return ref
        name = self._tensor_names.get(id(tensor))
        if name is not None:
            index = self._add_node(name, "param", ParameterNode(tensor), (), {}, source_line(), tensor, True)
        elif tensor.grad_fn is not None:
            raise CaptureError(
                f"a tensor used at {source_line()} was computed outside the captured forward (it has a "
                f"{type(tensor.grad_fn).__name__} history but no recorded producer), so replay could not recompute it")
        else:
            scope = self._scope[-1] if self._scope else ""
            index = self._add_node(f"{scope}.constant" if scope else "constant", "constant",
                                   ConstantNode(tensor.detach().clone()), (), {}, source_line(), tensor, True)
        return Ref(index)

    # ----------------------------------------------------------------- nodes
    def _record_inputs(self, args: tuple, kwargs: dict) -> None:
        bound = self.signature.bind(*args, **kwargs)
        for param_name, value in bound.arguments.items():
            self._record_input(param_name, (param_name,), value)
        # Arguments left at their defaults are constants too: replay must refuse a value the graph never saw.
        passed = set(bound.arguments)
        bound.apply_defaults()
        for param_name, value in bound.arguments.items():
            if param_name not in passed:
                self.input_constants[(param_name,)] = value

    def _record_input(self, name: str, path: tuple, value: Any) -> None:
        if isinstance(value, torch.Tensor):
            if self._device is None:
                self._device = value.device
            index = self._add_node(name, "input", None, (), {}, None, value, True)
            self.nodes[index].meta["path"] = path
        elif isinstance(value, (tuple, list)) and any(isinstance(v, torch.Tensor) for v in value):
            for i, item in enumerate(value):
                self._record_input(f"{name}_{i}", path + (i,), item)
        elif isinstance(value, dict) and any(isinstance(v, torch.Tensor) for v in value.values()):
            for key, item in value.items():
                self._record_input(f"{name}_{key}", path + (key,), item)
        else:
            self.input_constants[path] = value

    def _add_functional(self, target: str, args: Any, kwargs: Any, output: Any) -> int:
        scope = self._scope[-1] if self._scope else ""
        short = oplib.short_name(target)
        name = f"{scope}.{short}" if scope else short
        return self._add_node(name, target, make_functional(target), args, kwargs, source_line(), output,
                              torch.is_grad_enabled())

    def _add_node(self, name: str, op: str, module: nn.Module | None, args: Any, kwargs: Any, source: str | None,
                  output: Any, grad_enabled: bool) -> int:
        index = len(self.nodes)
        self._names[name] += 1
        if self._names[name] > 1:
            name = f"{name}_{self._names[name] - 1}"
        meta = {"out": describe(output)}
        if isinstance(output, torch.Tensor):
            meta["dtype"] = str(output.dtype).replace("torch.", "")
        if self.grad_at_start and not grad_enabled:  # the forward itself turned grad off here
            meta["no_grad"] = True
        self.nodes.append(Node(name=name, op=op, args=args, kwargs=kwargs, source=source, meta=meta))
        self.node_modules.append(module)
        if op == "constant" or (isinstance(module, FunctionalOp) and all(
                ref.index in self._shape_only for ref in iter_refs((args, kwargs), through_sym=False))):
            self._shape_only.add(index)
        for path, tensor in iter_tensors(output):
            self._producer[id(tensor)] = Ref(index, path)
            self._alive.append(tensor)
        return index


def capture(model: nn.Module, *example_inputs: Any, **example_kwargs: Any):
    """Run ``model`` on the example inputs and return the :class:`~graph.network.ReconstructedNetwork` it executed.

    The model is deep-copied first, so it is never modified (not even BatchNorm statistics in train mode), and the
    network starts from the model's state: buffers the example forward updated are reset to the model's. The
    network starts in the model's mode and replays in both: where the forward branches on ``self.training``, the
    other mode is captured too and merged in (:mod:`graph.modes`), ops that only one mode runs included; only when
    the other mode cannot run on the example (nor at batch 2) does replay in it raise
    :class:`~graph.errors.ReplayError` naming the branch. Capture under ``torch.no_grad()`` is fine: only the regions
    the forward itself runs without grad replay without grad. When a guard read a size that was 1 in the example
    (one prompt), the forward is traced again at size 2 and that general graph is kept if it replays the example
    exactly (:mod:`graph.generalize`), so a batch-1 example replays at any batch size the model allows.

    Inputs may be positional or keyword, tensors of any dtype (token ids, masks) or constants; arguments left at
    their defaults are constants too, so replay refuses a value the capture never saw. The output comes back in the
    same structure (tuples, lists, dicts, named tuples, ``ModelOutput``s); any other object in it raises
    :class:`~graph.errors.CaptureError` — for a transformers model with a key/value cache, pass ``use_cache=False``.
    During capture ``torch.compiler.is_exporting()`` is true, so libraries build shape-generic graphs (transformers
    always materialises its attention mask), and Python values read from tensors computed from sizes alone
    (``torch.arange(n)``) replay from the actual input; reading input data into Python raises.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"capture expects an nn.Module, got {type(model).__name__}")
    tracer = _trace_copy(model, model.training, example_inputs, example_kwargs)
    return network_from_trace(tracer, model, example_inputs, example_kwargs, copy_modules=False)


def network_from_trace(tracer: Tracer, model: nn.Module, example_inputs: tuple, example_kwargs: dict,
                       copy_modules: bool):
    """The network a finished trace of ``model`` recorded, made general in two ways by tracing copies of ``model``:
    where a guard read a size that was 1, the trace at grown sizes replaces it when it replays the example exactly
    (:mod:`graph.generalize`); where the forward branches on ``self.training``, the other mode is traced (on the
    example, else at the grown batch size) and merged in (:func:`graph.modes.merge_modes`)."""
    from .network import ReconstructedNetwork

    inputs = (example_inputs, example_kwargs)
    tracer = generalize_size_one(tracer, model, inputs, _trace_copy)
    if branches_on_training(tracer.guards):
        other = _trace_other_mode(model, not tracer.training, inputs)
        if other is not None:
            merge_modes(tracer, other)
    return ReconstructedNetwork.from_tracer(tracer, copy_modules=copy_modules)


def _trace_other_mode(model: nn.Module, training: bool, inputs: tuple[tuple, dict]) -> Tracer | None:
    """A trace of ``model`` in the given mode on the example, else on it grown to batch 2 (BatchNorm in train mode
    needs more than one value per channel); ``None`` when neither runs (replay in that mode then names the branch)."""
    for attempt in (inputs, grown_inputs(inputs, every_dim=False)):
        if attempt is None:
            continue
        try:
            return _trace_copy(model, training, *attempt)
        except Exception:  # this mode cannot run on this input: try the next one
            continue
    return None


def _trace_copy(model: nn.Module, training: bool, example_inputs: tuple, example_kwargs: dict) -> Tracer:
    """Trace a deep copy of ``model`` in the given mode; its buffers end as the model's (the forward may update them).

    The forward runs with grad enabled whatever the caller's grad mode (people capture under ``torch.no_grad()``),
    so exactly the regions where the forward itself turns grad off replay under ``no_grad``. A forward that cannot
    run with grad (it updates a parameter in place) is traced in the caller's mode instead.
    """
    if torch.is_grad_enabled():
        return _trace_copy_as_is(model, training, example_inputs, example_kwargs)
    try:
        with torch.enable_grad():
            return _trace_copy_as_is(model, training, example_inputs, example_kwargs)
    except RuntimeError:
        return _trace_copy_as_is(model, training, example_inputs, example_kwargs)


def _trace_copy_as_is(model: nn.Module, training: bool, example_inputs: tuple, example_kwargs: dict) -> Tracer:
    working = deepcopy_module(model).train(training)
    tracer = Tracer(working).start()
    try:
        with torch.random.fork_rng(devices=[]):
            working(*example_inputs, **example_kwargs)
    finally:
        tracer.stop()
    with torch.no_grad():
        for original, used in zip(model.buffers(), working.buffers()):
            used.copy_(original)
    return tracer
