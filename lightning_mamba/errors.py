"""The base of every error that reaches the user as one line (no traceback): a bad setting or input, or a run
that cannot go on (a non-finite step, a full disk). The lowest layer: it imports nothing from the package."""

import errno


class UserError(Exception):
    """A bad setting, input or state the user can fix; the message is one line that says what to change.

    ``lightning_mamba.cli`` and the commands print it as ``error: ...`` without a traceback. Subclasses keep their
    other bases (``ValueError``, ``RuntimeError``), so ``except ValueError`` still catches them."""


class DiskFullError(UserError, OSError):
    """No space left on the disk while writing ``path``: one line that names the file and the setting that moves
    it (``setting``, where the writer knows it)."""

    def __init__(self, path: str, setting: str | None = None):
        self.path, self.setting = str(path), setting
        where = f" or set {setting} to a folder on another disk" if setting else ""
        super().__init__(f"disk full while writing {self.path}: free space on its disk{where}")
        self.errno = errno.ENOSPC

    def __reduce__(self):
        return type(self), (self.path, self.setting)


def is_disk_full(e: BaseException) -> bool:
    """An OSError of errno ENOSPC (or EDQUOT: over the disk quota), or torch's failed write of a file (torch.save
    into a path writes from C++: a full disk surfaces as "[enforce fail at inline_container.cc] ...")."""
    if isinstance(e, OSError):
        return e.errno in (errno.ENOSPC, errno.EDQUOT)
    return isinstance(e, RuntimeError) and "inline_container.cc" in str(e) and (
        "file write failed" in str(e) or "unexpected pos" in str(e))
