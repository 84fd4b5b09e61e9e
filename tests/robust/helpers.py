"""Test callbacks that act on a real run (named in the run's config by class path): a crash, a slow step,
a NaN weight, an infinite gradient, and a recorder of what each step trained on."""

import math
import time

import lightning as L
import torch


class SimulatedCrash(RuntimeError):
    pass


class CrashAt(L.Callback):
    """Raise when step ``step`` would start, i.e. just after the checkpoint of step ``step`` was written."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise SimulatedCrash(f"crash before step {self.step}")


class SlowSteps(L.Callback):
    """Sleep after each step, so that a test can kill the process mid-run."""

    def __init__(self, seconds: float = 0.2):
        self.seconds = seconds

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        time.sleep(self.seconds)


class PoisonParameter(L.Callback):
    """Write ``value`` into one element of parameter ``name`` when step ``step`` starts."""

    def __init__(self, step: int, name: str, value: float = math.nan):
        self.step, self.name, self.value = step, name, value

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            with torch.no_grad():
                dict(pl_module.named_parameters())[self.name].view(-1)[0] = self.value


class InfiniteGradient(L.Callback):
    """Make the gradient of parameter ``name`` infinite at step ``step`` (the loss stays finite)."""

    def __init__(self, step: int, name: str):
        self.step, self.name = step, name

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            param = dict(pl_module.named_parameters())[self.name]
            handle = param.register_hook(lambda g: (handle.remove(), torch.full_like(g, math.inf))[1])


class RecordSteps(L.Callback):
    """For each step: the batch it trained on, the data module's state at that point, parameter snapshots."""

    def __init__(self):
        self.batches, self.states, self.params = [], [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.batches.append(batch["input_ids"].clone())
        self.states.append(trainer.datamodule.state_dict())
        self.params.append({n: p.detach().clone() for n, p in pl_module.named_parameters()})


class Unpicklable:
    def __reduce__(self):
        raise OSError("disk full (simulated, while writing the checkpoint)")


class FailingSave(L.Callback):
    """From step ``step`` on, put something into the checkpoint that fails while it is being written."""

    def __init__(self, step: int):
        self.step, self.trainer = step, None

    def setup(self, trainer, pl_module, stage):
        self.trainer = trainer

    def state_dict(self):
        return {"payload": Unpicklable()} if self.trainer is not None and self.trainer.global_step >= self.step else {}


class FusedOptimizer(L.Callback):
    """Turn the run's AdamW into its fused implementation before the first step (what training on CUDA uses), so
    the NaN guard's deferred check (the optimizer's ``found_inf``) runs on the CPU too."""

    def on_train_start(self, trainer, pl_module):
        for optimizer in trainer.optimizers:
            optimizer.defaults.update(fused=True, foreach=False)
            for group in optimizer.param_groups:
                group.update(fused=True, foreach=False)
