"""``mildnet export``: a checkpoint -> the next numbered version in a Triton model repository.

Layout written (``S`` = the spec's input size, ``D`` = embedding dim)::

    model_repository/
      mildnet/config.pbtxt          PIXELS FP32 [3,S,S] -> EMBEDDING FP32 [D], dynamic batching, warmup, queue policy
      mildnet/<N>/model.py          the thin shell mildnet/triton_templates/mildnet.py (package data)
      mildnet/<N>/model.py, model.pt (weights, a mildnet checkpoint), spec.json (variant, dim, spec, sha256)
      preprocess/config.pbtxt, preprocess/1/model.py          IMAGE bytes -> PIXELS FP32 [3,S,S]
      mildnet_ensemble/config.pbtxt, mildnet_ensemble/1/      preprocess -> mildnet
      similar/config.pbtxt, similar/1/model.py                BLS: IMAGE + K (+ FILTER) -> IDS, SCORES, METADATA

Older versions are kept (Triton serves the latest: ``version_policy { latest { num_versions: 1 } }``).
A version is written into a hidden temp folder and renamed into place, so a polling server never loads half
of one. Version folders are build output (gitignored); the committed repository holds configs and templates.
"""
from __future__ import annotations

import importlib.util
import json
from importlib import resources
import os
import py_compile
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .fileio import atomic_write_text, sha256_file
from .triton_models import EXPORT_INFO_FILE, WEIGHTS_FILE, version_dirs

# The model.py shells ship inside the package (an installed wheel has no checkout to copy them from).
TEMPLATES = resources.files("mildnet.triton_templates")
PIPELINE_MODELS = ("preprocess", "mildnet_ensemble", "similar")


@dataclass(frozen=True)
class ServingConfig:
    """Knobs of the generated ``config.pbtxt`` files."""

    model_name: str = "mildnet"
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

    def __post_init__(self):
        if self.max_batch_size < 1:
            raise ValueError(f"--max-batch-size must be >= 1, got {self.max_batch_size}")
        if self.max_queue_size < 0:
            raise ValueError(f"--max-queue-size must be >= 0 (0: no queue policy), got {self.max_queue_size}")
        if self.instances < 1:
            raise ValueError(f"--instances must be >= 1, got {self.instances}")
        if self.kind not in ("cpu", "gpu"):
            raise ValueError(f"--kind must be cpu or gpu, got {self.kind!r}")
        if not self.model_name.replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"--model-name must be letters, digits, '_' or '-', got {self.model_name!r}")


# -- config.pbtxt rendering (protobuf text format) ----------------------------------------------------------------
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
    return f"""
dynamic_batching {{
  max_queue_delay_microseconds: {delay_us}
{policy}}}
"""


def _warmup(pixels) -> str:
    if min(pixels) < 1:  # template without a concrete input size: nothing to warm up with
        return ""
    return f"""model_warmup [
  {{
    name: "zeros_batch1"
    batch_size: 1
    inputs {{ key: "PIXELS" value: {{ data_type: TYPE_FP32 dims: {_dims(pixels)} zero_data: true }} }}
  }}
]
"""


def _info_parameters(info: dict | None) -> str:
    """spec.json's facts as config parameters, so a client reads them through the model-config API."""
    if not info:
        return ""
    values = {"variant": info["variant"], "embedding_dim": str(info["embedding_dim"]),
              "model_version": info["model_version"], "spec": json.dumps(info["spec"], sort_keys=True)}
    lines = "".join(f"parameters {{ key: \"{k}\" value: {{ string_value: {json.dumps(v)} }} }}\n"
                    for k, v in values.items())
    return "# Mirrors spec.json of the latest version (served to clients by `mildnet.remote.model_info`).\n" + lines


def embedding_config(cfg: ServingConfig, input_size: int, embedding_dim: int, info: dict | None = None) -> str:
    """``config.pbtxt`` of the embedding model (Python backend running the mildnet forward pass)."""
    kind = "KIND_GPU" if cfg.kind == "gpu" else "KIND_CPU"
    pixels = (3, input_size, input_size)
    return f"""# Generated by `mildnet export`: edit the export flags, not this file.
name: "{cfg.model_name}"
backend: "python"
max_batch_size: {cfg.max_batch_size}
input [
  {{ name: "PIXELS" data_type: TYPE_FP32 dims: {_dims(pixels)} }}
]
output [
  {{ name: "EMBEDDING" data_type: TYPE_FP32 dims: {_dims([embedding_dim])} }}
]
version_policy: {{ latest {{ num_versions: 1 }} }}
instance_group [
  {{ count: {cfg.instances} kind: {kind} }}
]
{_queueing(cfg, cfg.max_queue_delay_us)}{_warmup(pixels)}parameters {{
  # "no" with KIND_GPU: inputs arrive on the GPU and pass into torch through DLPack without a copy.
  key: "FORCE_CPU_ONLY_INPUT_TENSORS"
  value: {{ string_value: "{'no' if cfg.kind == 'gpu' else 'yes'}" }}
}}
{_info_parameters(info)}"""


def preprocess_config(cfg: ServingConfig, input_size: int) -> str:
    return f"""# Generated by `mildnet export`: edit the export flags, not this file.
# Encoded image bytes -> normalised pixels, following spec.json of the latest `{cfg.model_name}` version.
name: "preprocess"
backend: "python"
max_batch_size: {cfg.max_batch_size}
input [
  {{ name: "IMAGE" data_type: TYPE_STRING dims: [ 1 ] }}
]
output [
  {{ name: "PIXELS" data_type: TYPE_FP32 dims: {_dims((3, input_size, input_size))} }}
]
instance_group [
  {{ count: {cfg.preprocess_instances} kind: KIND_CPU }}
]
{_queueing(cfg, 500)}
parameters {{ key: "embedding_model" value: {{ string_value: "{cfg.model_name}" }} }}
"""


def ensemble_config(cfg: ServingConfig, embedding_dim: int) -> str:
    return f"""# Generated by `mildnet export`: edit the export flags, not this file.
# bytes -> embedding in one request; each step batches on its own.
name: "mildnet_ensemble"
platform: "ensemble"
max_batch_size: {cfg.max_batch_size}
input [
  {{ name: "IMAGE" data_type: TYPE_STRING dims: [ 1 ] }}
]
output [
  {{ name: "EMBEDDING" data_type: TYPE_FP32 dims: {_dims([embedding_dim])} }}
]
ensemble_scheduling {{
  step [
    {{
      model_name: "preprocess"
      model_version: -1
      input_map {{ key: "IMAGE" value: "IMAGE" }}
      output_map {{ key: "PIXELS" value: "pixels" }}
    }},
    {{
      model_name: "{cfg.model_name}"
      model_version: -1
      input_map {{ key: "PIXELS" value: "pixels" }}
      output_map {{ key: "EMBEDDING" value: "EMBEDDING" }}
    }}
  ]
}}
"""


def similar_config(cfg: ServingConfig) -> str:
    return f"""# Generated by `mildnet export`: edit the export flags, not this file.
# BLS: image bytes + k (+ JSON filter) -> top-k catalogue hits from the index file.
name: "similar"
backend: "python"
max_batch_size: {cfg.max_batch_size}
input [
  {{ name: "IMAGE" data_type: TYPE_STRING dims: [ 1 ] }},
  {{ name: "K" data_type: TYPE_INT32 dims: [ 1 ] }},
  {{ name: "FILTER" data_type: TYPE_STRING dims: [ 1 ] optional: true }}
]
output [
  {{ name: "IDS" data_type: TYPE_STRING dims: [ -1 ] }},
  {{ name: "SCORES" data_type: TYPE_FP32 dims: [ -1 ] }},
  {{ name: "METADATA" data_type: TYPE_STRING dims: [ -1 ] }}
]
instance_group [
  {{ count: 1 kind: KIND_CPU }}
]
{_queueing(cfg, 1000)}
parameters {{ key: "embedding_model" value: {{ string_value: "{cfg.model_name}" }} }}
parameters {{ key: "embedding_batch" value: {{ string_value: "{cfg.max_batch_size}" }} }}
# Empty: <repository>/similar/index/catalogue.mindex. The env var MILDNET_INDEX overrides both.
parameters {{ key: "index_path" value: {{ string_value: "" }} }}
"""


# -- files ------------------------------------------------------------------------------------------------------
def _write_if_changed(path: Path, text: str) -> None:
    """Rewrite only real changes: a polling server reloads a model whenever its folder's files change."""
    if not (path.is_file() and path.read_text() == text):
        atomic_write_text(path, text)


def template_text(repository: Path, model: str) -> str:
    """The thin model.py for ``model``: the repository's own (``<repository>/<model>/model.py``), else the
    package's ``mildnet/triton_templates/<model>.py``."""
    own = repository / model / "model.py"
    if own.is_file():
        return own.read_text()
    shipped = TEMPLATES / f"{model}.py"
    if not shipped.is_file():
        raise FileNotFoundError(f"no model.py template for {model!r} in {repository} or in the mildnet package")
    return shipped.read_text()


def _install_template(repository: Path, model: str, template_name: str, version_dir: Path) -> None:
    version_dir.mkdir(parents=True, exist_ok=True)
    target = version_dir / "model.py"
    text = template_text(repository, template_name)
    if target.is_file() and target.read_text() == text:
        return  # untouched: a polling server sees no change and does not reload the model
    atomic_write_text(target, text)
    # Compile now: otherwise the Python stub writes __pycache__/ into the version folder when it imports
    # model.py, a polling Triton sees the folder change, and reloads every model once after start.
    py_compile.compile(str(target), cfile=importlib.util.cache_from_source(str(target)), doraise=True)


def next_version(model_dir: Path) -> int:
    existing = version_dirs(model_dir)
    return int(existing[-1].name) + 1 if existing else 1


@dataclass(frozen=True)
class ExportResult:
    version: int
    version_dir: Path
    info: dict


def export_model(model, repository: str | os.PathLike, cfg: ServingConfig = ServingConfig(), *,
                 source_checkpoint: str | os.PathLike | None = None, pipeline: bool = True) -> ExportResult:
    """Write ``model`` (a mildnet model) as the next version of ``cfg.model_name`` in ``repository``.

    ``pipeline=True`` also (re)writes ``preprocess``, ``mildnet_ensemble`` and ``similar`` so they follow
    this model (input size, embedding dim, name).
    """
    from .checkpoint import save_checkpoint

    repository = Path(repository)
    model_dir = repository / cfg.model_name
    model_dir.mkdir(parents=True, exist_ok=True)
    version = next_version(model_dir)
    spec = model.spec
    tmp = Path(tempfile.mkdtemp(dir=model_dir, prefix=f".export-{version}-"))  # not numeric: Triton ignores it
    try:
        _install_template(repository, cfg.model_name, "mildnet", tmp)
        save_checkpoint(tmp / WEIGHTS_FILE, model, variant=model.variant, model_kwargs=model.model_kwargs,
                        extra={"exported_version": version})
        source_sha = sha256_file(Path(source_checkpoint)) if source_checkpoint else sha256_file(tmp / WEIGHTS_FILE)
        info = {
            "version": version,
            "variant": model.variant,
            "model_kwargs": model.model_kwargs,
            "embedding_dim": int(model.embedding_dim),
            "spec": spec.to_dict(),
            "source_checkpoint": str(Path(source_checkpoint).resolve()) if source_checkpoint else None,
            "source_sha256": source_sha,
            # What an index built with this model records; the `similar` model refuses a mismatching index.
            "model_version": f"{model.variant}-{source_sha[:12]}",
            "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        atomic_write_text(tmp / EXPORT_INFO_FILE, json.dumps(info, indent=2, sort_keys=True) + "\n")
        target = model_dir / str(version)
        if target.exists():
            raise FileExistsError(f"{target} appeared while exporting (two exports at once?); try again")
        os.rename(tmp, target)  # atomic: a polling server sees the whole version or none of it
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _write_if_changed(model_dir / "config.pbtxt",
                       embedding_config(cfg, spec.input_size, int(model.embedding_dim), info))
    if pipeline:
        _write_if_changed(repository / "preprocess" / "config.pbtxt", preprocess_config(cfg, spec.input_size))
        _install_template(repository, "preprocess", "preprocess", repository / "preprocess" / "1")
        _write_if_changed(repository / "mildnet_ensemble" / "config.pbtxt",
                           ensemble_config(cfg, int(model.embedding_dim)))
        (repository / "mildnet_ensemble" / "1").mkdir(parents=True, exist_ok=True)
        _write_if_changed(repository / "similar" / "config.pbtxt", similar_config(cfg))
        _install_template(repository, "similar", "similar", repository / "similar" / "1")
    return ExportResult(version, model_dir / str(version), info)
