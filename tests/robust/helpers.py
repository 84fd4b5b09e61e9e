"""Test callbacks that act on a real run (named in the run's config by class path): a crash, a slow step,
a NaN weight, an infinite gradient, and a recorder of what each step trained on."""

import math
import sys
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


CONVERSIONS = ("item", "tolist", "__float__", "__int__")  # tensor -> Python: on CUDA each waits for the GPU


class CountConversions(L.Callback):
    """Per training step, from its start to the next one's (so Lightning's bookkeeping after the batch is in it):
    whether it is a logging step, where a tensor was turned into a Python value (:data:`CONVERSIONS`), and what each
    ``self.log`` got: (name, is a tensor, prog_bar). A Python number logged becomes a device tensor: on CUDA a copy
    that waits for the GPU too. The last step is left out (the end of the fit follows it, not a step)."""

    def __init__(self):
        self.steps: list[dict] = []
        self._step: dict | None = None
        self._saved: dict = {}

    def setup(self, trainer, pl_module, stage):
        record = self

        def counted(name, fn):
            def wrapper(*args, **kwargs):
                if record._step is not None:
                    frame = sys._getframe(1)
                    record._step["conversions"].append(f"{frame.f_code.co_filename}:{frame.f_lineno} {name}")
                return fn(*args, **kwargs)
            return wrapper

        def log(module, name, value, *args, prog_bar=False, **kwargs):
            if record._step is not None:
                record._step["logged"].append((name, isinstance(value, torch.Tensor), prog_bar))
            return self._saved["log"](module, name, value, *args, prog_bar=prog_bar, **kwargs)

        self._saved = {name: getattr(torch.Tensor, name) for name in CONVERSIONS}
        for name, fn in self._saved.items():
            setattr(torch.Tensor, name, counted(name, fn))
        self._saved["log"] = L.LightningModule.log
        L.LightningModule.log = log

    def teardown(self, trainer, pl_module, stage):
        if "log" in self._saved:
            L.LightningModule.log = self._saved.pop("log")
        for name, fn in self._saved.items():
            setattr(torch.Tensor, name, fn)
        self._saved = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self._step is not None:
            self.steps.append(self._step)
        self._step = {"logging": trainer._logger_connector.should_update_logs, "conversions": [], "logged": []}

    def on_train_end(self, trainer, pl_module):
        self._step = None


class RecordLossAndBar(L.Callback):
    """Per step: the training loss, the progress bar's metrics and the callback metrics after the step."""

    def __init__(self):
        self.losses, self.bars, self.skipped = [], [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))
        self.bars.append(dict(trainer.progress_bar_metrics))
        skipped = trainer.callback_metrics.get("train/skipped_batches")
        self.skipped.append(None if skipped is None else float(skipped))


class StopAfterBatch(L.Callback):
    """Sets ``trainer.should_stop`` at the end of batch ``batch`` (as max_time or an early stop does)."""

    def __init__(self, batch: int):
        self.batch = batch

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == self.batch:
            trainer.should_stop = True
