"""`sweep --cells`: only the named cells of the grid, in the given order (to fill a grid's gaps)."""
import pytest

from lightning_mamba.commands import sweep as cmd
from lightning_mamba.study.sweep import Study, SweepError, make_cells


def dry_run_names(capsys, *args: str) -> list[str]:
    assert cmd.main(["--states", "[8,16,32]", "--lens", "[32,64]", "--dry_run", "true", *args]) == 0
    return [line.split(":")[0] for line in capsys.readouterr().out.splitlines()]


def test_the_named_cells_run_in_the_given_order_and_shards_take_them_in_turn(capsys):
    assert len(dry_run_names(capsys)) == 6
    named = ["state32_len32", "state8_len64", "state16_len32"]
    assert dry_run_names(capsys, "--cells", "[" + ",".join(named) + "]") == named
    assert dry_run_names(capsys, "--cells", "[" + ",".join(named) + "]", "--shard", "1/2") == ["state8_len64"]


def test_seeded_cells_are_named_with_their_seed():
    study = Study(states=[8], lens=[32, 64], seeds=[0, 1], cells=["state8_len64_seed1"])
    study.validate()
    assert [(c.seq_len, c.seed) for c in make_cells(study)] == [(64, 1)]


@pytest.mark.parametrize("cells, message", [
    (["state8_len48"], r"cells \['state8_len48'\] are not cells of this grid: name some of state8_len32, "),
    ([], r"cells \[\] are not cells of this grid"),
    (["state8_len32", "state8_len32"], r"name a cell twice"),
])
def test_cells_outside_the_grid_are_refused(cells, message):
    with pytest.raises(SweepError, match=message):
        Study(states=[8], lens=[32, 64], cells=cells).validate()


def test_a_bad_cell_name_is_a_one_line_error(capsys):
    assert cmd.main(["--states", "[8]", "--lens", "[32]", "--cells", "[state9_len32]", "--dry_run", "true"]) == 2
    assert "sweep: error: cells ['state9_len32'] are not cells of this grid" in capsys.readouterr().err
