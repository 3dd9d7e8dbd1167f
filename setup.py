"""Builds mildnet._C: the fused MILDNet-head ops (kernels/), registered as torch.ops.mildnet.*.

CUDA kernels are compiled whenever nvcc and a CUDA-enabled torch are present, even on a machine with no GPU;
MILDNET_NO_CUDA=1 forces the CPU-only build. TORCH_CUDA_ARCH_LIST overrides the default targets (sm_80, sm_90+PTX).
"""
import os
import shutil
import subprocess

from setuptools import find_packages, setup


def find_cuda_home():
    """The toolkit's real folder: $CUDA_HOME when it holds the headers, else where nvcc itself says it lives
    (nvcc may be a symlink or a wrapper script, so the folder above it on PATH can be the wrong one)."""
    home = os.environ.get("CUDA_HOME")
    if home and os.path.isfile(os.path.join(home, "include", "cuda_runtime.h")):
        return home
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    dry = subprocess.run([nvcc, "-dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull], capture_output=True, text=True)
    for line in (dry.stdout + dry.stderr).splitlines():
        if "TOP=" in line:  # "#$ TOP=/usr/local/cuda-13.0/bin/.."
            return os.path.normpath(line.split("TOP=", 1)[1].strip())
    return None


cuda_home = None if os.environ.get("MILDNET_NO_CUDA") == "1" else find_cuda_home()
if cuda_home:
    os.environ["CUDA_HOME"] = cuda_home  # read by torch.utils.cpp_extension at import time
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")

import torch  # noqa: E402  (after CUDA_HOME is settled)
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

use_cuda = cuda_home is not None and torch.version.cuda is not None
sources = ["kernels/module.cpp", "kernels/gap_concat.cpp", "kernels/cpu/gap_concat_cpu.cpp"]
extra_compile_args = {"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo"]}
if use_cuda:
    extension = CUDAExtension("mildnet._C", sources + ["kernels/cuda/gap_concat_cuda.cu"],
                              extra_compile_args=extra_compile_args)
else:
    extension = CppExtension("mildnet._C", sources, extra_compile_args={"cxx": extra_compile_args["cxx"]})
print(f"mildnet: building {'CUDA + CPU' if use_cuda else 'CPU-only'} extension (CUDA_HOME={cuda_home})")

setup(
    packages=find_packages(include=["mildnet", "mildnet.*"]),
    ext_modules=[extension],
    cmdclass={"build_ext": BuildExtension},
)
