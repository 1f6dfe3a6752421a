from __future__ import annotations

import numpy as np
import pytest
import torch
from opacus.validators import ModuleValidator
from torch import nn

from models.data import TaskSpec
from models.network import MultitaskNet, SharedTrunk, build_trunk

TASKS = [TaskSpec("resp", "binary"), TaskSpec("level", "regression"), TaskSpec("os", "survival")]


def make_net(seed: int = 0, **kwargs) -> MultitaskNet:
    options = {"trunk_widths": (16, 8), "head_width": 4, "dropout": 0.1} | kwargs
    return MultitaskNet(10, TASKS, seed=seed, **options)


def test_trunk_state_holds_only_trunk_keys():
    net = make_net()
    state = net.trunk_state()
    assert state and all(k.startswith("trunk.") for k in state)
    assert not any(k.startswith("heads.") for k in state)
    # every parameter of the model is either trunk or head, nothing in between
    all_keys = set(net.state_dict())
    assert all_keys == set(state) | set(net.head_state())
    assert {k.split(".")[1] for k in net.head_state()} == {"resp", "level", "os"}


def test_trunk_state_returns_copies():
    net = make_net()
    state = net.trunk_state()
    state["trunk.0.weight"].add_(1.0)
    assert not torch.equal(state["trunk.0.weight"], net.trunk[0].weight)


def test_shared_trunk_keys_and_init_match_the_full_model():
    net = make_net(seed=5)
    server = SharedTrunk(10, trunk_widths=(16, 8), dropout=0.1, seed=5)
    assert list(server.state_dict()) == list(net.trunk_state())
    for key, value in server.state_dict().items():
        assert torch.equal(value, net.trunk_state()[key])
    assert server(torch.zeros(3, 10)).shape == (3, 8)


def test_build_trunk_is_linear_layernorm_relu_dropout():
    trunk = build_trunk(10, trunk_widths=(16, 8), dropout=0.2)
    kinds = [type(layer) for layer in trunk]
    assert kinds == [nn.Linear, nn.LayerNorm, nn.ReLU, nn.Dropout] * 2
    assert trunk[4].in_features == 16 and trunk[4].out_features == 8


def test_load_trunk_state_copies_in_place_and_leaves_heads_untouched():
    net, other = make_net(seed=0), make_net(seed=1)
    heads_before = net.head_state()
    trunk_param = net.trunk[0].weight
    net.load_trunk_state(other.trunk_state())
    for key, value in other.trunk_state().items():
        assert torch.equal(net.state_dict()[key], value)
    for key, value in heads_before.items():
        assert torch.equal(net.state_dict()[key], value)
    assert net.trunk[0].weight is trunk_param  # an optimizer built on the model keeps working


def test_load_trunk_state_accepts_numpy_arrays():
    net, other = make_net(seed=0), make_net(seed=1)
    net.load_trunk_state({k: v.numpy().astype(np.float64) for k, v in other.trunk_state().items()})
    assert torch.allclose(net.trunk[0].weight, other.trunk[0].weight)


def test_load_trunk_state_rejects_missing_and_unexpected_keys():
    net = make_net()
    state = net.trunk_state()
    del state["trunk.0.bias"]
    with pytest.raises(ValueError, match=r"missing trunk keys \['trunk.0.bias'\]"):
        net.load_trunk_state(state)
    with pytest.raises(ValueError, match="Head keys are private"):
        net.load_trunk_state(net.trunk_state() | net.head_state())
    wrapped = {f"_module.{k}": v for k, v in net.trunk_state().items()}
    with pytest.raises(ValueError, match="take the state from trainer.model"):
        net.load_trunk_state(wrapped)


def test_load_trunk_state_rejects_a_shape_mismatch():
    net = make_net()
    wider = make_net(trunk_widths=(32, 8))
    with pytest.raises(ValueError, match=r"'trunk.0.weight' has shape \(32, 10\).*expects \(16, 10\)"):
        net.load_trunk_state(wider.trunk_state())


def test_forward_gives_one_output_per_task():
    net = make_net(head_width=0).eval()
    assert isinstance(net.heads["resp"][0], nn.Linear) and len(net.heads["resp"]) == 1
    out = net(torch.randn(5, 10))
    assert set(out) == {"resp", "level", "os"}
    assert all(v.shape == (5,) for v in out.values())
    assert torch.allclose(net.forward_task(torch.ones(2, 10), "os"), net(torch.ones(2, 10))["os"])


def test_same_seed_same_weights_and_global_rng_untouched():
    state = torch.get_rng_state()
    a, b, c = make_net(seed=3), make_net(seed=3), make_net(seed=4)
    assert torch.equal(torch.get_rng_state(), state)
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key])
    assert not torch.equal(a.trunk[0].weight, c.trunk[0].weight)


def test_model_passes_opacus_strict_validation():
    assert ModuleValidator.validate(make_net(), strict=True) == []
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in make_net().modules())


def test_predict_maps_regression_back_to_original_units():
    net = make_net()
    x = np.random.default_rng(0).normal(size=(7, 10)).astype(np.float32)
    raw = net.predict(x)["level"]
    net.set_target_scaling("level", mean=10.0, scale=2.0)
    assert np.allclose(net.predict(x)["level"], raw * 2.0 + 10.0, atol=1e-5)
    assert net.target_scaling("level") == (10.0, 2.0)
    assert "heads.level.target_mean" in net.head_state()
    assert net.training  # predict restores the mode


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"trunk_widths": ()}, "trunk_widths=\\(\\); give one or more positive widths"),
        ({"dropout": 1.0}, "dropout=1.0; use a probability"),
        ({"head_width": -1}, "head_width=-1"),
    ],
)
def test_bad_architecture_options_name_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_net(**kwargs)


def test_duplicate_task_names_are_rejected():
    with pytest.raises(ValueError, match=r"task names \['a'\] appear more than once"):
        MultitaskNet(4, [TaskSpec("a", "binary"), TaskSpec("a", "regression")])
