from .triton_env import mamba_kernels  # noqa: F401  (a fixture for the kernel tests)
