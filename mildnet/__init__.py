"""mildnet: MILDNet visual similarity (Vishvakarma 2019) in PyTorch, with fused kernels and Triton serving."""

__version__ = "0.1.0"
