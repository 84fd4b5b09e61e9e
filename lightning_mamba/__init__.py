"""lightning_mamba: train and study Mamba-2 LMs with PyTorch Lightning."""
__version__ = "0.1.0"
