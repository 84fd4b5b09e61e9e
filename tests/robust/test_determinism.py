"""Same seed, same run: on CPU two runs give bit-identical losses (model init from seed_everything, data order
from data.seed, DataLoader workers or not); passkey prompts depend on their seed only."""

from lightning_mamba.cli import main

from .conftest import logged_losses, run_config


def losses(folder, corpus, cache_dir, *args) -> dict[int, float]:
    main(["fit", "--config", run_config(folder, corpus, cache_dir, 4), *args])
    return logged_losses(folder)


def test_same_seed_gives_identical_losses(tmp_path, corpus, cache_dir):
    first = losses(tmp_path / "a", corpus, cache_dir)
    assert sorted(first) == [0, 1, 2, 3]
    assert losses(tmp_path / "b", corpus, cache_dir, "--data.num_workers", "2") == first  # exact
    assert losses(tmp_path / "c", corpus, cache_dir, "--seed_everything", "1")[0] != first[0]  # another init
    assert losses(tmp_path / "d", corpus, cache_dir, "--data.seed", "1")[0] != first[0]  # other data


def test_passkey_prompts_depend_on_the_seed_only():
    from lightning_mamba.data import ByteTokenizer, passkey

    generator = passkey.PasskeyGenerator(ByteTokenizer())
    length = generator.min_length + 40

    def keys(seed):
        return [s.key for s in passkey.grid_samples(generator, length, 0.5, 4, seed=seed)]

    def prompts(seed):
        return [s.tokens.tolist() for s in passkey.grid_samples(generator, length, 0.5, 4, seed=seed)]

    assert prompts(0) == prompts(0)
    assert keys(0) != keys(1)
