"""Builds mildnet._C: the fused MILDNet-head ops (kernels/), registered as torch.ops.mildnet.*.

The extension is compiled against the torch installed in the environment, so the build must see it: install
torch first, then ``pip install --no-build-isolation -e .`` (or ``python -m build --no-isolation``). An
isolated build (plain ``pip install -e .``) has no torch and stops here with a message saying so; a torch
outside the range pyproject.toml declares stops the build too.

CUDA kernels are compiled whenever nvcc and a CUDA-enabled torch are present, even on a machine with no GPU;
MILDNET_NO_CUDA=1 forces the CPU-only build. TORCH_CUDA_ARCH_LIST overrides the default targets (sm_80, sm_90+PTX).
"""
import os
import shutil
import subprocess
import sys
import tomllib

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

HOW_TO_BUILD = ("install torch first (pip install -r requirements.txt, or pip install \"{torch}\"), then build "
                "without isolation so the extension is compiled against it:\n"
                "    pip install --no-build-isolation -e \".[all]\"\n"
                "(or python -m build --no-isolation for an sdist and a wheel)")


def declared_torch() -> str:
    """The runtime torch requirement of pyproject.toml, e.g. 'torch>=2.14,<2.15' (one fact, one place)."""
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "pyproject.toml"), "rb") as f:
        deps = tomllib.load(f)["project"]["dependencies"]
    return next(d for d in deps if d.replace(" ", "").startswith("torch") and not d.startswith("torchvision"))


try:
    import torch  # noqa: E402  (after CUDA_HOME is settled)
except ImportError:
    sys.exit("mildnet: the build cannot see torch (an isolated build, or torch not installed yet). mildnet's "
             "C++/CUDA extension must be compiled against the torch that will run it: "
             + HOW_TO_BUILD.format(torch=declared_torch()))
try:
    from packaging.requirements import Requirement  # noqa: E402
except ImportError:  # setuptools carries its own copy
    from setuptools._vendor.packaging.requirements import Requirement  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

_requirement = Requirement(declared_torch())
if not _requirement.specifier.contains(torch.__version__.split("+")[0], prereleases=True):
    sys.exit(f"mildnet: building against torch {torch.__version__}, outside the declared {_requirement}: "
             + HOW_TO_BUILD.format(torch=_requirement))

# Recorded for mildnet.ops, which refuses an extension built against another torch (a silent ABI mismatch).
with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "mildnet", "_build_info.py"), "w") as f:
    f.write(f'"""Written by setup.py: the torch mildnet._C was compiled against."""\n'
            f'TORCH_VERSION = "{torch.__version__}"\n')

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
