"""Trainers: the wiki's BaseTrainer loop and hooks, ClassificationTrainer, finetune(), logging, schedulers,
callbacks, mixed precision; trained for real on scikit-learn's digits."""
import copy
import glob
import math
import struct

import pytest
import torch
import torch.nn as nn

import amc
import trainers
from compressors.base import top1_accuracy
from trainers import BaseTrainer, ClassificationTrainer
from trainers.callbacks import Callback
from trainers.classification import topk_accuracies


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                         nn.Linear(8 * 64, 10))


def sgd(network: nn.Module, lr: float = 0.05) -> torch.optim.Optimizer:
    return torch.optim.SGD(network.parameters(), lr=lr, momentum=0.9)


def trainer_for(network, digits, cls=ClassificationTrainer, epochs=1, **kwargs):
    return cls(train_loader=digits.train, val_loader=digits.val, eval_loader=None, network=network,
               criterion=nn.CrossEntropyLoss(), optimizer=kwargs.pop("optimizer", None) or sgd(network),
               scheduler=kwargs.pop("scheduler", None), epochs=epochs, device="cpu",
               tbx_writer=kwargs.pop("tbx_writer", None), checkpoints_folder=kwargs.pop("checkpoints_folder", None),
               additional_args=kwargs.pop("additional_args", None), verbose=False, **kwargs)


class RecordingWriter:
    """Stands in for a SummaryWriter: keeps every add_scalar call."""

    def __init__(self):
        self.scalars = {}

    def add_scalar(self, tag, value, step):
        self.scalars.setdefault(tag, []).append((step, float(value)))

    def flush(self):
        pass


def test_classification_trainer_raises_digits_accuracy_and_evaluates_the_eval_loader(digits):
    network = small_cnn()
    before = top1_accuracy(network, digits.val)
    trainer = ClassificationTrainer(digits.train, digits.val, digits.test, network, None, sgd(network), None, 2,
                                    "cpu", None, None, None, verbose=False)
    summary = trainer.run()
    after = top1_accuracy(network, digits.val)
    assert before < 0.3 and after > 0.85
    assert summary["val_top1"] == pytest.approx(after, abs=1e-6)
    assert summary["eval_top1"] == pytest.approx(top1_accuracy(network, digits.test), abs=1e-6)
    assert summary["epochs_run"] == 2 and summary["global_step"] == 2 * len(digits.train)


class WikiTrainer(BaseTrainer):
    """The wiki's CIFAR10Trainer, hooks under their dunder names, recording what reached them."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen = {}

    def __get_train_batch_preds__(self, batch_train_data, *args, **kwargs):
        self.seen.setdefault("train_preds", kwargs)
        return self._network(batch_train_data[0].to(self._device))

    def __get_train_losses__(self, batch_preds, batch_train_data, *args, **kwargs):
        self.seen.setdefault("train_losses", kwargs)
        return {"total_loss": self._criterion(batch_preds, batch_train_data[1])}

    def __get_val_batch_preds__(self, batch_val_data, *args, **kwargs):
        self.seen.setdefault("val_preds", kwargs)
        return self._network(batch_val_data[0])

    def __get_val_losses__(self, batch_preds, batch_val_data, *args, **kwargs):
        self.seen.setdefault("val_losses", kwargs)
        return {"total_loss": self._criterion(batch_preds, batch_val_data[1])}

    def __if_stop_trainning__(self, *args, **kwargs):
        lr = self._optimizer.param_groups[-1]["lr"]
        return lr < kwargs["stop_lr"]


def test_wiki_dunder_hooks_run_and_receive_the_run_keyword_arguments(digits):
    network = small_cnn()
    optimizer = sgd(network)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.1)
    trainer = trainer_for(network, digits, cls=WikiTrainer, epochs=5, optimizer=optimizer, scheduler=scheduler)
    summary = trainer.__run__(stop_lr=1e-3, tag="x")
    # lr 0.05 -> 0.005 -> 0.0005 < 1e-3 after the second epoch: the wiki's stop condition ends the run there.
    assert summary["epochs_run"] == 2
    assert set(trainer.seen) == {"train_preds", "train_losses", "val_preds", "val_losses"}
    assert all(kwargs == {"stop_lr": 1e-3, "tag": "x"} for kwargs in trainer.seen.values())
    assert summary["val_total_loss"] < math.log(10)


class ExtraLossTrainer(ClassificationTrainer):
    """Overrides the idiomatic name; the wiki name must reach it."""

    def train_losses(self, preds, batch, *args, **kwargs):
        ce = self._criterion(preds, batch[1])
        l2 = sum((p ** 2).sum() for p in self.network.parameters()) * kwargs["decay"]
        return {"total_loss": ce + l2, "ce": ce, "l2": l2}


def test_idiomatic_override_is_reached_through_the_wiki_name_and_every_loss_is_logged(digits):
    network = small_cnn()
    writer = RecordingWriter()
    trainer = trainer_for(network, digits, cls=ExtraLossTrainer, tbx_writer=writer)
    batch = next(iter(digits.train))
    losses = trainer.__get_train_losses__(network(batch[0]), batch, decay=1e-3)
    assert set(losses) == {"total_loss", "ce", "l2"}
    l2 = sum(float((p.detach() ** 2).sum()) for p in network.parameters()) * 1e-3
    assert losses["l2"].item() == pytest.approx(l2, rel=1e-5)
    summary = trainer.run(decay=1e-3)
    assert summary["train_total_loss"] == pytest.approx(summary["train_ce"] + summary["train_l2"], rel=1e-5)
    for tag in ("train/total_loss", "train/ce", "train/l2", "train/top1", "val/top1", "val/top5",
                "val/total_loss", "lr", "epoch_time"):
        assert tag in writer.scalars, tag
    assert len(writer.scalars["train_step/l2"]) == len(digits.train)


def test_defining_both_a_step_and_its_wiki_alias_is_an_error():
    with pytest.raises(TypeError, match="both train_losses and its wiki alias"):
        type("Both", (BaseTrainer,), {"train_losses": lambda self, *a: {},
                                      "__get_train_losses__": lambda self, *a: {}})


def read_scalars(event_file: str) -> dict[str, list[float]]:
    """Parse a TFRecord event file by hand (length, crc, Event proto, crc)."""
    from tensorboardX.proto import event_pb2

    scalars = {}
    with open(event_file, "rb") as handle:
        data = handle.read()
    offset = 0
    while offset < len(data):
        (length,) = struct.unpack("<Q", data[offset:offset + 8])
        event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
        offset += 12 + length + 4
        for value in event.summary.value:
            scalars.setdefault(value.tag, []).append(value.simple_value)
    return scalars


def test_tensorboardx_event_file_holds_losses_accuracy_lr_and_epoch_time(digits, tmp_path):
    network = small_cnn()
    trainer = trainer_for(network, digits, epochs=2, tbx_writer=str(tmp_path / "runs"))
    summary = trainer.run()
    trainer._tbx_writer.close()
    (event_file,) = glob.glob(str(tmp_path / "runs" / "events.out.tfevents.*"))
    scalars = read_scalars(event_file)
    assert scalars["val/top1"] == pytest.approx([epoch["val_top1"] for epoch in summary["history"]])
    assert scalars["lr"] == pytest.approx([0.05, 0.05])
    assert len(scalars["epoch_time"]) == 2 and all(t > 0 for t in scalars["epoch_time"])
    assert len(scalars["train_step/total_loss"]) == 2 * len(digits.train)


class RecordingPlateau(torch.optim.lr_scheduler.ReduceLROnPlateau):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.values = []

    def step(self, metrics, *args, **kwargs):
        self.values.append(float(metrics))
        super().step(metrics, *args, **kwargs)


def test_reduce_lr_on_plateau_is_stepped_with_the_monitored_validation_metric(digits):
    network = small_cnn()
    optimizer = sgd(network)
    scheduler = RecordingPlateau(optimizer, mode="max", patience=0, factor=0.5, threshold=10.0)
    trainer = trainer_for(network, digits, epochs=2, optimizer=optimizer, scheduler=scheduler)
    summary = trainer.run()
    assert scheduler.values == [epoch["val_top1"] for epoch in summary["history"]]
    # The relative threshold of 10x can never be met, so every epoch after the first halves the rate.
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.025)


class Recorder(Callback):
    def __init__(self):
        self.events, self.lrs = [], []

    def on_train_begin(self, trainer):
        self.events.append("begin")

    def on_epoch_begin(self, trainer, epoch):
        self.events.append(f"epoch{epoch}")

    def on_batch_end(self, trainer, step):
        self.events.append(step)
        self.lrs.append(trainer.optimizer.param_groups[0]["lr"])

    def on_epoch_end(self, trainer, epoch, metrics):
        self.events.append(("end", epoch, metrics["val_top1"]))


def test_finetune_follows_a_per_step_cosine_and_calls_back_after_each_step(digits):
    network = small_cnn()
    recorder = Recorder()
    result = trainers.finetune(network, digits.train, digits.val, epochs=3, max_steps=30, lr=0.1,
                               callbacks=[recorder])
    assert result["steps"] == 30 and result["epochs_run"] == 2
    # lr seen after step k is the cosine at k: 0.05 * (1 + cos(pi k / 30)).
    assert recorder.lrs == pytest.approx([0.05 * (1 + math.cos(math.pi * k / 30)) for k in range(1, 31)])
    steps = len(digits.train)
    assert recorder.events == (["begin", "epoch0", *range(1, steps + 1), ("end", 0, result["history"][0]["val_top1"]),
                                "epoch1", *range(steps + 1, 31), ("end", 1, result["val_top1"])])
    assert result["val_top1"] == pytest.approx(top1_accuracy(network, digits.val), abs=1e-6)
    assert result["val_top1"] > 0.85


class ZeroChannels(Callback):
    """Re-applies a pruning mask after every optimiser step (what a mask-based compressor does)."""

    def __init__(self, conv, channels):
        self.conv, self.channels = conv, channels

    def on_batch_end(self, trainer, step):
        with torch.no_grad():
            self.conv.weight[self.channels] = 0
            self.conv.bias[self.channels] = 0


def test_mask_reapplied_in_on_batch_end_holds_through_fine_tuning(digits):
    network = small_cnn()
    masked = [0, 3, 5]
    trainers.finetune(network, digits.train, epochs=1, lr=0.05, callbacks=[ZeroChannels(network[0], masked)])
    assert network[0].weight[masked].abs().sum() == 0 and network[0].bias[masked].abs().sum() == 0
    assert network[0].weight[[1, 2, 4]].abs().sum() > 0


def test_captured_network_fine_tunes_and_the_original_is_untouched(digits):
    model = small_cnn().eval()
    original = copy.deepcopy(model.state_dict())
    rnet = amc.capture(model, torch.randn(1, 1, 8, 8))
    before = top1_accuracy(rnet, digits.val)
    trainers.finetune(rnet, digits.train, digits.val, epochs=1, lr=0.05)
    assert before < 0.3 and top1_accuracy(rnet, digits.val) > 0.85
    assert all(torch.equal(original[key], value) for key, value in model.state_dict().items())


@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_mixed_precision_autocast_trains_on_the_cpu(digits, precision, dtype):
    network = small_cnn()
    dtypes = set()
    network[0].register_forward_hook(lambda module, args, output: dtypes.add(output.dtype))
    result = trainers.finetune(network, digits.train, digits.val, epochs=1, lr=0.05, precision=precision)
    assert dtypes == {dtype}
    assert network[0].weight.dtype == torch.float32
    assert result["val_top1"] > 0.8


def test_pruned_network_fine_tunes_back(digits):
    model = small_cnn()
    trainers.finetune(model, digits.train, epochs=1, lr=0.05)
    rnet = amc.capture(model.eval(), torch.randn(1, 1, 8, 8))
    small = amc.prune(rnet, channel_ratio=0.75)
    assert small.nodes[small.node("0").key].out_channels == 2
    result = trainers.finetune(small, digits.train, digits.val, epochs=1, lr=0.05)
    assert result["val_top1"] > 0.8


def test_topk_accuracies_match_a_hand_count():
    logits = torch.tensor([[0.1, 0.5, 0.2, 0.0, 0.9, 0.3],
                           [0.9, 0.1, 0.2, 0.3, 0.4, 0.5],
                           [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]])
    labels = torch.tensor([4, 5, 0])
    # row 0: label ranked 1st; row 1: 2nd; row 2: last of 6.
    assert topk_accuracies(logits, labels, (1, 2, 5, 7)) == pytest.approx({"top1": 1 / 3, "top2": 2 / 3,
                                                                           "top5": 2 / 3})


def test_nan_loss_stops_with_a_clear_error(digits):
    network = small_cnn()
    trainer = trainer_for(network, digits, optimizer=sgd(network, lr=float("nan")))
    with pytest.raises(FloatingPointError, match="step 2"):
        trainer.run()


@pytest.mark.parametrize("change, error", [
    (dict(epochs=0), "epochs must be a positive integer"),
    (dict(network="net"), "network must be an nn.Module"),
    (dict(optimizer="sgd"), "optimizer must be a torch.optim.Optimizer"),
    (dict(precision="fp8"), "unknown precision 'fp8'"),
    (dict(scheduler_interval="batch"), "scheduler_interval must be one of"),
    (dict(tbx_writer=3), "tbx_writer must be a tensorboardX SummaryWriter"),
])
def test_bad_arguments_are_clear_errors(digits, change, error):
    network = small_cnn()
    arguments = dict(train_loader=digits.train, network=network, optimizer=sgd(network), device="cpu")
    arguments.update(change)
    with pytest.raises((TypeError, ValueError), match=error):
        ClassificationTrainer(**arguments)


def test_losses_without_total_loss_are_a_clear_error(digits):
    class NoTotal(ClassificationTrainer):
        def train_losses(self, preds, batch, *args, **kwargs):
            return {"ce": self._criterion(preds, batch[1])}

    network = small_cnn()
    with pytest.raises(TypeError, match="'total_loss'"):
        trainer_for(network, digits, cls=NoTotal).run()


def test_amc_finetune_distils_a_saved_pruned_network_and_saves_it(digits, tmp_path, capsys):
    from amc.cli import main
    from graph import load

    model = small_cnn()
    trainers.finetune(model, digits.train, epochs=1, lr=0.05)
    original = amc.capture(model.eval(), torch.randn(1, 1, 8, 8))
    pruned = amc.prune(original, channel_ratio=0.5)
    original.save(pkl=str(tmp_path / "original.pkl"))
    pruned.save(pkl=str(tmp_path / "pruned.pkl"))
    before = top1_accuracy(pruned, digits.test)
    assert main(["finetune", str(tmp_path / "pruned.pkl"), "--epochs", "1", "--lr", "0.02", "--teacher",
                 str(tmp_path / "original.pkl"), "--checkpoints", str(tmp_path / "ckpt"),
                 "-o", str(tmp_path / "tuned.pkl")]) == 0
    out = capsys.readouterr().out
    assert "distilled from" in out
    printed_before, printed_after = (float(v) for v in out.splitlines()[2].split())
    tuned = load(str(tmp_path / "tuned.pkl"))
    assert printed_before == pytest.approx(before, abs=1e-4)
    assert printed_after == pytest.approx(top1_accuracy(tuned, digits.test), abs=1e-4)
    assert printed_after > max(before, 0.8)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["best.pt", "latest.pt"]


def test_amc_finetune_refuses_a_network_that_does_not_take_the_data(tmp_path, capsys):
    from amc.cli import main

    wrong = amc.capture(nn.Sequential(nn.Flatten(), nn.Linear(64, 3)).eval(), torch.randn(1, 1, 8, 8))
    wrong.save(pkl=str(tmp_path / "wrong.pkl"))
    assert main(["finetune", str(tmp_path / "wrong.pkl")]) == 2
    assert "returns (2, 3) for 2 images, not (2, 10) class logits" in capsys.readouterr().err
    assert main(["finetune", str(tmp_path / "missing.pkl")]) == 2
    assert "file not found" in capsys.readouterr().err


class GradientNorms(Callback):
    def __init__(self):
        self.norms = []

    def on_batch_end(self, trainer, step):
        grads = [p.grad for p in trainer.network.parameters() if p.grad is not None]
        self.norms.append(float(torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads]))))


def test_grad_clip_norm_bounds_the_gradient_that_is_stepped(digits):
    clipped, free = GradientNorms(), GradientNorms()
    trainer_for(small_cnn(), digits, callbacks=[clipped], grad_clip_norm=0.05, max_steps=5).run()
    trainer_for(small_cnn(), digits, callbacks=[free], max_steps=5).run()
    assert max(clipped.norms) <= 0.05 * (1 + 1e-4)
    assert min(free.norms) > 0.05


def test_device_none_keeps_the_network_where_it_is_and_a_missing_accelerator_is_an_error():
    from trainers.devices import resolve_device

    assert resolve_device(None, nn.Linear(2, 2)) == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else
                                           "mps" if torch.backends.mps.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda:0")
