"""Damaged and hostile saved networks: every change to a file either loads the identical network or raises a
FileFormatError naming the file, never a silently different network nor another exception (graph.serialization)."""
from __future__ import annotations

import inspect
import json
import operator
import random

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from graph import FileFormatError, capture
from graph.serialization import json_format, load, load_bytes
from graph.serialization import pkl as pkl_format
from graph.serialization import vnmodel as vnmodel_format
from graph.serialization.graph_text import canonical_graph
from graph.serialization.spec import network_to_spec

SAVERS = {
    "pkl": lambda net, path: net.save(pkl=path),
    "json": lambda net, path: net.save_to_json(file=path),
    "vnmodel": lambda net, path: net.save_to_vnmodel(pkl=path, model_base_size_hw=(4, 4), model_id=5),
}


class Tiny(nn.Module):
    """A linear layer, a function, a size read at replay ($sym), a guard and a frozen buffer: every part of a spec."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 2)
        self.register_buffer("scale", torch.tensor([2.0, -1.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.fc(x)) * self.scale
        if x.shape[1] == 3:
            y = y + 1
        return y.view(y.size(0), -1)


def tiny_network() -> nn.Module:
    torch.manual_seed(0)
    return capture(Tiny().eval(), torch.randn(2, 3))


def fingerprint(network: nn.Module) -> tuple[bytes, dict[str, torch.Tensor], torch.Tensor]:
    """What makes two networks the same: the spec the saver writes for it, its tensors and its output on an input."""
    spec, tensors = network_to_spec(network)
    with torch.no_grad():
        output = network(torch.linspace(-2, 2, 12).reshape(4, 3))
    return canonical_graph(spec), tensors, output


def same(a: tuple, b: tuple) -> bool:
    return a[0] == b[0] and a[1].keys() == b[1].keys() and all(
        a[1][k].dtype == b[1][k].dtype and a[1][k].shape == b[1][k].shape
        and a[1][k].view(torch.uint8).equal(b[1][k].view(torch.uint8)) for k in a[1]) and torch.equal(a[2], b[2])


def outcome(content: bytes, reference: tuple | None) -> str:
    """``identical``, ``FileFormatError``, or what went wrong (a silent difference or another exception); with no
    ``reference`` any network that loads is a difference."""
    try:
        loaded = load_bytes(content, "damaged.bin")
    except FileFormatError as error:
        return "FileFormatError" if str(error).startswith("damaged.bin: ") else f"unnamed FileFormatError: {error}"
    except Exception as error:  # noqa: BLE001 - any other exception type is what this test looks for
        return f"{type(error).__name__}: {error}"
    return "identical" if reference is not None and same(fingerprint(loaded), reference) else "silently different"


@pytest.mark.parametrize("fmt", SAVERS)
def test_flipping_any_byte_loads_the_identical_network_or_raises_file_format_error(fmt, tmp_path):
    network = tiny_network()
    reference = fingerprint(network)
    data = open(SAVERS[fmt](network, tmp_path / "net.bin"), "rb").read()
    rng = random.Random(13)
    counts: dict[str, int] = {}
    for position in range(len(data)):
        damaged = bytearray(data)
        damaged[position] ^= 1 << rng.randrange(8)
        result = outcome(bytes(damaged), reference)
        counts[result] = counts.get(result, 0) + 1
        assert result in ("identical", "FileFormatError"), f"byte {position}: {result}"
    print(f"\n{fmt}: {len(data)} bytes flipped: {counts}")
    assert counts["FileFormatError"] > len(data) // 2


def test_damaged_pkl_names_the_damaged_part(tmp_path):
    path = tiny_network().save(pkl=tmp_path / "net.pkl")
    payload = torch.load(path, weights_only=True)
    payload["tensors"]["nodes.fc.weight"][0, 0] += 1
    torch.save(payload, path)
    with pytest.raises(FileFormatError, match=r"net\.pkl: tensor 'nodes\.fc\.weight' is damaged"):
        load(path)
    payload = torch.load(tiny_network().save(pkl=tmp_path / "net.pkl"), weights_only=True)
    payload["graph"] = payload["graph"].replace('"training":false', '"training":true')
    torch.save(payload, path)
    with pytest.raises(FileFormatError, match=r"net\.pkl: the graph spec is damaged"):
        load(path)
    payload = torch.load(tiny_network().save(pkl=tmp_path / "net.pkl"), weights_only=True)
    payload["tensor_sha256"].pop("nodes.fc.bias")
    torch.save(payload, path)
    with pytest.raises(FileFormatError, match="tensor 'nodes.fc.bias' has no digest"):
        load(path)


# -------------------------------------------------------------------------------------------- crafted (hostile) files
def saved_spec() -> tuple[dict, dict[str, torch.Tensor]]:
    """The spec and tensors the savers write for the tiny network, as plain JSON values to edit."""
    spec, tensors = network_to_spec(tiny_network())
    return json.loads(json.dumps(spec)), tensors


def write_crafted(fmt: str, spec: object, tensors: dict[str, torch.Tensor], path: str, monkeypatch) -> str:
    """Write ``spec`` through the real saver of ``fmt``: every digest is right, as a hostile author would make it."""
    module, save = {"pkl": (pkl_format, pkl_format.save_pkl), "json": (json_format, json_format.save_json),
                    "vnmodel": (vnmodel_format, vnmodel_format.save_vnmodel)}[fmt]
    with monkeypatch.context() as patch:
        patch.setattr(module, "network_to_spec", lambda network: (spec, tensors))
        return save(None, path)


def edited(spec: dict, path: tuple, value: object) -> dict:
    changed = json.loads(json.dumps(spec))
    target = changed
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return changed


def node_index(spec: dict, op: str) -> int:
    return next(i for i, node in enumerate(spec["nodes"]) if node["op"] == op)


CRAFTED = {
    "complex of a list": (("output_template",), {"$complex": [[1], 2]}, r"output_template\.\$complex: expected"),
    "dict with an unhashable key": (("output_template",), {"$dict": [[{"a": 1}, 2]]}, "must be hashable"),
    "zero-element shape with a 2**64 dim": (("modules", "fc", "config", "in_features"), 0, "must be positive"),
    "MultiheadAttention 8 / 3 heads": (("modules", "fc"), {"kind": "leaf", "type": "MultiheadAttention", "config": {
        "embed_dim": 8, "num_heads": 3}}, "num_heads=3 must divide embed_dim=8"),
    "GroupNorm with 0 groups": (("modules", "fc"), {"kind": "leaf", "type": "GroupNorm", "config": {
        "num_groups": 0, "num_channels": 4}}, "num_groups=0 must be positive"),
    "Embedding padding_idx 99": (("modules", "fc"), {"kind": "leaf", "type": "Embedding", "config": {
        "num_embeddings": 10, "embedding_dim": 3, "padding_idx": 99}}, "padding_idx=99 is outside the 10 embeddings"),
    "meta keyed by an int": (("nodes", 1, "meta"), {"$dict": [[1, 2]]}, "expected an object with string keys"),
    "guard raising 7 to 10**8": (("guards", 0, 0), ["pow", 7, 10**8], "can compute a number of up to"),
    "guard with an unknown head": (("guards", 0, 0), ["system", 1, 2], "unknown expression head 'system'"),
    "guard with a wrong arity": (("guards", 0, 0), ["add", 1], "'add' takes 2 operands, found 1"),
    "size of a constant": (("guards", 0, 0), ["size", 3, 0], "'size' reads a node output"),
    "op that changes autocast state": (("modules", "fc"), {"kind": "function",
                                                           "target": "torch.autocast_increment_nesting"},
                                       'unknown op "torch.autocast_increment_nesting" not on the allow-list'),
    "module key with a dot": (("modules",), {"a.b": {"kind": "function", "target": "torch.cat"}},
                              "cannot name a module"),
    "shape with a 2**64 dim": (("modules", "fc"), {"kind": "constant", "parameter": False, "shape": [0, 2**64]},
                               "malformed tensor shape"),
    "keyword as a parameter name": (("signature", 0, "name"), "class", "is not an identifier"),
    "version 1": (("version",), 1, "version 1 has no digest"),
}


@pytest.mark.parametrize("fmt", SAVERS)
@pytest.mark.parametrize("case", CRAFTED)
def test_crafted_spec_is_refused_by_the_schema_before_anything_is_built(case, fmt, tmp_path, monkeypatch):
    spec, tensors = saved_spec()
    path, value, message = CRAFTED[case]
    crafted = edited(spec, path, value)
    written = write_crafted(fmt, crafted, tensors, str(tmp_path / "crafted.bin"), monkeypatch)
    with pytest.raises(FileFormatError, match=message) as error:
        load(written)
    assert str(error.value).startswith(written)


def test_integer_of_5001_digits_is_refused(tmp_path):
    spec, tensors = saved_spec()
    path = write_crafted_json_text(spec, tensors, tmp_path, '"output_template": ' + "9" * 5001)
    with pytest.raises(FileFormatError, match="crafted.json: the JSON document: Exceeds the limit"):
        load(path, unchecked=True)


def write_crafted_json_text(spec: dict, tensors: dict, tmp_path, replacement: str) -> str:
    text = json.dumps({**spec, "data": {}, "graph_sha256": "0" * 64})
    start = text.index('"output_template": ')
    end = text.index(', "nodes"')
    path = tmp_path / "crafted.json"
    path.write_text(text[:start] + replacement + text[end:])
    return str(path)


@pytest.mark.parametrize("content", [b"\x80\x02h\x05.", b"\x80\x02}(]]u.", b"\x80\x02K\x01.", b"PK\x03\x04garbage"],
                         ids=repr)
def test_pickles_that_break_the_unpickler_raise_file_format_error(content, tmp_path):
    path = tmp_path / "evil.pkl"
    path.write_bytes(content)
    with pytest.raises(FileFormatError, match=r"evil\.pkl: (truncated or corrupted torch file|the pickled payload)"):
        load(path)


def test_a_guard_raising_7_to_10_to_the_8_is_refused_in_well_under_a_second(tmp_path, monkeypatch):
    spec, tensors = saved_spec()
    crafted = edited(spec, ("guards", 0, 0), ["eq", ["pow", 7, 10**8], 1])
    path = write_crafted("json", crafted, tensors, str(tmp_path / "net.json"), monkeypatch)
    with pytest.raises(FileFormatError, match="guards\\[0\\]\\[0\\]\\[1\\]: expression"):
        load(path)


def test_expression_heads_accepted_at_load_are_exactly_those_replay_evaluates():
    from graph import symbolic
    from graph.serialization.validation import EXPRESSION_HEADS

    evaluated = set(symbolic._BINARY) | set(symbolic._UNARY) | {"size", "item", "training", "device", "tuple",
                                                                 "if_training"}
    assert set(EXPRESSION_HEADS) == evaluated


# --------------------------------------------------------------------------------------------- hand-edited .json
def test_hand_edited_json_loads_only_unchecked_and_then_runs_the_edit(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3, stride=1)).eval()
    network = capture(model, torch.randn(1, 1, 8, 8))
    path = network.save_to_json(file=tmp_path / "net.json")
    document = json.load(open(path))
    assert document["modules"]["0"]["config"]["stride"] == [1, 1]
    document["modules"]["0"]["config"]["stride"] = [3, 1]
    with open(path, "w") as stream:
        json.dump(document, stream, indent=2)
    with pytest.raises(FileFormatError, match=r"net\.json: the graph spec is damaged"):
        load(path)
    loaded = load(path, unchecked=True)
    x = torch.randn(1, 1, 8, 8)
    expected = F.conv2d(x, model[0].weight, model[0].bias, stride=(3, 1))
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)


def test_reindented_json_still_matches_its_digest(tmp_path):
    network = tiny_network()
    path = network.save_to_json(file=tmp_path / "net.json")
    document = json.load(open(path))
    with open(path, "w") as stream:
        json.dump(document, stream, indent=7)
    assert same(fingerprint(load(path)), fingerprint(network))


@pytest.mark.parametrize("fmt", ["pkl", "vnmodel"])
def test_binary_formats_cannot_be_loaded_unchecked(fmt, tmp_path):
    path = SAVERS[fmt](tiny_network(), tmp_path / "net.bin")
    with pytest.raises(ValueError, match="only .json files can be loaded unchecked"):
        load(path, unchecked=True)


# ------------------------------------------------------------------------------------------------- the allow-list
NAMED_IN_THE_ISSUE = ["torch.autocast_increment_nesting", "torch.init_num_threads", "torch.fork",
                      "torch.import_ir_module", "Tensor.apply_", "torch.nn.functional.handle_torch_function",
                      "torch.set_num_threads", "torch.manual_seed", "torch.save", "torch.load", "torch.from_file",
                      "Tensor.map_", "Tensor.register_hook", "Tensor.backward", "torch.wait", "torch.get_file_path"]


def aten_operator_names() -> set[str]:
    return {op.partition("::")[2].split(".")[0] for op in torch._C._dispatch_get_all_op_names()
            if op.startswith("aten::")}


def test_every_allow_listed_op_is_a_pure_tensor_function_or_method():
    """Each entry is an ATen operator, a Python function of torch.nn.functional / torch.functional / a Tensor method
    written in Python, an operator dunder, a tensor-valued property, or a dtype/device conversion; and none takes a
    callable."""
    from graph import oplib

    aten = aten_operator_names()
    operators = {f"__{name.strip('_')}__" for name in dir(operator) if name.startswith("__")}
    operators |= {f"__r{name[2:]}" for name in operators} | {"__getitem__", "__setitem__", "__div__", "__rdiv__",
                                                              "__idiv__"}
    conversions = {"bfloat16", "half", "float", "double", "cfloat", "cdouble", "bool", "byte", "char", "short", "int",
                   "long", "type", "cpu", "cuda", "xpu", "mtia", "ipu", "new", "new_tensor", "tensor", "as_tensor",
                   "asarray"}
    names = sorted(oplib.replayable_names())
    assert len(names) > 1000
    for name in names:
        fn = oplib.resolve(name)
        short = name.rsplit(".", 1)[-1]
        if short in operators:
            assert name.startswith("Tensor."), name
        elif isinstance(fn, operator.attrgetter):
            assert isinstance(getattr(torch.Tensor, short), (property, type(torch.Tensor.T))), name
            value = getattr(torch.ones(2, 2, dtype=torch.cfloat), short)
            assert isinstance(value, torch.Tensor) or short == "grad", name
        elif short in conversions:
            assert name.startswith(("Tensor.", "torch.")), name
        elif getattr(fn, "__module__", None) in ("torch.nn.functional", "torch.functional", "torch._tensor"):
            assert inspect.isfunction(fn), name
            parameters = inspect.signature(fn).parameters
            assert not {"fn", "func", "function", "callable", "hook", "tracker"} & set(parameters), name
        else:
            assert getattr(fn, "__name__", None) in aten, f"{name} is neither an ATen operator nor listed"
    for name in NAMED_IN_THE_ISSUE:
        assert name not in names, name
        assert not oplib.is_replayable(name)


# ------------------------------------------------------------------------------------------------------ fuzzing
# Each loader is fuzzed with a fixed seed (derandomize) and a fixed budget of examples, so CI runs the same cases.
FUZZ = settings(derandomize=True, deadline=None, max_examples=120, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
PREFIXES = {"pkl": (b"PK\x03\x04", b"\x80\x02", b"\x80\x04"), "json": (b"{", b' {"format": '),
            "vnmodel": (b"VNMODEL\0",)}
_SAVED: dict[str, tuple[bytes, tuple]] = {}


def saved_bytes(fmt: str, tmp_path_factory) -> tuple[bytes, tuple]:
    if fmt not in _SAVED:
        network = tiny_network()
        path = SAVERS[fmt](network, tmp_path_factory.mktemp("fuzz") / f"net.{fmt}")
        _SAVED[fmt] = open(path, "rb").read(), fingerprint(network)
    return _SAVED[fmt]


@pytest.mark.parametrize("fmt", SAVERS)
def test_fuzz_random_bytes_after_each_format_s_magic_raise_file_format_error(fmt):
    @FUZZ
    @given(prefix=st.sampled_from(PREFIXES[fmt]), body=st.binary(max_size=300))
    def check(prefix, body):
        result = outcome(prefix + body, None)
        assert result == "FileFormatError", result

    check()


MUTATION = st.tuples(st.sampled_from(["replace", "insert", "delete"]), st.floats(0, 1, exclude_max=True),
                     st.binary(min_size=1, max_size=4))


@pytest.mark.parametrize("fmt", SAVERS)
def test_fuzz_mutated_files_load_identically_or_raise_file_format_error(fmt, tmp_path_factory):
    data, reference = saved_bytes(fmt, tmp_path_factory)

    @FUZZ
    @given(mutations=st.lists(MUTATION, min_size=1, max_size=3), truncate=st.none() | st.floats(0, 1))
    def check(mutations, truncate):
        damaged = bytearray(data)
        for kind, where, payload in mutations:
            at = int(where * len(damaged))
            if kind == "replace":
                damaged[at:at + len(payload)] = payload
            elif kind == "insert":
                damaged[at:at] = payload
            else:
                del damaged[at:at + len(payload)]
        if truncate is not None:
            del damaged[int(truncate * len(damaged)):]
        result = outcome(bytes(damaged), reference)
        assert result in ("identical", "FileFormatError"), result

    check()


JSON_SCALARS = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False,
                                                                                    allow_infinity=False)
                | st.text(max_size=6) | st.sampled_from(["add", "pow", "size", "item", "Conv2d", "Linear", "leaf",
                                                         "function", "param", "float32", "torch.cat",
                                                         "nodes.fc.weight", "input", "parameter", "buffer"]))
JSON_KEYS = st.sampled_from(["$ref", "$sym", "$dict", "$list", "$complex", "$float", "$struct", "$tensor", "$slice",
                             "$device", "$dtype", "$bytes", "$unsaved", "kind", "type", "config", "fields", "out",
                             "path", "role", "shape", "target", "in_features"]) | st.text(max_size=4)
JSON_VALUES = st.recursive(JSON_SCALARS, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(JSON_KEYS, inner, max_size=3), max_leaves=12)


def subtree_paths(value, path=()) -> list[tuple]:
    paths = [path] if path else []
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        paths.extend(subtree_paths(item, path + (key,)))
    return paths


@pytest.mark.parametrize("fmt", SAVERS)
def test_fuzz_spec_with_a_subtree_replaced_loads_or_raises_file_format_error(fmt, tmp_path_factory):
    spec, tensors = saved_spec()
    paths = subtree_paths(spec)
    folder = tmp_path_factory.mktemp("subtree")
    module, save = {"pkl": (pkl_format, pkl_format.save_pkl), "json": (json_format, json_format.save_json),
                    "vnmodel": (vnmodel_format, vnmodel_format.save_vnmodel)}[fmt]

    @FUZZ
    @given(path=st.sampled_from(paths), value=JSON_VALUES)
    def check(path, value):
        crafted = edited(spec, path, value)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(module, "network_to_spec", lambda network: (crafted, tensors))
            try:
                written = save(None, folder / "crafted.bin")
            except (TypeError, ValueError):  # json.dumps refusing a value no spec could hold
                return
        try:
            load(written)
        except FileFormatError as error:
            assert str(error).startswith(str(written)), error

    check()
