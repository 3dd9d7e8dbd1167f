"""Render a Triton model repository from the serving contract: every ``config.pbtxt`` and ``model.py``.

Templates ship as package data (``mildnet/serving/templates/``: one ``.pbtxt`` per model and the one generic
``model.py`` shell), so an installed wheel renders the same repository as a checkout. A repository is build
output: ``mildnet export`` writes it (``model_repository/`` in the checkout is gitignored)::

    <repository>/
      mildnet/config.pbtxt, mildnet/<N>/model.py, model.pt     PIXELS FP32 [3,S,S] -> EMBEDDING FP32 [D]
      preprocess/config.pbtxt, preprocess/1/model.py           IMAGE bytes -> PIXELS
      mildnet_ensemble/config.pbtxt, mildnet_ensemble/1/       preprocess -> mildnet
      similar/config.pbtxt, similar/1/model.py                 BLS: IMAGE + K (+ FILTER) -> IDS, SCORES, METADATA

The served model's contract (:class:`~mildnet.serving.contract.ServedModel`) travels as the parameters of each
Python model's own config; files are rewritten only when their text changes (a polling server reloads a model
whenever its folder changes).
"""
from __future__ import annotations

import importlib.util
import json
import os
import py_compile
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from string import Template

from ..errors import MildnetError
from ..fileio import atomic_write_text
from . import contract as c

TEMPLATES = resources.files("mildnet.serving") / "templates"


class ServingConfigError(MildnetError, ValueError):
    """A serving knob out of range (``mildnet export`` flags)."""


@dataclass(frozen=True)
class ServingConfig:
    """Knobs of the rendered ``config.pbtxt`` files."""

    model_name: str = c.EMBEDDING_MODEL
    max_batch_size: int = 32
    instances: int = 1
    kind: str = "cpu"  # "cpu" | "gpu"
    dynamic_batching: bool = True
    max_queue_delay_us: int = 2000
    # Beyond this the server sheds load with an error instead of queueing forever. 0: no queue policy (no
    # shedding); Triton 2.51 then also skips the ~0.5 s scheduler stalls it shows with any policy (docs/serving.md).
    max_queue_size: int = 256
    queue_timeout_us: int = 30_000_000
    preprocess_instances: int = 1
    # Images per forward pass: the backend splits a larger batch into passes of this size (0: one pass). On CPU a
    # batch beyond a few images runs slower per image (activations fall out of cache: bench/serving.py), and
    # Triton 2.51's batcher forms batches as large as its queue allows whatever preferred_batch_size says.
    forward_batch: int | None = None  # None: 4 on CPU, 0 on GPU
    freeze: bool = True  # CPU instances run the model frozen (mildnet.models.frozen): faster than eager

    def __post_init__(self):
        if self.max_batch_size < 1:
            raise ServingConfigError(f"--max-batch-size must be >= 1, got {self.max_batch_size}")
        if self.max_queue_size < 0:
            raise ServingConfigError(f"--max-queue-size must be >= 0 (0: no queue policy), got {self.max_queue_size}")
        if self.forward_batch is not None and self.forward_batch < 0:
            raise ServingConfigError(f"--forward-batch must be >= 0 (0: the whole batch at once), got {self.forward_batch}")
        if self.instances < 1:
            raise ServingConfigError(f"--instances must be >= 1, got {self.instances}")
        if self.kind not in ("cpu", "gpu"):
            raise ServingConfigError(f"--kind must be cpu or gpu, got {self.kind!r}")
        if not self.model_name.replace("_", "").replace("-", "").isalnum():
            raise ServingConfigError(f"--model-name must be letters, digits, '_' or '-', got {self.model_name!r}")


# -- config.pbtxt pieces (protobuf text format) -------------------------------------------------------------------
def _dims(shape) -> str:
    return "[ " + ", ".join(str(d) for d in shape) + " ]"


def _queueing(cfg: ServingConfig, delay_us: int) -> str:
    if not cfg.dynamic_batching:
        return ""
    policy = "" if not cfg.max_queue_size else f"""  default_queue_policy {{
    max_queue_size: {cfg.max_queue_size}
    timeout_action: REJECT
    default_timeout_microseconds: {cfg.queue_timeout_us}
    allow_timeout_override: true
  }}
"""
    return f"""dynamic_batching {{
  max_queue_delay_microseconds: {delay_us}
{policy}}}
"""


def _warmup(pixels) -> str:
    return f"""model_warmup [
  {{
    name: "zeros_batch1"
    batch_size: 1
    inputs {{ key: "{c.PIXELS}" value: {{ data_type: TYPE_FP32 dims: {_dims(pixels)} zero_data: true }} }}
  }}
]
"""


def _parameters(values: dict[str, str]) -> str:
    return "".join(f"parameters {{ key: {json.dumps(k)} value: {{ string_value: {json.dumps(v)} }} }}\n"
                   for k, v in values.items())


def _render(template: str, cfg: ServingConfig, served: c.ServedModel, **fields) -> str:
    s = served.spec.input_size
    names = {"image": c.IMAGE, "pixels": c.PIXELS, "embedding": c.EMBEDDING, "k": c.K, "filter": c.FILTER,
             "ids": c.IDS, "scores": c.SCORES, "metadata": c.METADATA}
    text = (TEMPLATES / f"{template}.pbtxt").read_text()
    return Template(text).substitute(
        names, max_batch_size=cfg.max_batch_size, pixels_dims=_dims((3, s, s)),
        embedding_dims=_dims([served.embedding_dim]), **fields)


def embedding_config(cfg: ServingConfig, served: c.ServedModel) -> str:
    """The embedding model (Python backend running the mildnet forward pass)."""
    s = served.spec.input_size
    params = {c.PYTHON_MODEL_PARAM: c.EMBEDDER,
              # "no" with KIND_GPU: inputs arrive on the GPU and pass into torch through DLPack without a copy.
              "FORCE_CPU_ONLY_INPUT_TENSORS": "no" if cfg.kind == "gpu" else "yes",
              c.FREEZE_PARAM: "yes" if cfg.freeze and cfg.kind == "cpu" else "no",
              c.FORWARD_BATCH_PARAM: str(cfg.forward_batch if cfg.forward_batch is not None
                                         else 4 if cfg.kind == "cpu" else 0),
              **served.to_parameters()}
    return _render("embedding", cfg, served, name=cfg.model_name, instances=cfg.instances,
                   kind="KIND_GPU" if cfg.kind == "gpu" else "KIND_CPU",
                   dynamic_batching=_queueing(cfg, cfg.max_queue_delay_us), warmup=_warmup((3, s, s)),
                   parameters=_parameters(params))


def preprocess_config(cfg: ServingConfig, served: c.ServedModel) -> str:
    params = {c.PYTHON_MODEL_PARAM: c.PREPROCESSOR, c.SPEC_PARAM: served.spec.to_json()}
    return _render("preprocess", cfg, served, name=c.PREPROCESS_MODEL, instances=cfg.preprocess_instances,
                   dynamic_batching=_queueing(cfg, 500), parameters=_parameters(params))


def ensemble_config(cfg: ServingConfig, served: c.ServedModel) -> str:
    return _render("ensemble", cfg, served, name=c.ENSEMBLE_MODEL, preprocess_model=c.PREPROCESS_MODEL,
                   embedding_model=cfg.model_name)


def similar_config(cfg: ServingConfig, served: c.ServedModel) -> str:
    params = {c.PYTHON_MODEL_PARAM: c.SEARCHER, c.EMBEDDING_MODEL_PARAM: cfg.model_name,
              c.EMBEDDING_BATCH_PARAM: str(cfg.max_batch_size), c.INDEX_PATH_PARAM: "",
              **served.to_parameters()}
    return _render("similar", cfg, served, name=c.SIMILAR_MODEL, index_dir=c.INDEX_DIR, index_file=c.INDEX_FILE,
                   index_env=c.INDEX_ENV, dynamic_batching=_queueing(cfg, 1000), parameters=_parameters(params))


# -- files ----------------------------------------------------------------------------------------------------------
def shell_text() -> str:
    """The generic ``model.py`` every Python model runs."""
    return (TEMPLATES / c.MODEL_FILE).read_text()


def write_if_changed(path: Path, text: str) -> None:
    """Rewrite only real changes: a polling server reloads a model whenever its folder's files change."""
    if not (path.is_file() and path.read_text() == text):
        atomic_write_text(path, text)


def install_shell(version_dir: Path) -> None:
    """The generic ``model.py`` in ``version_dir``, compiled (left alone when unchanged)."""
    version_dir.mkdir(parents=True, exist_ok=True)
    target = version_dir / c.MODEL_FILE
    text = shell_text()
    if target.is_file() and target.read_text() == text:
        return  # untouched: a polling server sees no change and does not reload the model
    atomic_write_text(target, text)
    # Compile now: otherwise the Python stub writes __pycache__/ into the version folder when it imports
    # model.py, a polling Triton sees the folder change, and reloads every model once after start.
    py_compile.compile(str(target), cfile=importlib.util.cache_from_source(str(target)), doraise=True)


def render_model_config(repository: Path, cfg: ServingConfig, served: c.ServedModel) -> None:
    """The embedding model's ``config.pbtxt`` (its version folders are written by ``mildnet export``)."""
    write_if_changed(Path(repository) / cfg.model_name / "config.pbtxt", embedding_config(cfg, served))


def render_pipeline(repository: Path, cfg: ServingConfig, served: c.ServedModel) -> None:
    """``preprocess``, ``mildnet_ensemble`` and ``similar``, following ``served`` (input size, dim, names)."""
    repository = Path(repository)
    write_if_changed(repository / c.PREPROCESS_MODEL / "config.pbtxt", preprocess_config(cfg, served))
    install_shell(repository / c.PREPROCESS_MODEL / "1")
    write_if_changed(repository / c.ENSEMBLE_MODEL / "config.pbtxt", ensemble_config(cfg, served))
    (repository / c.ENSEMBLE_MODEL / "1").mkdir(parents=True, exist_ok=True)
    write_if_changed(repository / c.SIMILAR_MODEL / "config.pbtxt", similar_config(cfg, served))
    install_shell(repository / c.SIMILAR_MODEL / "1")


# -- reading a rendered repository back ---------------------------------------------------------------------------
# The parameter lines `_parameters` writes: the key and value are JSON strings (ASCII, which protobuf's text
# format reads the same way).
_PARAMETER_LINE = re.compile(r'^parameters \{ key: ("(?:[^"\\]|\\.)*") value: \{ string_value: ("(?:[^"\\]|\\.)*") \} \}$',
                             re.MULTILINE)


def read_served(repository: str | os.PathLike, model_name: str = c.EMBEDDING_MODEL) -> c.ServedModel:
    """The contract a rendered repository serves (its embedding model's config) with the latest version number;
    raises :class:`~mildnet.serving.contract.ContractError` when nothing was exported there."""
    model_dir = Path(repository) / model_name
    versions = c.version_dirs(model_dir)
    try:
        text = (model_dir / "config.pbtxt").read_text()
    except OSError:
        text = ""
    if not versions or not text:
        raise c.ContractError(f"{model_dir}: no exported version (run `mildnet export`)")
    params = {json.loads(k): json.loads(v) for k, v in _PARAMETER_LINE.findall(text)}
    return c.ServedModel.from_parameters(params, int(versions[-1].name), where=str(model_dir / "config.pbtxt"))
