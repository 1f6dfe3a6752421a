from __future__ import annotations

import numpy as np
import pytest
import torch
from opacus.validators import ModuleValidator
from torch import nn

from models.data import TaskSpec
from models.network import HEAD_PREFIX, TRUNK_PREFIX, MultitaskNet, SharedModel, SharedTrunk, build_trunk

TASKS = [TaskSpec("resp", "binary"), TaskSpec("level", "regression"), TaskSpec("os", "survival")]
# "os" and "level" are shared endpoints (held by several members), "resp" is private
SHARED_TASKS = [
    TaskSpec("resp", "binary"),
    TaskSpec("level", "regression", shared=True),
    TaskSpec("os", "survival", shared=True),
]


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


# -- shared endpoints ------------------------------------------------------------------------------


def make_shared_net(seed: int = 0, **kwargs) -> MultitaskNet:
    options = {"trunk_widths": (16, 8), "head_width": 4, "dropout": 0.1} | kwargs
    return MultitaskNet(10, SHARED_TASKS, seed=seed, **options)


def test_task_spec_shared_is_keyword_only_and_off_by_default():
    assert TaskSpec("os", "survival", 2.0) == TaskSpec(name="os", kind="survival", weight=2.0, shared=False)
    assert TaskSpec("os", "survival", shared=True).shared
    with pytest.raises(TypeError):
        TaskSpec("os", "survival", 1.0, True)  # type: ignore[misc]


def test_shared_state_holds_the_trunk_and_shared_head_parameters_only():
    net = make_shared_net()
    state = net.shared_state()
    assert list(state) == net.shared_keys()
    heads = {k for k in state if k.startswith(HEAD_PREFIX)}
    assert set(state) - heads == set(net.trunk_state())
    assert heads == {f"heads.{t}.{p}.{w}" for t in ("level", "os") for p in (0, 2) for w in ("weight", "bias")}
    assert not any(k.startswith("heads.resp.") for k in state)  # a private head never travels
    assert not any(k.endswith(("target_mean", "target_scale")) for k in state)  # nor label statistics
    state["heads.os.0.weight"].add_(1.0)
    assert not torch.equal(state["heads.os.0.weight"], net.heads["os"][0].weight)  # copies


def test_without_shared_tasks_the_shared_state_is_the_trunk_state():
    net = make_net()
    assert net.shared_tasks == [] and net.shared_keys() == list(net.trunk_state())


@pytest.mark.parametrize("head_width", [0, 4])
def test_shared_model_keys_and_init_match_the_members_shared_state(head_width):
    net = make_shared_net(seed=5, head_width=head_width)
    options = {"trunk_widths": (16, 8), "head_width": head_width, "dropout": 0.1}
    server = SharedModel(10, shared_tasks=["level", "os"], **options, seed=5)
    assert server.state_dict().keys() == net.shared_state().keys()
    for key, value in server.state_dict().items():  # same seed: the server starts where members start
        assert torch.equal(value, net.shared_state()[key]), key
    assert all(k.startswith((TRUNK_PREFIX, HEAD_PREFIX)) for k in server.state_dict())
    assert server(torch.zeros(3, 10)).shape == (3, 8)
    assert server.forward_task(torch.zeros(3, 10), "os").shape == (3,)


def test_shared_trunk_is_a_shared_model_without_heads():
    server = SharedTrunk(10, trunk_widths=(16, 8), dropout=0.1, seed=5)
    assert isinstance(server, SharedModel) and server.shared_tasks == []
    assert not any(k.startswith(HEAD_PREFIX) for k in server.state_dict())


def test_head_init_depends_on_seed_and_task_name_only():
    alone = MultitaskNet(10, [TaskSpec("os", "survival")], trunk_widths=(16, 8), head_width=4, seed=5)
    for key, value in alone.heads["os"].state_dict().items():
        assert torch.equal(value, make_shared_net(seed=5).heads["os"].state_dict()[key])
    assert not torch.equal(make_shared_net(seed=5).heads["os"][0].weight, make_shared_net(seed=6).heads["os"][0].weight)


def test_load_shared_state_copies_in_place_and_keeps_private_parts():
    net, other = make_shared_net(seed=0), make_shared_net(seed=1)
    net.set_target_scaling("level", mean=10.0, scale=2.0)
    private_before = {k: v for k, v in net.head_state().items() if k not in net.shared_keys()}
    params = [net.trunk[0].weight, net.heads["os"][0].weight]
    net.load_shared_state({k: v.numpy() for k, v in other.shared_state().items()})  # numpy works too
    for key, value in other.shared_state().items():
        assert torch.equal(net.state_dict()[key], value), key
    for key, value in private_before.items():  # the private head and every head's scaling
        assert torch.equal(net.state_dict()[key], value), key
    assert net.target_scaling("level") == (10.0, 2.0)
    assert net.trunk[0].weight is params[0] and net.heads["os"][0].weight is params[1]


def test_load_shared_state_refuses_private_heads_and_label_statistics():
    net = make_shared_net()
    state = net.shared_state()
    with pytest.raises(ValueError, match=r"unexpected keys \['heads.resp.0.weight'\].*private endpoints never travel"):
        net.load_shared_state(state | {"heads.resp.0.weight": net.heads["resp"][0].weight})
    with pytest.raises(ValueError, match="target_mean/target_scale are a member's label statistics"):
        net.load_shared_state(state | {"heads.os.target_mean": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"missing shared keys \['heads.os.2.bias'\]"):
        net.load_shared_state({k: v for k, v in state.items() if k != "heads.os.2.bias"})
    with pytest.raises(ValueError, match="take the state from trainer.model"):
        net.load_shared_state({f"_module.{k}": v for k, v in state.items()})


def test_load_shared_state_rejects_a_shape_mismatch_before_copying_anything():
    net = make_shared_net(seed=0)
    wider = make_shared_net(seed=1, head_width=6)
    before = net.shared_state()
    with pytest.raises(ValueError, match=r"'heads.level.0.weight' has shape \(6, 8\).*expects \(4, 8\)"):
        net.load_shared_state(wider.shared_state())
    for key, value in before.items():
        assert torch.equal(net.state_dict()[key], value), key


def test_load_trunk_state_still_loads_the_trunk_alone_of_a_model_with_shared_heads():
    net, other = make_shared_net(seed=0), make_shared_net(seed=1)
    heads = net.head_state()
    net.load_trunk_state(other.trunk_state())
    assert torch.equal(net.trunk[0].weight, other.trunk[0].weight)
    assert all(torch.equal(net.state_dict()[k], v) for k, v in heads.items())
    with pytest.raises(ValueError, match="Head keys are private unless their task is shared"):
        net.load_trunk_state(other.shared_state())


def test_shared_model_rejects_bad_task_names():
    with pytest.raises(ValueError, match=r"task names \['os'\] appear more than once"):
        SharedModel(4, shared_tasks=["os", "os"], trunk_widths=(4,))
    with pytest.raises(ValueError, match="task name 'a.b' is empty or holds '.'"):
        SharedModel(4, shared_tasks=["a.b"], trunk_widths=(4,))
    with pytest.raises(ValueError, match="shared_tasks='os' is one string"):
        SharedModel(4, shared_tasks="os", trunk_widths=(4,))
