"""A Triton Python model of mildnet: the class it runs is named by the `mildnet_python_model` parameter of this
model's config.pbtxt (see mildnet/serving/triton.py). `mildnet export` copies this one file into every model.
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

from mildnet.serving.triton import create_model  # noqa: E402


class TritonPythonModel:
    def initialize(self, args):
        self.impl = create_model(args, pb_utils)

    def execute(self, requests):
        return self.impl.execute(requests)
