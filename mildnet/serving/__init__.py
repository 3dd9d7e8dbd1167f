"""Serving mildnet with Triton Inference Server.

* :mod:`.contract`: the served model (:class:`~.contract.ServedModel`) and every model, tensor and parameter
  name, the index file's place and the model_version format, defined once.
* :mod:`.repository`: renders a model repository's ``config.pbtxt`` files and ``model.py`` shells from the
  contract (templates in ``templates/``, package data).
* :mod:`.triton`: the Triton Python models (run inside the server's Python stub).
* :mod:`.server`: finds, launches and supervises ``tritonserver``.
* :mod:`.client`: the Python client (embed, search, model info, metrics).
"""
