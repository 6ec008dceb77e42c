"""Capture as users do it: under ``torch.no_grad()``, in one mode, from one example of batch 1.

* A network captured under ``no_grad`` trains; only the regions the forward itself runs under ``no_grad`` replay
  without grad, also after pruning, write-back and saving.
* A network captured in eval mode takes the same SGD step in train mode as the original model (loss, gradients,
  updated weights and BatchNorm buffers), also where train mode runs other ops (timm's norm-activation layers,
  timm's and Hugging Face's DropPath, a module that caches a tensor in eval mode), and the reverse; the one graph
  still prunes, masks, counts FLOPs, saves, exports to ONNX and writes back in both modes.
* A batch-1 example replays at batch 3 (a Hugging Face causal LM from one prompt); a model that really computes
  otherwise at batch 1 is refused with the reason.
"""
from __future__ import annotations

import copy
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from graph import capture
from graph.errors import ReplayError
from graph.leaves import LEAF_BY_NAME
from graph.pruning import plan_by_ratio
from graph.serialization import load
from graph.write_back import apply_plan

timm = pytest.importorskip("timm", reason="the timm families need timm (pip install timm)")
sys.path.insert(0, __file__.rsplit("/", 1)[0])
from hf_models import FAMILIES, token_inputs  # noqa: E402

CLASSES = 10


# ----------------------------------------------------------------------------------------------------- helpers
def _logits(output):
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits
    return output[0]


def _sgd_step(module: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """One seeded SGD step in train mode (dropout and DropPath draw alike for every module); returns the loss."""
    module.train()
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.0)
    optimizer.zero_grad()
    torch.manual_seed(7)
    loss = F.cross_entropy(_logits(module(x)).flatten(1), target)
    loss.backward()
    optimizer.step()
    return loss.detach()


def _state_pairs(model: nn.Module, net: nn.Module) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """``(name, tensor of model, its copy in net)`` for every parameter and buffer the network holds, matched
    through node names (module paths of leaf nodes, attribute paths of parameter nodes)."""
    pairs, seen = [], set()
    for node in net.layer_nodes:
        module = net.module_of(node) if node.key else None
        if module is None or id(module) in seen or (node.op != "param" and node.op not in LEAF_BY_NAME):
            continue
        seen.add(id(module))
        if node.op == "param":
            original = dict([*model.named_parameters(), *model.named_buffers()])[node.name]
            pairs.append((node.name, original, module.value))
        else:
            original = model.get_submodule(node.name)
            mine = dict([*module.named_parameters(), *module.named_buffers()])
            pairs += [(f"{node.name}.{k}", t, mine[k]) for k, t in [*original.named_parameters(),
                                                                    *original.named_buffers()]]
    return pairs


def _assert_same_step(model: nn.Module, net: nn.Module, x: torch.Tensor, rtol: float = 1e-4) -> None:
    """The network takes the same SGD step as ``model``: loss, every gradient, every updated tensor."""
    target = torch.arange(x.shape[0]) % CLASSES
    original = copy.deepcopy(model)
    losses = [_sgd_step(m, x, target) for m in (original, net)]
    torch.testing.assert_close(losses[1], losses[0], rtol=rtol, atol=1e-6)
    pairs = _state_pairs(original, net)
    assert len(pairs) >= len(list(original.parameters()))
    for name, expected, actual in pairs:
        if isinstance(expected, nn.Parameter):
            assert (actual.grad is None) == (expected.grad is None), name
            if expected.grad is not None:
                torch.testing.assert_close(actual.grad, expected.grad, rtol=rtol, atol=1e-5, msg=name)
        torch.testing.assert_close(actual, expected, rtol=rtol, atol=1e-5, msg=name)


def _eval_capture(model: nn.Module, x: torch.Tensor):
    model.eval()
    with torch.no_grad():
        return capture(model, x)


# ------------------------------------------------------------------------------------------- 1. under no_grad
class _GradOffRegionNet(nn.Module):
    """A gate computed under ``no_grad`` inside the forward (its weights never get gradients), then a trained head."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.BatchNorm2d(8)
        self.gate = nn.Conv2d(8, 8, 1)
        self.head = nn.Linear(8, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.conv(x)).relu()
        with torch.no_grad():
            gate = self.gate(x).sigmoid()
        return self.head((x * gate).mean((2, 3)))


@pytest.mark.parametrize("grad_at_capture", [False, True])
def test_capture_under_no_grad_trains_and_keeps_the_forwards_own_no_grad_region(grad_at_capture):
    model = _GradOffRegionNet().eval()
    x = torch.randn(4, 3, 8, 8)
    with torch.set_grad_enabled(grad_at_capture):
        net = capture(model, x)
    assert [n.name for n in net.graph_nodes if n.meta.get("no_grad")] == ["gate", "sigmoid"]
    _assert_same_step(model, net, x)
    assert net.module_of(net.node("gate")).weight.grad is None
    assert net.module_of(net.node("conv")).weight.grad is not None


def test_no_grad_capture_trains_after_pruning_saving_and_write_back(tmp_path):
    model = _GradOffRegionNet().eval()
    x = torch.randn(4, 3, 8, 8)
    net = _eval_capture(model, x)
    plan = plan_by_ratio(net, 0.5)
    assert plan
    pruned = net.prune_channels(plan)
    written = apply_plan(model, net, plan)
    reloaded = [load(pruned.save(pkl=str(tmp_path / "p.pkl"))), load(pruned.save_to_json(file=str(tmp_path / "p.json"))),
                load(pruned.save_to_vnmodel(pkl=str(tmp_path / "p.vnmodel"), model_base_size_hw=(8, 8)))]
    target = torch.arange(4) % CLASSES
    reference = _sgd_step(copy.deepcopy(pruned), x, target)
    for candidate in [written, *reloaded]:
        torch.testing.assert_close(_sgd_step(candidate, x, target), reference, rtol=1e-5, atol=1e-6)
    for candidate in reloaded:
        assert candidate.module_of(candidate.node("gate")).weight.grad is None
        assert candidate.module_of(candidate.node("conv")).weight.grad is not None
    assert written.gate.weight.grad is None and written.conv.weight.grad is not None


# ---------------------------------------------------------------------------------------- 2. eval <-> train
@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small", "efficientnet_b0", "convnext_tiny"])
def test_torchvision_model_captured_in_eval_under_no_grad_takes_the_same_sgd_step_in_train_mode(name):
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None, num_classes=CLASSES)
    x = torch.randn(2, 3, 32, 32)
    net = _eval_capture(model, x)
    _assert_same_step(model, net, x)


@pytest.mark.parametrize("name, kwargs", [
    ("efficientnet_b0", {"drop_path_rate": 0.2}),  # BatchNormAct2d (num_batches_tracked, momentum) and DropPath
    ("mobilenetv3_small_050", {}),
    ("convnext_atto", {"drop_path_rate": 0.3}),  # timm DropPath in every block
    ("resnet18", {"drop_path_rate": 0.2}),
])
def test_timm_model_captured_in_eval_under_no_grad_takes_the_same_sgd_step_in_train_mode(name, kwargs):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=CLASSES, **kwargs)
    x = torch.randn(2, 3, 32, 32)
    net = _eval_capture(model, x)
    _assert_same_step(model, net, x)


def test_hugging_face_drop_path_model_captured_in_eval_takes_the_same_sgd_step_in_train_mode():
    transformers = pytest.importorskip("transformers", reason="needs transformers (pip install -e .[hf])")
    config = transformers.ConvNextConfig(num_channels=3, num_stages=2, hidden_sizes=[8, 16], depths=[2, 2],
                                         drop_path_rate=0.5, image_size=32, num_labels=CLASSES)
    torch.manual_seed(0)
    model = transformers.ConvNextForImageClassification(config)
    assert any(type(m).__name__ == "ConvNextDropPath" for m in model.modules())
    x = torch.randn(2, 3, 32, 32)
    net = _eval_capture(model, x)
    _assert_same_step(model, net, x)


class _CachedBiasAttention(nn.Module):
    """Recomputes a position bias from its table in train mode; in eval mode reuses the one it cached."""

    def __init__(self, channels: int):
        super().__init__()
        self.table = nn.Parameter(torch.randn(2 * channels - 1) * 0.1)
        self.proj = nn.Linear(channels, channels)
        self.cached: torch.Tensor | None = None

    def bias(self, length: int) -> torch.Tensor:
        index = torch.arange(length)[:, None] - torch.arange(length)[None, :] + length - 1
        return self.table[index]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training or self.cached is None:
            bias = self.bias(x.shape[1])
            if not self.training:
                self.cached = bias.detach()
        else:
            bias = self.cached
        scores = torch.softmax(x @ x.transpose(1, 2) + bias, dim=-1)
        return self.proj(scores @ x)


class _CachingNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(6, 8)
        self.attention = _CachedBiasAttention(8)
        self.head = nn.Linear(8, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.attention(self.embed(x)).mean(1))


def test_module_that_caches_a_tensor_in_eval_mode_trains_like_the_original():
    torch.manual_seed(0)
    model = _CachingNet().eval()
    x = torch.randn(3, 8, 6)
    model(x)  # fills the cache: the eval-mode forward now reads it instead of the table
    net = _eval_capture(model, x)
    assert any(n.meta.get("mode") == "train" for n in net.graph_nodes)
    torch.testing.assert_close(net.eval()(x), model(x))
    _assert_same_step(model, net, x)
    assert net.module_of(net.node("attention.table")).value.grad is not None


def test_network_captured_in_train_mode_replays_eval_mode_exactly():
    torch.manual_seed(0)
    model = timm.create_model("efficientnet_b0", pretrained=False, num_classes=CLASSES, drop_path_rate=0.2).train()
    x = torch.randn(2, 3, 32, 32)
    net = capture(model, x)
    assert net.training
    with torch.no_grad():
        torch.testing.assert_close(net.eval()(x), model.eval()(x), rtol=1e-5, atol=1e-5)
    _assert_same_step(model, net, x)


class _TimmBlocksNet(nn.Module):
    """timm's norm-activation and DropPath layers in a small residual CNN with a no_grad region."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.stem_norm = timm.layers.BatchNormAct2d(16)
        self.conv = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.norm = timm.layers.BatchNormAct2d(16, act_layer=nn.SiLU)
        self.drop_path = timm.layers.DropPath(0.5)
        self.gate = nn.Conv2d(16, 16, 1)
        self.head = nn.Linear(16, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem_norm(self.stem(x))
        x = x + self.drop_path(self.norm(self.conv(x)))
        with torch.no_grad():
            gate = self.gate(x).sigmoid()
        return self.head((x * gate).mean((2, 3)))


def test_two_mode_graph_prunes_masks_counts_saves_exports_and_writes_back_in_both_modes(tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime", reason="the ONNX check needs onnxruntime")
    torch.manual_seed(0)
    model = _TimmBlocksNet().eval()
    x = torch.randn(4, 3, 8, 8)
    net = _eval_capture(model, x)
    train_only = {n.name for n in net.graph_nodes if n.meta.get("mode") == "train"}
    assert train_only and any(n.op == "mode_select" for n in net.graph_nodes)
    plan = plan_by_ratio(net, 0.5)
    assert plan
    pruned, masked = net.prune_channels(plan), net.mask_channels(plan)
    assert pruned.module_of(pruned.node("conv")).weight.shape[0] == 8
    for training in (False, True):
        outputs = []
        for candidate in (pruned, masked):
            candidate.train(training)
            torch.manual_seed(3)
            with torch.no_grad():
                outputs.append(candidate(x))
        torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-4, atol=1e-5)
    written = apply_plan(model, net, plan)
    target = torch.arange(4) % CLASSES
    reference = _sgd_step(copy.deepcopy(pruned), x, target)
    saved = [load(pruned.save(pkl=str(tmp_path / "n.pkl"))), load(pruned.save_to_json(file=str(tmp_path / "n.json"))),
             load(pruned.save_to_vnmodel(pkl=str(tmp_path / "n.vnmodel"), model_base_size_hw=(8, 8)))]
    for candidate in [written, *saved]:
        torch.testing.assert_close(_sgd_step(candidate, x, target), reference, rtol=1e-5, atol=1e-6)
    eval_rows = {row.name for row in net.eval().flops().rows}
    train_rows = {row.name for row in net.train().flops().rows}
    assert not eval_rows & train_only and train_only <= train_rows
    batch, positions = x.shape[0], x.shape[2] * x.shape[3]
    macs = batch * (sum(m.weight.numel() * positions for m in model.modules() if isinstance(m, nn.Conv2d))
                    + model.head.weight.numel())
    assert net.eval().flops().total_macs == macs
    path = pruned.eval().export_onnx(str(tmp_path / "n.onnx"), x)
    session = onnxruntime.InferenceSession(path)
    (exported,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(exported), pruned(x), rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------------ 3. batch 1
@pytest.mark.parametrize("family, attn", [("gpt2", "eager"), ("qwen2", "sdpa"), ("bert", "sdpa")])
def test_hugging_face_model_captured_from_one_prompt_replays_at_batch_three(family, attn):
    model = FAMILIES[family](attn).eval()
    options = {} if family == "bert" else {"use_cache": False}
    prompt, _ = token_inputs(1, 9, padded=False)
    with torch.no_grad():
        net = capture(model, prompt, **options)
    assert net.input_nodes[0].out_shape == (1, 9)
    batch, _ = token_inputs(3, 5, padded=False, seed=4)
    with torch.no_grad():
        for ids in (prompt, batch):
            torch.testing.assert_close(_logits(net(ids, **options)), _logits(model(ids, **options)), rtol=1e-5,
                                       atol=1e-5)


class _ExpandsPositionsNet(nn.Module):
    """Expands its position table to the batch only when the sizes differ (as transformers' masking utils do)."""

    def __init__(self):
        super().__init__()
        self.positions = nn.Parameter(torch.randn(1, 5, 4))
        self.linear = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        positions = self.positions
        if positions.shape[0] != x.shape[0]:
            positions = positions.expand(x.shape[0], -1, -1)
        return self.linear(torch.cat([x, positions], dim=1))


class _SpecialCasesBatchOneNet(nn.Module):
    """Computes something else for a batch of one."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 1:
            return self.linear(x) * 2
        return self.linear(x)


class _BatchNormTrainBranchNet(nn.Module):
    """Counts train-mode calls in a buffer; BatchNorm1d cannot run in train mode on a batch of one."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 6)
        self.norm = nn.BatchNorm1d(6)
        self.head = nn.Linear(6, CLASSES)
        self.register_buffer("train_calls", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.train_calls.add_(1)
        return self.head(self.norm(self.linear(x)).relu())


def test_size_compared_with_a_batch_of_one_replays_at_batch_three():
    model = _ExpandsPositionsNet()
    net = capture(model, torch.randn(1, 3, 4))
    for batch in (1, 3):
        x = torch.randn(batch, 2, 4)
        torch.testing.assert_close(net(x), model(x))


def test_model_that_special_cases_batch_one_is_refused_at_batch_three_with_the_reason():
    model = _SpecialCasesBatchOneNet()
    net = capture(model, torch.randn(1, 4))
    x = torch.randn(1, 4)
    torch.testing.assert_close(net(x), model(x))
    with pytest.raises(ReplayError, match="special-cases that size") as error:
        net(torch.randn(3, 4))
    line = next(i for i, text in enumerate(open(__file__).read().splitlines(), 1) if "if x.shape[0] == 1:" in text)
    assert f"test_capture_modes.py:{line}" in str(error.value)


def test_batch_one_capture_in_eval_trains_at_batch_three_when_train_mode_needs_a_larger_batch():
    torch.manual_seed(0)
    model = _BatchNormTrainBranchNet().eval()
    net = _eval_capture(model, torch.randn(1, 4))
    _assert_same_step(model, net, torch.randn(3, 4))
