"""The Lightning glue: the LightningModule, initial states, the lr schedule, CUDA graphs, sharding, the NaN guard,
the CLI class, and Lightning checkpoint IO (including loading a .ckpt into a model)."""

from .module import MambaLitModule

__all__ = ["MambaLitModule"]
