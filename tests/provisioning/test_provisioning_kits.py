import hashlib
import json
import shlex
import ssl
import subprocess

import pytest
import yaml

from jobs.tls_refusals import LogRefusedConnections
from provisioning import kits as kits_module
from provisioning.errors import ProvisioningError
from provisioning.kits import add_member, provision
from provisioning.policies import RESULT_FILTER_PATH, SCOPE, TLS_REFUSAL_LOG_PATH

KIT_NAMES = {"localhost", "pharma-a", "pharma-b", "admin@operator.org", "lead@pharma-a.org", "boss@pharma-b.com"}


def test_provision_writes_a_kit_per_participant(kits):
    folders = {p.name for p in kits.iterdir() if p.is_dir()}
    assert folders == KIT_NAMES | {"_ca"}
    assert (kits / "localhost/startup/fed_server.json").is_file()
    assert (kits / "localhost/startup/server.key").is_file()
    for member in ("pharma-a", "pharma-b"):
        assert (kits / member / "startup/fed_client.json").is_file()
        assert (kits / member / "startup/client.key").is_file()
    assert (kits / "lead@pharma-a.org/startup/fed_admin.json").is_file()
    # no HE context comes out of provisioning: the custodian installs it
    assert not list(kits.rglob("*.tenseal"))
    project = yaml.safe_load((kits / "project.yml").read_text())
    assert {p["name"] for p in project["participants"]} == KIT_NAMES
    assert (kits / "_ca/cert.json").is_file()
    assert not list(kits.parent.glob(".kits.staging-*"))


def test_authorization_policy_in_server_and_member_kits(kits):
    for site in ("localhost", "pharma-a", "pharma-b"):
        policy = json.loads((kits / site / "local/authorization.json").read_text())
        perms = policy["permissions"]
        assert perms["lead"]["submit_job"] == "any"
        assert perms["lead"]["manage_job"] == "o:submitter"
        assert perms["lead"]["download_job"] == "o:submitter"
        assert perms["project_admin"]["submit_job"] == "none"
        assert perms["project_admin"]["operate"] == "o:site"
        assert perms["project_admin"]["manage_job"] == "none"


def test_authorization_policy_is_enforced_by_nvflare(kits):
    from nvflare.fuel.sec.authz import AuthzContext, Person
    from nvflare.security.security import FLAuthorizer

    policy = json.loads((kits / "pharma-a/local/authorization.json").read_text())
    site_a = FLAuthorizer("pharma_a", policy)
    lead_a = Person("lead@pharma-a.org", "pharma_a", "lead")
    lead_b = Person("boss@pharma-b.com", "pharma_b", "lead")
    operator = Person("admin@operator.org", "neutral_op", "project_admin")

    def allowed(right, user, submitter):
        return site_a.authorize(AuthzContext(right, user, submitter=submitter))[0]

    assert allowed("submit_job", lead_b, lead_b)
    assert allowed("abort_job", lead_a, lead_a)
    assert not allowed("abort_job", lead_b, lead_a)
    assert not allowed("delete_job", lead_b, lead_a)
    assert not allowed("download_job", lead_b, lead_a)
    assert allowed("shutdown", lead_a, lead_a)  # its own site
    assert not allowed("shutdown", lead_b, lead_b)  # not pharma-a's site
    assert not allowed("shutdown", operator, operator)  # the operator runs only the server
    assert not allowed("submit_job", operator, operator)
    assert not allowed("delete_job", operator, lead_a)
    assert allowed("abort_job", operator, lead_a)


def test_privacy_scope_only_in_member_kits(kits):
    assert not (kits / "localhost/local/privacy.json").exists()
    privacy = json.loads((kits / "pharma-a/local/privacy.json").read_text())
    assert "default_scope" not in privacy
    [scope] = privacy["scopes"]
    assert scope["name"] == SCOPE == "consortium-he"
    assert scope["task_result_filters"] == [{"path": RESULT_FILTER_PATH, "args": {}}]


def test_the_scope_filter_path_names_the_site_policy_class():
    """The path privacy.json names must import at a member site (the live test shows FLARE applying it)."""
    import importlib

    module, name = RESULT_FILTER_PATH.rsplit(".", 1)
    policy = getattr(importlib.import_module(module), name)()
    assert type(policy).__name__ == "RequireEncryptedResult"


def test_refuses_out_inside_a_git_repo(tmp_path, config):
    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    with pytest.raises(ProvisioningError, match=r"inside the git work tree .*must never be committed"):
        provision(config, out=repo / "kits")
    assert not (repo / "kits").exists()


def test_refuses_existing_kits(kits, config):
    with pytest.raises(ProvisioningError, match="already exists and is not empty"):
        provision(config, out=kits)


def test_failed_provisioning_leaves_nothing(tmp_path, config, monkeypatch):
    def broken(*args, **kwargs):
        raise ProvisioningError("NVFlare provisioning failed: simulated")

    monkeypatch.setattr(kits_module, "_run_nvflare", broken)
    with pytest.raises(ProvisioningError, match="simulated"):
        provision(config, out=tmp_path / "kits")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def _digests(folder):
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()
    }


def test_add_member_reuses_the_ca_and_leaves_other_kits_alone(kits, make_config, new_member):
    before = {name: _digests(kits / name) for name in KIT_NAMES}
    grown = make_config(extra_members=[new_member])
    result = add_member(grown, kits=kits, member="pharma-c")
    assert set(result.members) == {"pharma-c"}
    assert set(result.admins) == {"lead@pharma-c.org"}
    assert (kits / "pharma-c/startup/client.key").is_file()
    assert (kits / "pharma-c/local/privacy.json").is_file()
    assert "jobs." in json.loads((kits / "pharma-c/local/resources.json").read_text())["class_allow_list"]
    assert (kits / "pharma-c/startup/rootCA.pem").read_bytes() == (kits / "localhost/startup/rootCA.pem").read_bytes()
    assert {name: _digests(kits / name) for name in KIT_NAMES} == before
    project = yaml.safe_load((kits / "project.yml").read_text())
    assert "pharma-c" in {p["name"] for p in project["participants"]}
    with pytest.raises(ProvisioningError, match="already a member"):
        add_member(grown, kits=kits, member="pharma-c")


def test_job_logs_and_no_code_in_jobs_as_nvflare_enforces_them(kits):
    from nvflare.fuel.sec.authz import AuthzContext, Person
    from nvflare.security.security import FLAuthorizer

    server = FLAuthorizer("neutral_op", json.loads((kits / "localhost/local/authorization.json").read_text()))
    lead_a = Person("lead@pharma-a.org", "pharma_a", "lead")
    lead_b = Person("boss@pharma-b.com", "pharma_b", "lead")
    operator = Person("admin@operator.org", "neutral_op", "project_admin")

    def allowed(right, user, submitter):
        return server.authorize(AuthzContext(right, user, submitter=submitter))[0]

    assert allowed("get_job_log", lead_a, lead_a)  # nvflare job logs: its own org's jobs
    assert not allowed("get_job_log", lead_b, lead_a)
    assert allowed("get_job_log", operator, lead_b)  # the operator reads every job's logs
    assert not allowed("byoc", lead_a, lead_a)  # jobs ship no code: the sites run the installed package


def test_resources_keep_the_job_store_in_the_server_workspace_and_allow_the_installed_jobs(kits):
    server = json.loads((kits / "localhost/local/resources.json").read_text())
    [manager] = [c for c in server["components"] if c["id"] == "job_manager"]
    assert manager["args"]["uri_root"] == str(kits / "localhost" / "jobs-storage")
    assert server["snapshot_persistor"]["args"]["storage"]["args"]["root_dir"].startswith(str(kits / "localhost"))
    assert "/tmp/nvflare" not in json.dumps(server)
    for site in ("localhost", "pharma-a", "pharma-b"):
        resources = json.loads((kits / site / "local/resources.json").read_text())
        allowed = resources["class_allow_list"]
        assert {"jobs.", "models.network.SharedModel"} <= set(allowed)
        assert "nvflare.app_common.workflows.scatter_and_gather.ScatterAndGather" in allowed


def test_the_server_kit_logs_refused_tls_connections_and_the_members_do_not_run_it(kits, monkeypatch):
    """The component NVFlare builds from the server's resources.json before it listens (a forged
    certificate is then logged: tests/jobs/test_tls_refusals.py and the POC fault test)."""
    from nvflare.fuel.utils.class_utils import instantiate_class

    monkeypatch.setattr(ssl.SSLContext, "sslobject_class", ssl.SSLObject)  # the component sets it: restored
    server = json.loads((kits / "localhost/local/resources.json").read_text())
    [component] = [c for c in server["components"] if c["path"] == TLS_REFUSAL_LOG_PATH]
    assert isinstance(instantiate_class(component["path"], component["args"]), LogRefusedConnections)
    for member in ("pharma-a", "pharma-b"):
        assert TLS_REFUSAL_LOG_PATH not in (kits / member / "local/resources.json").read_text()


def test_the_server_stops_waiting_for_a_silent_members_end_of_job_after_a_round_deadline(kits, config):
    """A member whose link went down never reports that it ended the job: NVFlare's server would keep the job
    RUNNING 900 s for it; the kit's start command bounds that by training.round_deadline (the whole case across
    hosts: tests/provisioning/test_separate_hosts.py)."""
    from nvflare.fuel.utils.argument_utils import parse_vars

    def settings(site: str) -> dict:
        script = (kits / site / "startup" / "sub_start.sh").read_text().splitlines()
        words = shlex.split(next(line for line in script if "python3 -u -m nvflare" in line))
        return parse_vars(words[words.index("--set") + 1 :])

    assert settings("localhost")["client_outcome_wait_timeout"] == config.training.round_deadline == 600
    assert "client_outcome_wait_timeout" not in settings("pharma-a")
