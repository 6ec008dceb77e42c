"""``ReconstructedNetwork``: an ``nn.Module`` that replays a captured graph.

Nodes' modules live in the ``nodes`` ``nn.ModuleDict``; ``graph_nodes`` holds the :class:`~graph.ir.Node` records in
execution order (``input_nodes`` first-class inputs, ``layer_nodes`` everything else). ``forward`` runs a compiled
program: fill each node's argument template from earlier outputs and sizes, call its module, check guards, free
values nobody reads any more.
"""
from __future__ import annotations

import copy
import inspect
from typing import Any, Callable, Iterable

import networkx as nx
import torch
import torch.nn as nn
from torch.nn.modules import module as torch_module

from . import symbolic
from .errors import ReplayError
from .ir import Node, Ref, Struct, Sym, captured_sizes, is_dynamic, iter_refs
from .modes import node_mode
from .modules import FunctionalOp

_MISSING = object()
SPECIAL_AT_SIZE_ONE = "special_at_size_one"  # input-node meta: the forward computes otherwise when its size-1 dims grow


class ReplayState:
    """State of one replay: computed values (``env``, by node index), the training flag and the input device; what
    compiled argument templates read (:func:`compile_template`)."""

    __slots__ = ("env", "context")

    def __init__(self, size: int, training: bool, device: torch.device | None):
        self.env: list[Any] = [None] * size
        self.context = {"training": training, "device": device}

    def resolve(self, ref: Ref) -> Any:
        value = self.env[ref.index]
        for key in ref.path:
            value = value[key]
        return value

    def evaluate(self, expr: Any) -> Any:
        return symbolic.evaluate(expr, self.resolve, self.context)


def compile_template(template: Any) -> Callable[[ReplayState], Any]:
    """A function that fills ``template`` in from a run's values."""
    if not is_dynamic(template):
        return lambda run: template
    if isinstance(template, Ref):
        index, path = template.index, template.path
        if not path:
            return lambda run: run.env[index]
        return lambda run: run.resolve(template)
    if isinstance(template, Sym) and isinstance(template.expr, tuple) and template.expr[:1] == ("by_mode",):
        train, evaluation = compile_template(template.expr[1]), compile_template(template.expr[2])
        return lambda run: train(run) if run.context["training"] else evaluation(run)
    if isinstance(template, Sym):
        expr = template.expr
        return lambda run: run.evaluate(expr)
    if isinstance(template, (tuple, list)):
        parts = [compile_template(t) for t in template]
        if isinstance(template, list):
            return lambda run: [p(run) for p in parts]
        return lambda run: tuple([p(run) for p in parts])
    if isinstance(template, dict):
        items = [(k, compile_template(v)) for k, v in template.items()]
        return lambda run: {k: p(run) for k, p in items}
    if isinstance(template, slice):
        start, stop, step = (compile_template(t) for t in (template.start, template.stop, template.step))
        return lambda run: slice(start(run), stop(run), step(run))
    if isinstance(template, Struct):
        cls, fields = template.cls, compile_template(template.fields)
        return lambda run: cls(**fields(run))
    raise TypeError(f"cannot compile template part {template!r}")


def describe_expr(expr: Any, names: list[str]) -> str:
    """A readable form of a guard expression, naming the nodes whose sizes it reads."""
    if isinstance(expr, Ref):
        return names[expr.index]
    if isinstance(expr, tuple) and expr:
        if expr[0] == "size":
            return f"{names[expr[1].index]}.shape[{expr[2]}]"
        if expr[0] in ("training", "device"):
            return f"<{expr[0]}>"
        return f"{expr[0]}(" + ", ".join(describe_expr(e, names) for e in expr[1:]) + ")"
    return repr(expr)


class ReconstructedNetwork(nn.Module):
    """A captured network: replays the recorded ops, in order, on new inputs of any compatible shape."""

    def __init__(self, graph_nodes: list[Node], modules: dict[str, nn.Module], signature: inspect.Signature,
                 input_constants: dict[tuple, Any], output_template: Any, guards: dict[tuple, str | None],
                 captured_training: bool):
        super().__init__()
        self.nodes = nn.ModuleDict(modules)
        self.graph_nodes = graph_nodes
        self.signature = signature
        self.input_constants = input_constants
        self.output_template = output_template
        self.guards = guards
        self.captured_training = captured_training
        self.train(captured_training)
        self._program = None
        self._names: dict[str, int] | None = None

    # The operations below live in modules of their own; these methods are the network's public face.
    def flops(self):
        """Per-node multiply-adds and parameters at the captured input size (a :class:`graph.flops.FlopsReport`)."""
        from .flops import count_flops

        return count_flops(self)

    def showFMLAs(self) -> None:  # noqa: N802 - the AMC wiki's name
        """Print the per-node table of multiply-adds and parameters (alias kept from the AMC API)."""
        print(self.flops())

    def draw(self, path: str, format: str | None = None) -> str:
        """Render the graph with graphviz (svg/pdf/png from ``path``'s suffix); returns the written file."""
        from .draw import draw_network

        return draw_network(self, path, format=format)

    def save(self, pkl: str | None = None, file: str | None = None) -> str:
        """Save as ``.pkl`` (a weights-only ``torch.save`` of the graph spec and tensors)."""
        from .serialization import save_pkl

        return save_pkl(self, _path_arg(pkl, file))

    def save_to_json(self, file: str | None = None, pkl: str | None = None) -> str:
        """Save as human-readable ``.json``: the graph, every node's op and arguments, and the weights."""
        from .serialization import save_json

        return save_json(self, _path_arg(file, pkl))

    def save_to_vnmodel(self, pkl: str | None = None, model_base_size_hw: tuple[int, int] | None = None,
                        model_id: int = 0, file: str | None = None) -> str:
        """Save in the binary ``.vnmodel`` deployment format (spec in ``docs/vnmodel.md``)."""
        from .serialization import save_vnmodel

        return save_vnmodel(self, _path_arg(pkl, file), model_base_size_hw=model_base_size_hw, model_id=model_id)

    def channel_groups(self) -> list:
        """The groups of coupled channels (see :class:`graph.dependency.ChannelGroup`), built once and cached."""
        from .pruning import dependency_graph

        return dependency_graph(self).groups

    def prune_channels(self, plan) -> "ReconstructedNetwork":
        """A physically smaller copy with the planned channels removed (``{group: indices}``)."""
        from .pruning import prune_channels

        return prune_channels(self, plan)

    def mask_channels(self, plan) -> "ReconstructedNetwork":
        """A same-size copy in which the planned channels contribute nothing."""
        from .pruning import mask_channels

        return mask_channels(self, plan)

    def export_onnx(self, path: str, *example_inputs: Any, **kwargs: Any) -> str:
        """Export to ONNX; without example inputs, inputs of the captured shapes are made up."""
        from .onnx_export import export_onnx

        return export_onnx(self, path, *example_inputs, **kwargs)

    @classmethod
    def from_tracer(cls, tracer, copy_modules: bool) -> "ReconstructedNetwork":
        """Build the network from a finished :class:`~graph.capture.Tracer`; copy modules for the boundary API."""
        from .errors import CaptureError

        if not tracer._finished:
            raise CaptureError("no forward pass of the captured module ran between the capture boundaries")
        node_modules = tracer.node_modules
        if copy_modules:
            node_modules = copy.deepcopy(node_modules)
        keys: set[str] = set()
        modules: dict[str, nn.Module] = {}
        for node, module in zip(tracer.nodes, node_modules):
            if module is None:
                continue
            node.key = _unique_key(node.name, keys)
            modules[node.key] = module
        return cls(tracer.nodes, modules, tracer.signature, tracer.input_constants, tracer.output_template,
                   tracer.guards, tracer.training)

    # ------------------------------------------------------------------ graph views
    @property
    def input_nodes(self) -> list[Node]:
        """The nodes that receive the forward's tensor arguments."""
        return [n for n in self.graph_nodes if n.op == "input"]

    @property
    def layer_nodes(self) -> list[Node]:
        """Every node that computes something (modules, functions, parameters, constants)."""
        return [n for n in self.graph_nodes if n.op != "input"]

    def node(self, name: str) -> Node:
        """The node called ``name`` (module path such as ``layer1.0.conv1``, or ``layer1.0.add``)."""
        index = self._names.get(name) if self._names is not None else None
        if index is None or index >= len(self.graph_nodes) or self.graph_nodes[index].name != name:
            self._names = {node.name: i for i, node in enumerate(self.graph_nodes)}
            index = self._names.get(name)
        if index is None:
            raise KeyError(f"no node named {name!r}")
        return self.graph_nodes[index]

    def module_of(self, node: Node) -> nn.Module:
        """The module a node runs."""
        return self.nodes[node.key]

    def users(self) -> dict[int, list[int]]:
        """For each node index, the indices of the nodes that read its output."""
        users: dict[int, list[int]] = {i: [] for i in range(len(self.graph_nodes))}
        for i, node in enumerate(self.graph_nodes):
            for j in node.inputs:
                users[j].append(i)
        return users

    def output_refs(self) -> list[Ref]:
        """The references the network's output is built from."""
        return list(iter_refs(self.output_template))

    def to_networkx(self) -> nx.DiGraph:
        """The graph as a ``networkx.DiGraph`` keyed by node name, with op, shape and source as attributes."""
        graph = nx.DiGraph()
        for node in self.graph_nodes:
            graph.add_node(node.name, op=node.op, shape=node.out_shape, source=node.source)
        for node in self.graph_nodes:
            for j in node.inputs:
                graph.add_edge(self.graph_nodes[j].name, node.name)
        return graph

    # ------------------------------------------------------------------ replay
    def recompile(self) -> None:
        """Rebuild the replay program after nodes, their templates or modules changed."""
        self._program = None

    def _compile(self) -> list[tuple]:
        count = len(self.graph_nodes)
        last_use = [-1] * count
        checks_after: dict[int, list[tuple]] = {}
        for i, node in enumerate(self.graph_nodes):
            for j in node.inputs:
                last_use[j] = max(last_use[j], i)
        for (expr, value), source in self.guards.items():
            refs = [r.index for r in iter_refs(Sym(expr))]
            at = max(refs, default=-1)
            if at >= 0 and self.graph_nodes[at].op == "input":
                at = -1
            checks_after.setdefault(at, []).append((expr, value, source))
            for j in refs:
                last_use[j] = max(last_use[j], at)
        for ref in self.output_refs():
            last_use[ref.index] = count
        frees: dict[int, list[int]] = {}
        for j, i in enumerate(last_use):
            if 0 <= i < count:
                frees.setdefault(i, []).append(j)
        program = []
        for i, node in enumerate(self.graph_nodes):
            if node.op == "input":
                continue
            out = node.out_shape
            expected_len = len(out) if isinstance(out, list) else None
            module = self.nodes[node.key]
            program.append((i, module, _direct_callable(module), compile_template(tuple(node.args)),
                            compile_template(dict(node.kwargs)), node.meta.get("no_grad", False), node_mode(node),
                            expected_len, checks_after.get(i, ()), frees.get(i, ())))
        self._program = (program, checks_after.get(-1, ()), compile_template(self.output_template))
        return self._program

    def example_inputs(self) -> tuple[tuple, dict]:
        """``(args, kwargs)`` shaped like the captured inputs (tensors of ones of the captured shapes and dtypes, the
        captured constants), for passes that run the network at its captured size (FLOPs, observation)."""
        bound: dict[str, Any] = {}
        device = self._device()
        values = {node.meta["path"]: torch.ones(node.meta["out"], device=device,
                                                 dtype=getattr(torch, node.meta.get("dtype", "float32")))
                  for node in self.input_nodes}
        values.update(self.input_constants)
        for path, value in sorted(values.items(), key=lambda item: [str(k) for k in item[0]]):
            _place(bound, path, value)
        args: list = []
        kwargs: dict = {}
        for name, parameter in self.signature.parameters.items():
            if name not in bound:
                continue
            value = _freeze(bound[name])
            if parameter.kind is parameter.VAR_POSITIONAL:
                args.extend(value)
            elif parameter.kind is parameter.VAR_KEYWORD:
                kwargs.update(value)
            elif parameter.kind is parameter.POSITIONAL_ONLY:
                args.append(value)
            else:
                kwargs[name] = value
        return tuple(args), kwargs

    def observe(self, observer: Callable[[Node, tuple, dict, Any], None], *args: Any, **kwargs: Any) -> Any:
        """Run the network, calling ``observer(node, args, kwargs, output)`` after every node with the real values
        it received and produced (the pass behind FLOP counts and data-driven compressors); returns the output."""
        return self._execute(args, kwargs, observer)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._execute(args, kwargs, None)

    def _device(self) -> torch.device:
        for tensor in self.parameters():
            return tensor.device
        for tensor in self.buffers():
            return tensor.device
        return torch.device("cpu")

    def _execute(self, args: tuple, kwargs: dict, observer: Callable | None) -> Any:
        program, initial_checks, output = self._program or self._compile()
        run = ReplayState(len(self.graph_nodes), self.training, None)
        self._bind_inputs(run, args, kwargs)
        self._check(run, initial_checks)
        env = run.env
        # Calling a node's function directly skips nn.Module.__call__ (a few microseconds per node, which is most of
        # the replay overhead on small models); hooks and JIT tracing still get the full call.
        bypass = not (_global_hooks() or torch._C._get_tracing_state())
        training = self.training
        for index, module, direct, arg_fn, kwarg_fn, no_grad, mode, expected_len, checks, frees in program:
            if mode is not None and mode is not training:  # a node of the other mode (graph.modes)
                for j in frees:
                    env[j] = None
                continue
            call = direct if bypass and not _has_hooks(module) else module
            node_args, node_kwargs = arg_fn(run), kwarg_fn(run)
            if no_grad and torch.is_grad_enabled():
                with torch.no_grad():
                    value = call(*node_args, **node_kwargs)
            else:
                value = call(*node_args, **node_kwargs)
            env[index] = value
            if observer is not None:
                observer(self.graph_nodes[index], node_args, node_kwargs, value)
            if expected_len is not None and len(value) != expected_len:
                node = self.graph_nodes[index]
                raise ReplayError(f"{node.describe()} returned {len(value)} values at replay but {expected_len} when "
                                  "captured; the forward's Python code iterates over them, so capture again with "
                                  "an input of this shape")
            if checks:
                self._check(run, checks)
            for j in frees:
                env[j] = None
        return output(run)

    def _bind_inputs(self, run: ReplayState, args: tuple, kwargs: dict) -> None:
        try:
            bound = self.signature.bind(*args, **kwargs).arguments
        except TypeError as error:
            raise ReplayError(f"the inputs do not match the captured forward{self.signature}: {error}") from None
        for path, captured in self.input_constants.items():
            given = _lookup(bound, path)
            if given is not _MISSING and not _same_constant(given, captured):
                raise ReplayError(f"input {'.'.join(map(str, path))} was {_brief(captured)} when captured; the "
                                  f"graph was recorded for that value and cannot replay with {_brief(given)}")
        for i, node in enumerate(self.graph_nodes):
            if node.op != "input":
                continue
            value = _lookup(bound, node.meta["path"])
            if not isinstance(value, torch.Tensor):
                raise ReplayError(f"input {node.name} must be a tensor (it was one when the network was captured)")
            if run.context["device"] is None:
                run.context["device"] = value.device
            run.env[i] = value
        if run.context["device"] is None:
            run.context["device"] = self._device()

    def _check(self, run: ReplayState, checks: Iterable[tuple]) -> None:
        for expr, expected, source in checks:
            value = run.evaluate(expr)
            if value != expected:
                names = [n.name for n in self.graph_nodes]
                what = "training mode" if "training" in repr(expr) else "input shape"
                hint = self._size_one_hint() if 1 in captured_sizes(expr, self.graph_nodes) else ""
                raise ReplayError(
                    f"replay diverges from the captured forward: at {source}, {describe_expr(expr, names)} was "
                    f"{expected!r} when captured but is {value!r} now. The forward branches on the {what} there, "
                    f"so capture again with an input of this shape (or in this mode).{hint}")

    def _size_one_hint(self) -> str:
        if any(node.meta.get(SPECIAL_AT_SIZE_ONE) for node in self.input_nodes):
            return (" A size was 1 when captured, and capture traced the forward again with it grown to 2: the model "
                    "computes another result at size 1 (it special-cases that size), so no one graph holds for both; "
                    "capture again with an input of the size you will run.")
        return (" A size was 1 when captured, and code often special-cases size 1 (broadcasting, batch of one): "
                "capture with sizes of at least 2 to replay at any size.")

    # ------------------------------------------------------------------ copying
    def __getstate__(self) -> dict:
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__.copy()
        state = dict(state)
        state["_program"] = None
        state["_names"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._program = None
        self._names = None

    def extra_repr(self) -> str:
        return f"{len(self.input_nodes)} inputs, {len(self.layer_nodes)} nodes, {len(self.guards)} guards"


def _global_hooks() -> bool:
    """True when hooks registered for every module exist (then each node runs through ``nn.Module.__call__``)."""
    return bool(torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks
                or torch_module._global_backward_hooks or torch_module._global_backward_pre_hooks)


def _has_hooks(module: nn.Module) -> bool:
    """True when ``module`` has hooks of its own, which only ``nn.Module.__call__`` runs."""
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks)


def _direct_callable(module: nn.Module) -> Callable:
    """What a node without hooks runs: a plain functional op's torch function, else the module's ``forward``."""
    if type(module).forward is FunctionalOp.forward:
        return module.fn
    return module.forward


def _path_arg(first: str | None, second: str | None) -> str:
    path = first or second
    if not path:
        raise ValueError("give the file path (pkl= or file=)")
    return str(path)


def _unique_key(name: str, taken: set[str]) -> str:
    base = name.replace(".", "_") or "node"
    key, n = base, 1
    while key in taken or hasattr(nn.ModuleDict, key):
        key, n = f"{base}_{n}", n + 1
    taken.add(key)
    return key


def _lookup(bound: dict, path: tuple) -> Any:
    value: Any = bound
    for key in path:
        try:
            value = value[key]
        except (KeyError, IndexError, TypeError):
            return _MISSING
    return value


def _place(container: dict, path: tuple, value: Any) -> None:
    """Store ``value`` at ``path`` in nested dicts (integer keys become list positions when frozen)."""
    for key in path[:-1]:
        container = container.setdefault(key, {})
    container[path[-1]] = value


def _freeze(value: Any) -> Any:
    """Turn the nested dicts built by :func:`_place` back into tuples where every key was an index."""
    if not isinstance(value, dict):
        return value
    items = {key: _freeze(item) for key, item in value.items()}
    if items and all(isinstance(key, int) for key in items):
        return tuple(items[i] for i in range(len(items)))
    return items


def _brief(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return repr(value)


def _same_constant(a: Any, b: Any) -> bool:
    try:
        return bool(a == b) and type(a) is type(b)
    except Exception:
        return a is b
