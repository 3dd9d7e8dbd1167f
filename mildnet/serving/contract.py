"""The serving contract: every name a client, the Triton models and the repository renderer share, defined once.

* :class:`ServedModel`: what the server serves (variant, embedding dim, preprocessing spec, model_version, and
  the Triton version number where it is known). It travels by ONE route: the ``parameters`` of each Python
  model's own ``config.pbtxt`` (:meth:`ServedModel.to_parameters`, rendered by :mod:`mildnet.serving.repository`),
  which each model reads once in ``initialize`` and a client reads through Triton's model-config API.
* Model names, tensor names, config parameter keys, the index file's place and the model_version format.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import MildnetError
from ..spec import PreprocessSpec

# -- Triton models ------------------------------------------------------------------------------------------------
EMBEDDING_MODEL = "mildnet"  # PIXELS -> EMBEDDING (the default name; `mildnet export --model-name` changes it)
PREPROCESS_MODEL = "preprocess"  # IMAGE -> PIXELS
ENSEMBLE_MODEL = "mildnet_ensemble"  # IMAGE -> EMBEDDING (preprocess -> mildnet)
SIMILAR_MODEL = "similar"  # IMAGE + K (+ FILTER) -> IDS, SCORES, METADATA (BLS)

# -- tensors ------------------------------------------------------------------------------------------------------
IMAGE = "IMAGE"  # TYPE_STRING [1]: encoded image bytes
PIXELS = "PIXELS"  # TYPE_FP32 [3, S, S]: normalised pixels (the spec's mean/std and colour order)
EMBEDDING = "EMBEDDING"  # TYPE_FP32 [D]: unit-norm embedding
K = "K"  # TYPE_INT32 [1]: how many hits
FILTER = "FILTER"  # TYPE_STRING [1], optional: a flat JSON object matched against the hits' metadata
IDS = "IDS"  # TYPE_STRING [k]: catalogue ids, best first ("" pads when a filter leaves fewer than k)
SCORES = "SCORES"  # TYPE_FP32 [k]
METADATA = "METADATA"  # TYPE_STRING [k]: JSON objects
SIMILAR_OUTPUTS = (IDS, SCORES, METADATA)

# -- files in the repository --------------------------------------------------------------------------------------
WEIGHTS_FILE = "model.pt"  # <embedding model>/<version>/: the exported mildnet checkpoint
MODEL_FILE = "model.py"  # <model>/<version>/: the generic shell (mildnet/serving/templates/model.py)
INDEX_DIR = "index"  # similar/index/
INDEX_FILE = "catalogue.mindex"  # similar/index/catalogue.mindex: the index `similar` serves by default
INDEX_ENV = "MILDNET_INDEX"  # overrides the `index_path` parameter


def default_index_path(repository) -> Path:
    """The index file ``similar`` serves from ``repository`` when nothing overrides it."""
    return Path(repository) / SIMILAR_MODEL / INDEX_DIR / INDEX_FILE


# -- config parameters --------------------------------------------------------------------------------------------
PYTHON_MODEL_PARAM = "mildnet_python_model"  # which class of mildnet.serving.triton the shell runs:
EMBEDDER, PREPROCESSOR, SEARCHER = "embedder", "preprocessor", "searcher"  # ... one of these
EMBEDDING_MODEL_PARAM = "embedding_model"  # similar: the name of the embedding model it calls (BLS)
EMBEDDING_BATCH_PARAM = "embedding_batch"  # similar: rows per BLS call to the embedding model
INDEX_PATH_PARAM = "index_path"  # similar: empty = default_index_path(repository)
FREEZE_PARAM = "freeze"  # mildnet: "yes" runs a frozen TorchScript copy on CPU (mildnet.models.frozen)
FORWARD_BATCH_PARAM = "forward_batch"  # mildnet: images per forward pass; a larger batch runs in passes (0: one)
SPEC_PARAM = "spec"  # the preprocessing spec as JSON: all that `preprocess` reads
_SERVED_PARAMS = ("variant", "embedding_dim", SPEC_PARAM, "model_version")  # ServedModel: mildnet and similar

# -- model_version: the identity an index records: "<variant>-<first 12 hex digits of a sha256>", of the source
# checkpoint file (`mildnet export --checkpoint`), else of the exported weights (checkpoint.state_dict_sha256)
MODEL_VERSION_DIGITS = 12
_MODEL_VERSION_RE = re.compile(r"^[A-Za-z0-9_]+-[0-9a-f]{%d}$" % MODEL_VERSION_DIGITS)


def model_version(variant: str, sha256: str) -> str:
    """``"<variant>-<sha256[:12]>"``, e.g. ``"mildnet_mobile-3f9a0c1b2d4e"``."""
    return f"{variant}-{sha256[:MODEL_VERSION_DIGITS]}"


class ContractError(MildnetError, ValueError):
    """A model config (or a server's answer) does not carry the serving contract; the message says what is missing."""


def config_parameters(model_config: dict) -> dict[str, str]:
    """``{key: string_value}`` of a model config as JSON (Triton's ``args["model_config"]``, the HTTP client's
    ``get_model_config``, or the gRPC one through MessageToDict)."""
    return {k: v.get("string_value", "") for k, v in model_config.get("parameters", {}).items()}


def spec_from_parameters(params: dict[str, str], where: str = "model config") -> PreprocessSpec:
    """The preprocessing spec of a config's parameters (all the ``preprocess`` model needs)."""
    if SPEC_PARAM not in params:
        raise ContractError(f"{where} has no {SPEC_PARAM!r} parameter: re-export the model (`mildnet export`)")
    try:
        return PreprocessSpec.from_json(params[SPEC_PARAM])
    except (ValueError, TypeError) as e:
        raise ContractError(f"{where}: bad {SPEC_PARAM!r} parameter ({e})") from None


@dataclass(frozen=True)
class ServedModel:
    """The served embedding model, as exported: the one record server, repository and client share."""

    variant: str
    embedding_dim: int
    spec: PreprocessSpec
    model_version: str  # model_version(variant, sha256): what an index built with this model must record
    version: int = 0  # Triton's version folder (0: not known where this record was read, e.g. a config)

    def __post_init__(self):
        if self.embedding_dim < 1:
            raise ContractError(f"embedding_dim must be >= 1, got {self.embedding_dim}")
        if not _MODEL_VERSION_RE.match(self.model_version):
            raise ContractError(f"model_version must look like '<variant>-<12 hex digits>', "
                                f"got {self.model_version!r}")

    def to_parameters(self) -> dict[str, str]:
        """The config ``parameters`` (string values) that carry this record."""
        return {"variant": self.variant, "embedding_dim": str(self.embedding_dim), SPEC_PARAM: self.spec.to_json(),
                "model_version": self.model_version}

    @classmethod
    def from_parameters(cls, params: dict[str, str], version: int = 0, where: str = "model config") -> "ServedModel":
        missing = [k for k in _SERVED_PARAMS if k not in params]
        if missing:
            raise ContractError(f"{where} has no {', '.join(missing)} parameter(s): it was not rendered by "
                                "`mildnet export`")
        try:
            dim = int(params["embedding_dim"])
        except ValueError:
            raise ContractError(f"{where}: embedding_dim {params['embedding_dim']!r} is not a number") from None
        return cls(variant=params["variant"], embedding_dim=dim, spec=spec_from_parameters(params, where),
                   model_version=params["model_version"], version=int(version))

    def as_dict(self) -> dict:
        return {"version": self.version, "variant": self.variant, "embedding_dim": self.embedding_dim,
                "spec": self.spec.to_dict(), "model_version": self.model_version}


def version_dirs(model_dir) -> list[Path]:
    """Numbered version folders of a model in a repository, oldest first (Triton serves the newest)."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        return []
    return sorted((p for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))

