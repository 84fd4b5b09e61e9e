"""Every error class of the package is a UserError (what ``cli.user_error`` prints as one line) and keeps its other
base, so ``except ValueError`` / ``except RuntimeError`` still catch it."""

import importlib
import inspect
import pkgutil

import lightning_mamba
from lightning_mamba import cli
from lightning_mamba.errors import UserError


def package_error_classes() -> dict[str, type]:
    found = {}
    for info in pkgutil.walk_packages(lightning_mamba.__path__, "lightning_mamba."):
        try:
            module = importlib.import_module(info.name)
        except ImportError:  # an optional dependency (e.g. the CUDA extra) absent here
            continue
        for name, obj in vars(module).items():
            if inspect.isclass(obj) and issubclass(obj, Exception) and obj.__module__ == info.name:
                found[f"{info.name}.{name}"] = obj
    return found


def test_every_package_error_is_a_user_error():
    classes = package_error_classes()
    names = {qual.rsplit(".", 1)[1] for qual in classes}
    assert {"ConfigError", "DataError", "NonFiniteError", "PasskeyError", "SweepError", "AnalyzeError",
            "PasskeyTrendError", "PasskeyCommandError"} <= names
    assert [q for q, c in classes.items() if not issubclass(c, UserError)] == []


def test_other_bases_kept():
    from lightning_mamba.data import DataError
    from lightning_mamba.models import ConfigError
    from lightning_mamba.study.sweep import SweepError
    from lightning_mamba.training.nan_guard import NonFiniteError

    for cls in (ConfigError, DataError, SweepError):
        assert issubclass(cls, ValueError)
    assert issubclass(NonFiniteError, RuntimeError)


def test_user_error_found_behind_wrappers():
    from lightning_mamba.study.passkey_trend import PasskeyTrendError

    inner = PasskeyTrendError("no step_N.json under run/")
    try:
        try:
            raise inner
        except PasskeyTrendError as e:
            raise TypeError("wrapped") from e
    except TypeError as outer:
        assert cli.user_error(outer) is inner
    assert cli.user_error(ValueError("not ours")) is None
