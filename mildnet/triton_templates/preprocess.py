"""Triton Python model `preprocess`: encoded image bytes [N, 1] -> FP32 pixels [N, 3, S, S].

Thin on purpose: the decoding (mildnet.imageio) and the spec (spec.json of the served model version) are read
in mildnet.triton_models.PreprocessModel.
"""
import os
import site
import sys

# Triton's Python stub embeds an interpreter that ignores PYTHONPATH: honour it here, so the project
# (mildnet) and its venv's site-packages (torch) import. `mildnet serve` sets it; see docs/serving.md.
for _path in reversed(os.environ.get("PYTHONPATH", "").split(os.pathsep)):
    if _path and _path not in sys.path:
        sys.path.insert(0, _path)
        site.addsitedir(_path)  # also runs the .pth files of a site-packages folder

import triton_python_backend_utils as pb_utils  # noqa: E402

from mildnet.triton_models import PreprocessModel  # noqa: E402


class TritonPythonModel:
    def initialize(self, args):
        self.impl = PreprocessModel(args, pb_utils)

    def execute(self, requests):
        return self.impl.execute(requests)
