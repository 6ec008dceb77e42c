"""Trainer checkpoints: what they hold, atomic writes that survive SIGKILL, resume to the uninterrupted result,
and pruned networks' checkpoints that load only into the matching shapes."""
import os
import runpy
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
import torch.nn as nn

import amc
from trainers import ClassificationTrainer
from trainers.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from trainers.datasets import load_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

JOB = textwrap.dedent('''
    """A 3-epoch digits run with checkpoints; with a marker path it stalls in epoch 2 (to be killed there)."""
    import os
    import sys
    import time

    import torch
    import torch.nn as nn

    from trainers import ClassificationTrainer
    from trainers.callbacks import Callback
    from trainers.datasets import load_dataset


    class StallInSecondEpoch(Callback):
        def __init__(self, marker):
            self.marker = marker

        def on_batch_end(self, trainer, step):
            if trainer.epoch == 1 and step == trainer.global_step and step % len(trainer._train_loader) == 5:
                open(self.marker, "w").close()
                time.sleep(120)


    def build(folder, callbacks=()):
        torch.manual_seed(0)
        data = load_dataset("digits", batch_size=64)
        network = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 64, 10))
        optimizer = torch.optim.SGD(network.parameters(), lr=0.05, momentum=0.9)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
        return ClassificationTrainer(data.train, data.val, None, network, None, optimizer, scheduler, 3, "cpu",
                                     None, folder, None, callbacks=callbacks, verbose=False)


    if __name__ == "__main__":
        torch.set_num_threads(1)
        build(sys.argv[1], [StallInSecondEpoch(sys.argv[2])]).run(resume=True)
''')


def run_job_in_process(script, folder, resume):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trainer = runpy.run_path(script, run_name="job")["build"](folder)
        return trainer, trainer.run(resume=resume)
    finally:
        torch.set_num_threads(threads)


def test_sigkill_mid_epoch_loses_only_that_epoch_and_resume_matches_the_uninterrupted_run(tmp_path):
    script, marker, folder = tmp_path / "job.py", tmp_path / "stalled", tmp_path / "ckpt"
    script.write_text(JOB)
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, str(script), str(folder), str(marker)], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert process.poll() is None, process.stderr.read().decode()
            assert time.monotonic() < deadline, "the job never reached its second epoch"
            time.sleep(0.05)
        os.kill(process.pid, signal.SIGKILL)
        assert process.wait(timeout=10) == -signal.SIGKILL
    finally:
        if process.poll() is None:
            process.kill()
        process.stderr.close()
    assert sorted(os.listdir(folder)) == ["best.pt", "latest.pt"]  # no temporary file left behind
    state = load_checkpoint(folder / "latest.pt")
    assert state["epoch"] == 1 and state["global_step"] == 21 and len(state["history"]) == 1

    resumed, resumed_summary = run_job_in_process(script, str(folder), resume=True)
    assert resumed_summary["epochs_run"] == 2 and resumed_summary["global_step"] == 63
    reference, reference_summary = run_job_in_process(script, str(tmp_path / "reference"), resume=False)
    for name, tensor in reference.network.state_dict().items():
        torch.testing.assert_close(resumed.network.state_dict()[name], tensor, rtol=1e-5, atol=1e-6)
    assert resumed.optimizer.param_groups[0]["lr"] == reference.optimizer.param_groups[0]["lr"] == 0.05 / 8
    assert [h["val_top1"] for h in resumed_summary["history"]] == \
        pytest.approx([h["val_top1"] for h in reference_summary["history"]], abs=1e-6)


WRITER = textwrap.dedent('''
    import sys
    import torch
    from trainers.checkpoint import save_checkpoint

    step = 0
    while True:
        step += 1
        save_checkpoint({"step": step, "weights": torch.full((4_000_000,), float(step))}, sys.argv[1])
''')


def test_checkpoint_killed_while_being_written_is_never_torn(tmp_path):
    script, path = tmp_path / "writer.py", tmp_path / "latest.pt"
    script.write_text(WRITER)
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    process = subprocess.Popen([sys.executable, str(script), str(path)], env=env, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not path.exists():
            assert process.poll() is None, process.stderr.read().decode()
            assert time.monotonic() < deadline
            time.sleep(0.02)
        time.sleep(0.5)  # several more 16 MB writes, one of them in flight when the kill lands
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
    finally:
        if process.poll() is None:
            process.kill()
        process.stderr.close()
    state = load_checkpoint(path)
    assert state["step"] >= 1 and torch.equal(state["weights"], torch.full((4_000_000,), float(state["step"])))


def small_cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                         nn.Linear(8 * 64, 10))


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", batch_size=128)


def make_trainer(network, digits, folder, epochs=2):
    optimizer = torch.optim.SGD(network.parameters(), lr=0.05, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    return ClassificationTrainer(digits.train, digits.val, None, network, None, optimizer, scheduler, epochs, "cpu",
                                 None, folder, None, verbose=False)


def test_checkpoint_holds_model_optimizer_scheduler_epoch_best_metric_and_rng(digits, tmp_path):
    network = small_cnn()
    trainer = make_trainer(network, digits, tmp_path)
    summary = trainer.run()
    state = load_checkpoint(tmp_path / "latest.pt")
    assert all(torch.equal(state["model"][k], v) for k, v in network.state_dict().items())
    momentum = state["optimizer"]["state"][0]["momentum_buffer"]
    assert torch.equal(momentum, trainer.optimizer.state[network[0].weight]["momentum_buffer"])
    assert state["scheduler"]["last_epoch"] == 2 and state["epoch"] == 2
    best_epoch = max(summary["history"], key=lambda h: h["val_top1"])
    assert state["best_metric"] == best_epoch["val_top1"] == summary["best_metric"]
    assert load_checkpoint(tmp_path / "best.pt")["epoch"] == best_epoch["epoch"] + 1
    assert torch.equal(state["rng"]["torch"], torch.get_rng_state())


def test_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "latest.pt"
    save_checkpoint({"epoch": 1}, path)

    def crash(obj, file, *args, **kwargs):
        with open(file, "wb") as handle:
            handle.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint({"epoch": 2}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 1
    assert os.listdir(tmp_path) == ["latest.pt"]


def test_pruned_network_checkpoint_loads_into_the_pruned_network_and_not_the_original(digits, tmp_path):
    model = small_cnn().eval()
    rnet = amc.capture(model, torch.randn(1, 1, 8, 8))
    pruned = amc.prune(rnet, channel_ratio=0.5)
    make_trainer(pruned, digits, tmp_path / "pruned", epochs=1).run()
    same_shapes = amc.prune(amc.capture(small_cnn().eval(), torch.randn(1, 1, 8, 8)), channel_ratio=0.5)
    restored = make_trainer(same_shapes, digits, tmp_path / "pruned", epochs=1)
    restored.load_checkpoint(tmp_path / "pruned" / "latest.pt")
    x = next(iter(digits.val))[0]
    torch.testing.assert_close(same_shapes.eval()(x), pruned.eval()(x))
    original = make_trainer(rnet, digits, tmp_path / "original", epochs=1)
    expected = r"does not fit this network .*\n  nodes\.0\.weight: saved \(4, 1, 3, 3\), network has \(8, 1, 3, 3\)"
    with pytest.raises(CheckpointError, match=expected):
        original.load_checkpoint(tmp_path / "pruned" / "latest.pt")


def test_resume_starts_fresh_without_a_checkpoint_and_refuses_without_a_folder(digits, tmp_path):
    summary = make_trainer(small_cnn(), digits, tmp_path, epochs=1).run(resume=True)
    assert summary["epochs_run"] == 1
    again = make_trainer(small_cnn(), digits, tmp_path, epochs=1).run(resume=True)
    assert again["epochs_run"] == 0 and again["global_step"] == summary["global_step"]
    with pytest.raises(CheckpointError, match="needs a checkpoints_folder"):
        make_trainer(small_cnn(), digits, None, epochs=1).run(resume=True)
    (tmp_path / "not_a_checkpoint.pt").write_bytes(b"junk")
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a trainer checkpoint"):
        make_trainer(small_cnn(), digits, None, epochs=1).run(resume=tmp_path / "other.pt")
