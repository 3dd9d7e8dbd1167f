"""``mildnet export``: a checkpoint -> the next numbered version of the embedding model in a Triton model
repository, plus every ``config.pbtxt`` rendered from the serving contract (:mod:`mildnet.serving.repository`).

Older versions are kept (Triton serves the latest: ``version_policy { latest { num_versions: 1 } }``).
A version is written into a hidden temp folder and renamed into place, so a polling server never loads half
of one. A repository is build output: ``model_repository/`` in the checkout is gitignored.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path


from .checkpoint import read_checkpoint, save_checkpoint
from .errors import MildnetError
from .fileio import sha256_file
from .serving import contract as c
from .serving.repository import ServingConfig, install_shell, render_model_config, render_pipeline


class ExportError(MildnetError, FileExistsError):
    """Two exports raced for the same version folder."""


def next_version(model_dir: Path) -> int:
    existing = c.version_dirs(model_dir)
    return int(existing[-1].name) + 1 if existing else 1


@dataclass(frozen=True)
class ExportResult:
    version: int
    version_dir: Path
    served: c.ServedModel
    source_sha256: str  # the source checkpoint file's sha256, else the exported weights' (state_dict_sha256)


def export_model(model, repository: str | os.PathLike, cfg: ServingConfig = ServingConfig(), *,
                 source_checkpoint: str | os.PathLike | None = None, pipeline: bool = True) -> ExportResult:
    """Write ``model`` (a mildnet model) as the next version of ``cfg.model_name`` in ``repository``.

    ``pipeline=True`` also (re)renders ``preprocess``, ``mildnet_ensemble`` and ``similar`` so they follow
    this model (input size, embedding dim, name, spec, model_version).
    """
    repository = Path(repository)
    model_dir = repository / cfg.model_name
    model_dir.mkdir(parents=True, exist_ok=True)
    version = next_version(model_dir)
    tmp = Path(tempfile.mkdtemp(dir=model_dir, prefix=f".export-{version}-"))  # not numeric: Triton ignores it
    try:
        install_shell(tmp)
        weights = tmp / c.WEIGHTS_FILE
        save_checkpoint(weights, model, variant=model.variant, model_kwargs=model.model_kwargs,
                        extra={"exported_version": version})
        # The identity an index records: the source checkpoint's bytes, else the weights themselves (so
        # re-exporting the same weights keeps the model_version and leaves the pipeline configs alone).
        sha = (sha256_file(Path(source_checkpoint)) if source_checkpoint
               else read_checkpoint(weights)["weights_sha256"])
        served = c.ServedModel(variant=model.variant, embedding_dim=int(model.embedding_dim), spec=model.spec,
                               model_version=c.model_version(model.variant, sha), version=version)
        target = model_dir / str(version)
        if target.exists():
            raise ExportError(f"{target} appeared while exporting (two exports at once?); try again")
        os.rename(tmp, target)  # atomic: a polling server sees the whole version or none of it
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    render_model_config(repository, cfg, served)
    if pipeline:
        render_pipeline(repository, cfg, served)
    return ExportResult(version, target, served, sha)
