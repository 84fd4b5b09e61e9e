"""``lightning-mamba``: the LightningCLI (fit / validate / test / predict) plus the study's own commands."""

from __future__ import annotations

import importlib
import signal
import sys

from lightning.pytorch.utilities.exceptions import SIGTERMException

from .training.cli import MambaCLI, lightning_cli
from .training.run_checks import user_error

# Commands beyond Lightning's: name -> module with a ``main(argv)``.
COMMANDS = {
    "export": "lightning_mamba.commands.export",
    "analyze": "lightning_mamba.commands.analyze",
    "passkey": "lightning_mamba.commands.passkey",
    "passkey-trend": "lightning_mamba.commands.passkey_trend",
    "sweep": "lightning_mamba.commands.sweep",
    "mitigate": "lightning_mamba.commands.mitigate",
}

DESCRIPTION = ("Train and study Mamba-2 LMs. Extra commands: " + ", ".join(COMMANDS)
               + " (run `lightning-mamba COMMAND --help`).")

__all__ = ["COMMANDS", "MambaCLI", "lightning_cli", "main", "user_error"]


def main(argv: list[str] | None = None) -> None:
    from_shell = argv is None  # LightningCLI then reads sys.argv itself (and does not warn about args)
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in COMMANDS:
        module = importlib.import_module(COMMANDS[argv[0]])
        sys.exit(module.main(argv[1:]))
    try:
        lightning_cli(None if from_shell else argv, description=DESCRIPTION)
        end_process_group()
    except SIGTERMException as e:  # a SystemExit of code None (exit 0): a run cut short is no success
        print(f"error: {e.code or 'stopped by SIGTERM'}", file=sys.stderr)
        sys.exit(getattr(e, "exit_status", 128 + signal.SIGTERM))  # (Ctrl-C: 130)
    except Exception as e:
        cause = user_error(e)
        if cause is None:
            raise
        sys.exit(f"error: {cause}")  # bad settings: one line that says what to change, no traceback


def end_process_group() -> None:
    """Close the DDP process group a run opened (Lightning leaves it open): with gloo's threads still running at
    interpreter exit, a finished run now and then died with "terminate called without an active exception" and a
    non-zero exit status."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # no process closes it while another still uses it
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
