"""--trainer.max_time mid-run (how a study's cells share a device session): the fit stops at the step where the time
ran out with last.ckpt saved there, not at ModelCheckpoint's last interval (Lightning saves it at the end of the
stopped epoch), and the resumed run gives the losses of the uninterrupted one to the last bit (CPU)."""

import torch

from lightning_mamba.cli import main

from .conftest import logged_losses
from .test_sigterm import STEPS, config


def test_a_time_limit_saves_the_step_it_stopped_at_and_resumes_exactly(tmp_path, corpus, cache_dir):
    assert torch.get_num_threads() == 1
    main(["fit", "--config", config(tmp_path / "reference", corpus, cache_dir)])
    reference = logged_losses(tmp_path / "reference")

    folder = tmp_path / "run"
    cfg = config(folder, corpus, cache_dir, progress=str(tmp_path / "progress"))  # 0.3 s a step
    main(["fit", "--config", cfg, "--trainer.max_time", "00:00:00:01"])
    last = folder / "ckpt" / "last.ckpt"
    assert last.exists()  # the run's interval is 100 steps: this one is the stop's
    stopped_at = torch.load(last, weights_only=True)["global_step"]
    assert 1 <= stopped_at < STEPS
    assert sorted(logged_losses(folder)) == list(range(stopped_at))

    main(["fit", "--config", config(folder, corpus, cache_dir), "--ckpt_path", str(last)])
    resumed = logged_losses(folder, version=str(folder / "runs" / "tiny" / "version_1"))
    assert sorted(resumed) == list(range(stopped_at, STEPS))
    assert resumed == {s: reference[s] for s in resumed}  # exact, no tolerance
