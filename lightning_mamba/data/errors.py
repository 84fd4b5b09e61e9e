"""The one exception the data layer raises for bad settings or inputs."""

from ..errors import UserError


class DataError(UserError, ValueError):
    """A data setting or input that cannot work; the message is one line that says what to change.

    The CLI prints it as ``error: ...`` without a traceback."""
