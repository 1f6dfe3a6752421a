"""A small consortium and its provisioned kits, built under pytest's tmp_path (never in the repo)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from schema.config import config_from_dict

RAW = {
    "name": "demo",
    "operator": {"org": "neutral_op", "host": "localhost", "fl_port": 8102, "admin_port": 8103},
    "panel": {"features": ["TP53", "EGFR"]},
    "members": [
        {
            "name": "pharma-a",
            "org": "pharma_a",
            "data": "a.h5ad",
            "tasks": [{"name": "resp", "type": "binary", "column": "response"}],
        },
        {
            "name": "pharma-b",
            "org": "pharma_b",
            "data": "b.h5ad",
            "admin": "boss@pharma-b.com",
            "tasks": [{"name": "os", "type": "survival", "time": "os_time", "event": "os_event"}],
        },
    ],
    "privacy": {"he": {"poly_modulus_degree": 4096, "coeff_mod_bit_sizes": [40, 20, 40], "global_scale_bits": 20}},
}

NEW_MEMBER = {
    "name": "pharma-c",
    "org": "pharma_c",
    "data": "c.h5ad",
    "tasks": [{"name": "ic50", "type": "regression", "column": "ic50"}],
}


def _make_config(folder: Path, *, extra_members: list[dict] = (), **overrides):
    raw = copy.deepcopy(RAW)
    raw["members"] += [copy.deepcopy(m) for m in extra_members]
    raw.update(overrides)
    return config_from_dict(raw, source=folder / "consortium.yaml")


@pytest.fixture
def write_config(tmp_path):
    """Write consortium.yaml (plus ``extra_members``) into tmp_path; return its path."""

    def write(*, extra_members: list[dict] = ()) -> Path:
        raw = copy.deepcopy(RAW)
        raw["members"] += [copy.deepcopy(m) for m in extra_members]
        path = tmp_path / "consortium.yaml"
        path.write_text(yaml.safe_dump(raw))
        return path

    return write


@pytest.fixture
def make_config(tmp_path):
    """Build the test consortium (plus ``extra_members``, with top-level ``overrides``) in tmp_path."""

    def make(*, extra_members: list[dict] = (), **overrides):
        return _make_config(tmp_path, extra_members=extra_members, **overrides)

    return make


@pytest.fixture
def operator_raw():
    return copy.deepcopy(RAW["operator"])


@pytest.fixture
def new_member():
    return copy.deepcopy(NEW_MEMBER)


@pytest.fixture
def config(tmp_path):
    return _make_config(tmp_path)


@pytest.fixture
def kits(tmp_path, config):
    from provisioning.kits import provision

    return provision(config, out=tmp_path / "kits").out


@pytest.fixture
def keys(tmp_path, config):
    from provisioning.he_keys import create_keys

    return create_keys(config.privacy.he, out=tmp_path / "keys")
