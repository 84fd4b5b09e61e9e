"""The base of every error that reaches the user as one line (no traceback): a bad setting or input, or a run
that cannot go on (a non-finite step). The lowest layer: it imports nothing from the package."""


class UserError(Exception):
    """A bad setting, input or state the user can fix; the message is one line that says what to change.

    ``lightning_mamba.cli`` and the commands print it as ``error: ...`` without a traceback. Subclasses keep their
    other bases (``ValueError``, ``RuntimeError``), so ``except ValueError`` still catches them."""
