"""overrides.overridden: a module setting changed for a block and put back after it, an exception too."""

import sys

import pytest

from lightning_mamba.models.kernels.overrides import overridden

SETTING = 16


def test_a_setting_is_changed_inside_the_block_and_put_back_after_it_even_on_an_exception():
    module = sys.modules[__name__]
    with overridden(module, "SETTING", 64):
        assert SETTING == 64
    assert SETTING == 16
    with pytest.raises(KeyError), overridden(module, "SETTING", 0):
        assert SETTING == 0
        raise KeyError("inside")
    assert SETTING == 16
