"""What counts as typed on the command line (as opposed to given by a config file)."""
from lightning_mamba.training.run_checks import config_files, typed_options


def test_typed_options_are_dotted_keys_whatever_the_spelling():
    argv = ["fit", "--config", "a.yaml", "--model.lr", "1e-3", "--model.init_args.chunk_size=32", "--data.seq_len=64",
            "-c", "b.yaml", "--model_overrides", "{a: 1}", "--", "value"]
    assert typed_options(argv) == {"config", "model.lr", "model.chunk_size", "data.seq_len", "model_overrides"}
    assert config_files(argv) == ["a.yaml", "b.yaml"]


def test_a_value_is_not_an_option():
    # values follow their option as separate tokens; only tokens that start with -- are options
    assert typed_options(["--model.d_state", "64", "model.lr"]) == {"model.d_state"}
