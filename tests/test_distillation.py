"""BaseDistiller: the loss terms against a hand computation, feature hints with 1x1 adapters between same-named
nodes of a pruned capture and its original, checkpointed adapters, and a student that learns more with a teacher."""
import copy
import math

import pytest
import torch
import torch.nn as nn

import amc
import trainers
from compressors.base import top1_accuracy
from trainers import BaseDistiller, ClassificationTrainer
from trainers.basedistiller import feature_module, hint_adapter, soft_logit_kl
from trainers.datasets import load_dataset


def cnn(width=8, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, width, 3, padding=1),
                         nn.ReLU(), nn.Flatten(), nn.Linear(width * 64, 10))


@pytest.fixture(scope="module")
def teacher(digits):
    network = cnn(16, seed=1)
    trainers.finetune(network, digits.train, epochs=4, lr=0.05)
    return network.eval()


def hand_kl(student, teacher, temperature):
    """T^2 * mean over rows of sum_c p_t log(p_t / p_s), with plain Python floats."""
    total = 0.0
    for s_row, t_row in zip(student.tolist(), teacher.tolist()):
        s_exp = [math.exp(v / temperature) for v in s_row]
        t_exp = [math.exp(v / temperature) for v in t_row]
        p_s = [v / sum(s_exp) for v in s_exp]
        p_t = [v / sum(t_exp) for v in t_exp]
        total += sum(t * math.log(t / s) for t, s in zip(p_t, p_s))
    return temperature ** 2 * total / len(student)


def hand_cross_entropy(logits, labels):
    rows = logits.tolist()
    return sum(math.log(sum(math.exp(v) for v in row)) - row[label]
               for row, label in zip(rows, labels.tolist())) / len(rows)


def test_soft_logit_kl_matches_a_hand_computation():
    torch.manual_seed(0)
    student, teacher = torch.randn(6, 5) * 3, torch.randn(6, 5) * 3
    for temperature in (1.0, 4.0):
        assert float(soft_logit_kl(student, teacher, temperature)) == pytest.approx(
            hand_kl(student, teacher, temperature), rel=1e-5)
    assert float(soft_logit_kl(teacher, teacher, 2.0)) == pytest.approx(0.0, abs=1e-6)
    dense_s, dense_t = torch.randn(2, 5, 3, 3), torch.randn(2, 5, 3, 3)
    flat = lambda x: x.permute(0, 2, 3, 1).reshape(-1, 5)  # noqa: E731 - one pixel per row
    assert float(soft_logit_kl(dense_s, dense_t, 2.0)) == pytest.approx(hand_kl(flat(dense_s), flat(dense_t), 2.0),
                                                                        rel=1e-5)


class RecordingDistiller(BaseDistiller):
    """Keeps the first batch's losses, predictions and adapter weight for a hand check."""

    def train_losses(self, preds, batch, *args, **kwargs):
        losses = super().train_losses(preds, batch, *args, **kwargs)
        if not hasattr(self, "recorded"):
            self.recorded = (losses, preds.detach().clone(), batch,
                             self.adapters["2"].weight.detach().clone())
        return losses


def test_distillation_loss_terms_match_a_hand_computation(digits, teacher):
    student = cnn(4)
    features = []
    student[2].register_forward_hook(lambda module, args, output: features.append(output.detach().clone()))
    distiller = RecordingDistiller(digits.train, None, None, student, nn.CrossEntropyLoss(),
                                   torch.optim.SGD(student.parameters(), lr=0.01), None, 1, "cpu", None, None, None,
                                   teacher=teacher, temperature=3.0, alpha=0.7, hints=["2"], hint_weight=0.5,
                                   max_steps=1, verbose=False)
    assert isinstance(distiller.adapters["2"], nn.Conv2d) and distiller.adapters["2"].weight.shape == (16, 4, 1, 1)
    distiller.run()
    losses, preds, batch, adapter = distiller.recorded
    inputs, labels = batch
    with torch.no_grad():
        teacher_logits = teacher(inputs)
        teacher_feature = teacher[:3](inputs)
    kd = hand_kl(preds, teacher_logits, 3.0)
    ce = hand_cross_entropy(preds, labels)
    mapped = torch.einsum("oc,nchw->nohw", adapter[:, :, 0, 0], features[-1])
    hint = float(((mapped - teacher_feature) ** 2).mean())
    assert losses["kd_loss"].item() == pytest.approx(kd, rel=1e-4)
    assert losses["task_loss"].item() == pytest.approx(ce, rel=1e-4)
    assert losses["hint_2"].item() == pytest.approx(hint, rel=1e-4)
    assert losses["total_loss"].item() == pytest.approx(0.7 * kd + 0.3 * ce + 0.5 * hint, rel=1e-4)


def test_student_with_a_teacher_beats_the_same_student_without(teacher):
    few = load_dataset("digits", batch_size=32, train_limit=120)
    alone, taught = cnn(4, seed=3), cnn(4, seed=3)
    torch.manual_seed(0)
    trainers.finetune(alone, few.train, epochs=12, lr=0.02)
    torch.manual_seed(0)
    trainers.finetune(taught, few.train, epochs=12, lr=0.02, teacher=teacher, temperature=4.0, alpha=0.9)
    alone_top1, taught_top1 = top1_accuracy(alone, few.test), top1_accuracy(taught, few.test)
    # 120 labelled images: the teacher's soft targets carry what the labels alone cannot (0.82 -> 0.92 here).
    assert taught_top1 > alone_top1 + 0.03, (alone_top1, taught_top1)


def test_hints_between_a_pruned_capture_and_its_original_use_1x1_adapters(digits, teacher):
    original = amc.capture(copy.deepcopy(teacher), torch.randn(1, 1, 8, 8))
    pruned = amc.prune(original, channel_ratio=0.5)
    before = top1_accuracy(pruned, digits.val)
    kept = copy.deepcopy(original.state_dict())
    result = trainers.finetune(pruned, digits.train, digits.val, epochs=1, lr=0.02, teacher=original,
                               hints=["1", "3"])
    assert result["train_hint_loss"] == pytest.approx(result["train_hint_1"] + result["train_hint_3"], rel=1e-5)
    assert result["val_top1"] > max(before, 0.8)
    assert all(torch.equal(kept[k], v) for k, v in original.state_dict().items())
    assert not any(module._forward_hooks for module in [*pruned.modules(), *original.modules()])


def test_adapters_are_saved_in_checkpoints_and_restored(digits, teacher, tmp_path):
    def distiller(student):
        return BaseDistiller(digits.train, digits.val, None, student, None,
                             torch.optim.Adam(student.parameters(), lr=1e-3), None, 1, "cpu", None, tmp_path, None,
                             teacher=teacher, hints={"2": "2"}, max_steps=3, verbose=False)

    trained = distiller(cnn(4))
    trained.run()
    assert isinstance(trained.adapter_optimizer, torch.optim.Adam)
    restored = distiller(cnn(4, seed=5))
    assert not torch.equal(restored.adapters["2"].weight, trained.adapters["2"].weight)
    restored.load_checkpoint(tmp_path / "latest.pt")
    assert torch.equal(restored.adapters["2"].weight, trained.adapters["2"].weight)
    assert restored.adapter_optimizer.state_dict()["state"][0]["step"] == 3


def test_hint_adapters_by_feature_shape():
    assert isinstance(hint_adapter(torch.Size([2, 4, 8, 8]), torch.Size([2, 4, 8, 8]), "x"), nn.Identity)
    conv = hint_adapter(torch.Size([2, 4, 8, 8]), torch.Size([2, 6, 8, 8]), "x")
    assert isinstance(conv, nn.Conv2d) and conv.kernel_size == (1, 1) and conv.weight.shape == (6, 4, 1, 1)
    linear = hint_adapter(torch.Size([2, 5, 16]), torch.Size([2, 5, 32]), "tokens")
    assert isinstance(linear, nn.Linear) and linear.weight.shape == (32, 16)
    with pytest.raises(ValueError, match="differ outside the channel dimension"):
        hint_adapter(torch.Size([2, 4, 8, 8]), torch.Size([2, 6, 4, 4]), "x")


def test_bad_distillation_arguments_are_clear_errors(digits, teacher):
    student = cnn(4)
    rnet = amc.capture(cnn(4).eval(), torch.randn(1, 1, 8, 8))
    with pytest.raises(KeyError, match="no node named 'layer9' for a feature hint"):
        feature_module(rnet, "layer9")
    with pytest.raises(ValueError, match="alpha must be in"):
        BaseDistiller(digits.train, network=student, optimizer=torch.optim.SGD(student.parameters(), lr=0.1),
                      teacher=teacher, alpha=1.5)
    with pytest.raises(ValueError, match="feature hints need a teacher"):
        trainers.finetune(student, digits.train, hints=["2"])
    assert issubclass(BaseDistiller, ClassificationTrainer)
