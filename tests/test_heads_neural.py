"""The torch-free description of a neural head (names, shapes, forward pass) equals the
torch module that trains it, so a frozen-backbone model predicts warm with the same
scores."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tlearn.heads.neural import expected_shapes, head_config, head_logits, softmax
from tlearn.heads.neural_torch import NNHead

CONFIGS = [
    head_config("linear"),
    head_config("linear", dropout=0.0),
    head_config("mlp", hidden="16"),
    head_config("mlp", hidden="16,8", batchnorm=True, dropout=0.3),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: str(c))
def test_shapes_and_forward_equal_the_torch_module(cfg):
    torch.manual_seed(0)
    head = NNHead(cfg, 12, 5)
    for m in head.modules():  # give batch norm non-trivial statistics
        if isinstance(m, torch.nn.BatchNorm1d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    head.layers[-1].weight.data.normal_()
    sd = {k: v.detach().numpy() for k, v in head.state_dict().items()}
    assert expected_shapes(cfg, 12, 5) == {k: tuple(v.shape) for k, v in sd.items()}
    X = np.random.default_rng(0).normal(size=(7, 12)).astype(np.float32)
    head.eval()
    with torch.inference_mode():
        ref = head(torch.from_numpy(X)).numpy()
    got = head_logits(cfg, sd, X)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    probs = softmax(got)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(probs, torch.softmax(torch.from_numpy(ref), 1).numpy(), atol=1e-6)
