"""The one backend switch (``backend.py``: torch reference or Triton/mamba_ssm kernels) and our Triton kernels."""
