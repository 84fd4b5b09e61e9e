"""The study's own commands beyond Lightning's fit/validate/test: each module has ``main(argv) -> int``
(dispatched by ``lightning_mamba.cli``)."""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable, Iterable


def run_command(name: str, work: Callable[[], Iterable[str]], errors: tuple[type[BaseException], ...]) -> int:
    """Run ``work`` and print the lines it returns (exit 0); a bad argument or input among ``errors`` becomes one
    line on stderr, ``<name>: error: ...``, and exit status 2; Ctrl-C one such line and exit status 130."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    try:
        lines = list(work())
    except errors as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        return 2
    except SIGTERMException as e:  # Lightning's SystemExit of code None (exit 0): a run cut short is no success
        print(f"{name}: error: {e.code or 'stopped by SIGTERM'}", file=sys.stderr)
        return getattr(e, "exit_status", 128 + signal.SIGTERM)  # (Ctrl-C: 130)
    except KeyboardInterrupt:  # Ctrl-C outside a fit (or a second one within it): one line, not the stack it hit
        print(f"{name}: error: stopped by Ctrl-C (files already written are kept; none is half-written)",
              file=sys.stderr)
        return 128 + signal.SIGINT
    if lines:
        print("\n".join(lines))
    return 0
