"""mildnet: MILDNet visual similarity (Vishvakarma 2019) in PyTorch, with fused kernels and Triton serving."""

__version__ = "0.1.0"

# Registers torch.ops.mildnet.* (the fused kernels, their fake and autograd formulas), as `import torchvision`
# registers torchvision's ops. ops imports only torch and the compiled mildnet._C: no other room, so no cycle.
from . import ops  # noqa: E402,F401
