"""The study's own commands beyond Lightning's fit/validate/test: each module has ``main(argv) -> int``
(dispatched by ``lightning_mamba.cli``)."""
