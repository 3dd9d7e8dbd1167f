"""`mildnet export`: numbered versions, config.pbtxt rendered from the serving contract (parsed as Triton's
protobuf), CLI."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from mildnet import models
from mildnet.checkpoint import save_checkpoint
from mildnet.cli import main as cli_main
from mildnet.export import export_model
from mildnet.fileio import sha256_file
from mildnet.serving import contract
from mildnet.serving.repository import TEMPLATES, ServingConfig, read_served

ROOT_MODELS = (contract.EMBEDDING_MODEL, contract.PREPROCESS_MODEL, contract.ENSEMBLE_MODEL, contract.SIMILAR_MODEL)
ROOT = Path(__file__).resolve().parents[1]


def parse_config(path) -> model_config_pb2.ModelConfig:
    """Parse like Triton does: a typo or unknown field raises."""
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


@pytest.fixture(scope="module")
def small_model():
    torch.manual_seed(0)
    return models.create("mildnet_mobile", pretrained=False, input_size=64).eval()


@pytest.fixture
def checkpoint(tmp_path, small_model):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, small_model, variant=small_model.variant, model_kwargs=small_model.model_kwargs)
    return path


def test_export_writes_numbered_versions_and_keeps_old_ones(tmp_path, small_model, checkpoint):
    repo = tmp_path / "repo"
    first = export_model(small_model, repo, source_checkpoint=checkpoint)
    second = export_model(small_model, repo, source_checkpoint=checkpoint)
    assert (first.version, second.version) == (1, 2)
    for v in ("1", "2"):
        assert sorted(p.name for p in (repo / "mildnet" / v).iterdir()) == ["__pycache__", "model.pt", "model.py"]
    assert not [p for p in (repo / "mildnet").iterdir() if p.name.startswith(".")]  # no temp folders left
    served = read_served(repo)  # what the rendered config says, read back
    assert served == second.served
    assert served.variant == "mildnet_mobile" and served.embedding_dim == small_model.embedding_dim
    assert served.spec == small_model.spec and served.version == 2
    assert second.source_sha256 == sha256_file(checkpoint)
    assert served.model_version == f"mildnet_mobile-{sha256_file(checkpoint)[:12]}"


def test_exported_weights_reload_to_the_same_model(tmp_path, small_model):
    result = export_model(small_model, tmp_path)
    reloaded = models.load_checkpoint(result.version_dir / "model.pt")
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        torch.testing.assert_close(reloaded(x), small_model(x))
    assert read_served(tmp_path).spec == reloaded.spec


@pytest.mark.parametrize("kind,instances,dynamic", [("cpu", 1, True), ("gpu", 2, True), ("cpu", 1, False)])
def test_configs_parse_and_follow_the_spec(tmp_path, small_model, kind, instances, dynamic):
    cfg = ServingConfig(max_batch_size=8, instances=instances, kind=kind, dynamic_batching=dynamic)
    export_model(small_model, tmp_path, cfg)
    configs = {m: parse_config(tmp_path / m / "config.pbtxt") for m in ROOT_MODELS}
    assert {m: c.name for m, c in configs.items()} == {m: m for m in ROOT_MODELS}
    emb = configs["mildnet"]
    assert list(emb.input[0].dims) == [3, 64, 64] and list(emb.output[0].dims) == [small_model.embedding_dim]
    assert emb.max_batch_size == 8 and emb.instance_group[0].count == instances
    assert emb.instance_group[0].kind == (model_config_pb2.ModelInstanceGroup.KIND_GPU if kind == "gpu"
                                          else model_config_pb2.ModelInstanceGroup.KIND_CPU)
    assert emb.parameters["FORCE_CPU_ONLY_INPUT_TENSORS"].string_value == ("no" if kind == "gpu" else "yes")
    # CPU: a frozen model, in passes of 4 images (bigger batches run slower per image there); GPU: neither
    assert emb.parameters[contract.FREEZE_PARAM].string_value == ("no" if kind == "gpu" else "yes")
    assert emb.parameters[contract.FORWARD_BATCH_PARAM].string_value == ("0" if kind == "gpu" else "4")
    assert emb.HasField("dynamic_batching") == dynamic
    if dynamic:  # overload is shed with an error, not queued forever
        policy = emb.dynamic_batching.default_queue_policy
        assert policy.max_queue_size > 0 and policy.timeout_action == model_config_pb2.ModelQueuePolicy.REJECT
    assert list(emb.model_warmup[0].inputs["PIXELS"].dims) == [3, 64, 64]
    assert json.loads(emb.parameters["spec"].string_value) == small_model.spec.to_dict()
    # the contract travels in each Python model's own config: nothing reads another model's folder
    params = {m: {k: v.string_value for k, v in configs[m].parameters.items()} for m in ROOT_MODELS}
    served = contract.ServedModel.from_parameters(params["mildnet"])
    assert contract.ServedModel.from_parameters(params["similar"]) == served
    assert contract.spec_from_parameters(params["preprocess"]) == small_model.spec
    assert {params[m][contract.PYTHON_MODEL_PARAM] for m in ("mildnet", "preprocess", "similar")} == {
        contract.EMBEDDER, contract.PREPROCESSOR, contract.SEARCHER}
    assert list(configs["preprocess"].output[0].dims) == [3, 64, 64]
    steps = configs["mildnet_ensemble"].ensemble_scheduling.step
    assert [s.model_name for s in steps] == ["preprocess", "mildnet"]
    assert configs["similar"].input[2].optional


def test_max_queue_size_zero_drops_the_queue_policy(small_model, tmp_path):
    export_model(small_model, tmp_path, ServingConfig(max_queue_size=0), pipeline=False)
    emb = parse_config(tmp_path / "mildnet" / "config.pbtxt")
    assert emb.HasField("dynamic_batching") and not emb.dynamic_batching.HasField("default_queue_policy")
    assert emb.dynamic_batching.max_queue_delay_microseconds == 2000
    with pytest.raises(ValueError, match="max-queue-size"):
        ServingConfig(max_queue_size=-1)


def test_one_generic_shell_in_every_python_model(tmp_path, small_model):
    """The model.py shell is package data (an installed wheel exports too), the same file in every model."""
    export_model(small_model, tmp_path)
    shell = (TEMPLATES / contract.MODEL_FILE).read_text()
    assert "TritonPythonModel" in shell and contract.PYTHON_MODEL_PARAM in shell
    for folder in ("mildnet/1", "preprocess/1", "similar/1"):
        assert (tmp_path / folder / contract.MODEL_FILE).read_text() == shell


def test_reexport_leaves_unchanged_pipeline_files_alone(tmp_path, small_model):
    export_model(small_model, tmp_path)
    watched = [tmp_path / m / "config.pbtxt" for m in ("preprocess", "mildnet_ensemble", "similar")]
    watched += [tmp_path / m / "1" / "model.py" for m in ("preprocess", "similar")]
    before = [p.stat().st_mtime_ns for p in watched]
    export_model(small_model, tmp_path)
    assert [p.stat().st_mtime_ns for p in watched] == before  # a polling server does not reload them


def test_cli_export_checkpoint(tmp_path, checkpoint, capsys):
    repo = tmp_path / "repo"
    assert cli_main(["export", "--checkpoint", str(checkpoint), "--repository", str(repo),
                     "--max-batch-size", "4", "--instances", "2"]) == 0
    assert "version 1" in capsys.readouterr().out
    assert parse_config(repo / "mildnet" / "config.pbtxt").instance_group[0].count == 2


def test_cli_export_forward_batch_and_no_freeze(tmp_path):
    assert cli_main(["export", "--untrained", "mildnet_mobile", "--input-size", "64", "--no-pipeline",
                     "--repository", str(tmp_path), "--forward-batch", "2", "--no-freeze"]) == 0
    params = parse_config(tmp_path / "mildnet" / "config.pbtxt").parameters
    assert params[contract.FORWARD_BATCH_PARAM].string_value == "2"
    assert params[contract.FREEZE_PARAM].string_value == "no"


def test_cli_export_untrained_is_seeded(tmp_path):
    for name in ("a", "b"):
        assert cli_main(["export", "--untrained", "mildnet_mobile", "--input-size", "64", "--seed", "7",
                         "--repository", str(tmp_path / name), "--no-pipeline"]) == 0
    a, b = (torch.load(tmp_path / n / "mildnet" / "1" / "model.pt", weights_only=True)["state_dict"] for n in "ab")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not (tmp_path / "a" / "preprocess").exists()  # --no-pipeline


@pytest.mark.parametrize("content,message", [(b"", "not a loadable checkpoint"), (None, "no such checkpoint")])
def test_cli_export_bad_checkpoint_is_a_clear_error(tmp_path, capsys, content, message):
    path = tmp_path / "bad.pt"
    if content is not None:
        path.write_bytes(content)
    assert cli_main(["export", "--checkpoint", str(path), "--repository", str(tmp_path / "repo")]) == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "repo" / "mildnet").exists()


def test_export_verifies_weights_hash_in_and_out(tmp_path, capsys, checkpoint):
    """The exported model.pt records its weights' sha256 (checked when the server loads it), and a source
    checkpoint whose weights were changed is refused before anything is written."""
    from mildnet.checkpoint import atomic_torch_save, read_checkpoint, state_dict_sha256

    assert cli_main(["export", "--checkpoint", str(checkpoint), "--repository", str(tmp_path / "ok"),
                     "--no-pipeline"]) == 0
    served = read_checkpoint(tmp_path / "ok" / "mildnet" / "1" / "model.pt")
    assert served["weights_sha256"] == state_dict_sha256(served["state_dict"])
    ckpt = torch.load(checkpoint, weights_only=True)
    name = next(k for k, v in ckpt["state_dict"].items() if v.is_floating_point())
    ckpt["state_dict"][name] = ckpt["state_dict"][name] + 1  # new weights under the old header and hash
    atomic_torch_save(ckpt, tmp_path / "changed.pt")
    assert cli_main(["export", "--checkpoint", str(tmp_path / "changed.pt"), "--repository",
                     str(tmp_path / "repo")]) == 1
    assert "changed.pt: weights do not match their sha256" in capsys.readouterr().err
    assert not (tmp_path / "repo" / "mildnet").exists()


@pytest.mark.parametrize("kw,message", [({"max_batch_size": 0}, "max-batch-size"), ({"instances": 0}, "instances"),
                                        ({"kind": "tpu"}, "kind"), ({"model_name": "a/b"}, "model-name"),
                                        ({"forward_batch": -1}, "forward-batch")])
def test_bad_serving_config(kw, message):
    with pytest.raises(ValueError, match=message):
        ServingConfig(**kw)


def test_the_checkouts_repository_is_build_output_templates_are_not():
    """An export into ./model_repository never leaves the checkout dirty: the whole folder is rendered."""
    def ignored(path: str) -> bool:
        return subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT).returncode == 0

    assert ignored("model_repository/mildnet/7/model.pt") and ignored("model_repository/mildnet/config.pbtxt")
    assert ignored("model_repository/similar/index/catalogue.mindex")
    assert not ignored("mildnet/serving/templates/model.py")
    assert not ignored("mildnet/serving/templates/embedding.pbtxt")

