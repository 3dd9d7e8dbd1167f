"""Triton Python model `similar` (BLS): image bytes + K (+ FILTER) -> top-k IDS, SCORES, METADATA.

Thin on purpose: decoding, the BLS call to the embedding model and the index search live in
mildnet.triton_models.SimilarModel.
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

from mildnet.triton_models import SimilarModel  # noqa: E402


class TritonPythonModel:
    def initialize(self, args):
        self.impl = SimilarModel(args, pb_utils)

    def execute(self, requests):
        return self.impl.execute(requests)
