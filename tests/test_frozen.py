"""mildnet.models.frozen: the frozen TorchScript copy the served model runs on CPU."""
from __future__ import annotations

import pytest
import torch

from mildnet import models
from mildnet.models.frozen import FreezeError, freeze_for_cpu


@pytest.mark.parametrize("name", ["mildnet_mobile", "mildnet_effnet_lite0", "mildnet_vgg16"])
def test_frozen_matches_eager_at_other_batch_sizes(name):
    torch.manual_seed(0)
    model = models.create(name, pretrained=False, input_size=64).eval()
    frozen = freeze_for_cpu(model, (3, 64, 64))
    assert isinstance(frozen, torch.jit.ScriptModule)
    for batch in (1, 5):
        x = torch.randn(batch, 3, 64, 64)
        with torch.inference_mode():
            torch.testing.assert_close(frozen(x), model(x), atol=1e-5, rtol=0)


class FirstRowOnly(torch.nn.Module):
    """Right only at the batch size it is traced with: Python control flow the trace bakes in."""

    def forward(self, x):
        return x.flatten(1)[:1] if x.shape[0] == 1 else x.flatten(1)


class Untraceable(torch.nn.Module):
    def forward(self, x):
        return {"not": x}.get  # not a tensor: tracing fails


@pytest.mark.parametrize("module,message", [(FirstRowOnly(), "differs from eager"), (Untraceable(), "cannot freeze")])
def test_a_model_that_does_not_freeze_is_refused(module, message):
    with pytest.raises(FreezeError, match=message):
        freeze_for_cpu(module, (3, 8, 8))
