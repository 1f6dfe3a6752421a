import pytest

from provisioning.errors import ProvisioningError
from provisioning.project import build_project


def _by_name(project):
    return {p["name"]: p for p in project["participants"]}


def test_project_has_server_clients_and_admins(config):
    project = build_project(config)
    assert project["api_version"] == 3
    assert project["name"] == "demo"
    participants = _by_name(project)
    assert participants["localhost"] == {
        "name": "localhost",
        "type": "server",
        "org": "neutral_op",
        "fed_learn_port": 8102,
        "admin_port": 8103,
    }
    assert participants["pharma-a"] == {"name": "pharma-a", "type": "client", "org": "pharma_a"}
    assert participants["pharma-b"]["org"] == "pharma_b"
    assert participants["admin@operator.org"]["role"] == "project_admin"
    assert participants["admin@operator.org"]["org"] == "neutral_op"
    # a lead defaults to lead@<member>.org; an explicit member.admin wins
    assert participants["lead@pharma-a.org"] == {
        "name": "lead@pharma-a.org",
        "type": "admin",
        "org": "pharma_a",
        "role": "lead",
    }
    assert participants["boss@pharma-b.com"]["role"] == "lead"
    assert len(project["participants"]) == 6


def test_project_builders_exclude_hebuilder(config):
    paths = [b["path"] for b in build_project(config)["builders"]]
    assert paths == [
        "nvflare.lighter.impl.workspace.WorkspaceBuilder",
        "nvflare.lighter.impl.static_file.StaticFileBuilder",
        "nvflare.lighter.impl.cert.CertBuilder",
        "nvflare.lighter.impl.signature.SignatureBuilder",
    ]
    assert not any("he" in p.rsplit(".", 2)[-2] for p in paths)


def test_clashing_participant_names_are_rejected(make_config, operator_raw):
    config = make_config(operator={**operator_raw, "admin": "lead@pharma-a.org"})
    with pytest.raises(ProvisioningError, match=r"repeated: \['lead@pharma-a.org'\]"):
        build_project(config)
