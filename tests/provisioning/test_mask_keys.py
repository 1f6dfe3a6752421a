"""The mask-key ceremony (secure aggregation) on fake kits folders (``<site>/startup``): each member's key
made in its own kit, the list installed in every member kit, and what ``verify_masks`` and the CLI refuse."""

from __future__ import annotations

import json
import shutil

import pytest

from consortium.backends.admin_kit import AdminKit, mask_key_problems
from consortium.cli import main
from jobs.he.mask_files import load_masker, read_public_keys, write_public_keys
from jobs.he.masks import private_bytes
from provisioning.errors import KeyCeremonyError
from provisioning.he_keys import create_keys, install_keys
from provisioning.mask_keys import (
    ceremony_on_one_machine,
    list_fingerprints,
    member_ceremony,
    verify_masks,
)
from schema.config import dump_config
from schema.names import MASK_KEY_FILE, MASK_PUBLIC_KEYS_FILE

MEMBERS = ["pharma-a", "pharma-b", "pharma-c"]


@pytest.fixture
def config(make_config, new_member):
    made = make_config(extra_members=[new_member])
    assert made.secure_aggregation()  # three members, every one in each round: on by default
    return made


@pytest.fixture
def config_file(config, tmp_path):
    path = tmp_path / "consortium.yaml"
    dump_config(config, path)
    return path


@pytest.fixture
def kits(tmp_path, config):
    """A kits folder as 'consortium provision' lays it out, without NVFlare's files."""
    folder = tmp_path / "kits"
    for site in [config.operator.host, *MEMBERS]:
        (folder / site / "startup").mkdir(parents=True)
    return folder


@pytest.fixture
def keyed(kits, config):
    ceremony_on_one_machine(kits, config=config)
    return kits


def _flat(text: str) -> str:
    return " ".join(text.split())


def _problems(report) -> str:
    return _flat(" | ".join(f"{f.path}: {f.problem}" for f in report.findings))


def test_one_machine_ceremony_makes_a_key_in_each_member_kit_and_one_list(kits, config):
    ceremony = ceremony_on_one_machine(kits, config=config)
    assert [key.member for key in ceremony.keys] == MEMBERS and all(key.created for key in ceremony.keys)
    assert sorted(ceremony.installed) == sorted(kits / m / "startup" / MASK_PUBLIC_KEYS_FILE for m in MEMBERS)
    for member in MEMBERS:
        key = kits / member / "startup" / MASK_KEY_FILE
        assert key.stat().st_mode & 0o777 == 0o600 and key.stat().st_size == 32
        assert read_public_keys(ceremony.installed[0]) == read_public_keys(
            kits / member / "startup" / MASK_PUBLIC_KEYS_FILE
        )
        load_masker(kits / member / "startup", member, min_members=3)  # what a member site reads
    assert not list((kits / config.operator.host).rglob("*"))[1:]  # the server kit: only its empty startup/
    assert list_fingerprints(kits / "pharma-a" / "startup") == ceremony.fingerprints
    assert all(len(value) == 64 for value in ceremony.fingerprints.values())
    report = verify_masks(kits, config=config)
    assert report.ok, _problems(report)
    assert report.checked == MEMBERS and report.fingerprints == ceremony.fingerprints


def test_a_second_ceremony_keeps_every_key(keyed, config):
    before = {m: (keyed / m / "startup" / MASK_KEY_FILE).read_bytes() for m in MEMBERS}
    again = ceremony_on_one_machine(keyed, config=config)
    assert not any(key.created for key in again.keys)
    assert {m: (keyed / m / "startup" / MASK_KEY_FILE).read_bytes() for m in MEMBERS} == before


def test_members_on_their_own_machines_hand_on_public_files_only(tmp_path, config):
    public = tmp_path / "public"
    machines = {m: tmp_path / f"machine-{m}" / m for m in MEMBERS}
    for kit in machines.values():
        (kit / "startup").mkdir(parents=True)
    first = member_ceremony(machines["pharma-a"], config=config, public_dir=public)
    assert first.missing == ["pharma-b", "pharma-c"] and first.installed == []
    member_ceremony(machines["pharma-b"], config=config, public_dir=public)
    last = member_ceremony(machines["pharma-c"], config=config, public_dir=public)
    assert last.missing == [] and last.installed == [machines["pharma-c"] / "startup" / MASK_PUBLIC_KEYS_FILE]
    for member in ["pharma-a", "pharma-b"]:  # the earlier ones install once every file is there
        assert member_ceremony(machines[member], config=config, public_dir=public).installed
    assert sorted(p.name for p in public.iterdir()) == [f"{m}.maskpub.json" for m in MEMBERS]
    for member, kit in machines.items():
        handed_on = (public / f"{member}.maskpub.json").read_text()
        secret = (kit / "startup" / MASK_KEY_FILE).read_bytes()
        assert secret.hex() not in handed_on and json.loads(handed_on)["member"] == member
        load_masker(kit / "startup", member, min_members=3)
    lists = {
        json.dumps(read_public_keys(k / "startup" / MASK_PUBLIC_KEYS_FILE), default=bytes.hex)
        for k in machines.values()
    }
    assert len(lists) == 1


def test_a_member_kit_elsewhere_contributes_its_public_file(tmp_path, kits, config):
    public = tmp_path / "public"
    elsewhere = tmp_path / "far" / "pharma-c"
    shutil.move(kits / "pharma-c", elsewhere)
    with pytest.raises(KeyCeremonyError, match=r"no kit and no public mask key file .*pharma-c"):
        ceremony_on_one_machine(kits, config=config)
    member_ceremony(elsewhere, config=config, public_dir=public)
    ceremony = ceremony_on_one_machine(kits, config=config, public_dir=public)
    assert sorted(ceremony.fingerprints) == MEMBERS and len(ceremony.installed) == 2


def test_verify_finds_a_member_key_in_the_server_kit_whatever_its_name(keyed, config, tmp_path):
    copy = keyed / config.operator.host / "local" / "backup.bin"
    copy.parent.mkdir()
    shutil.copyfile(keyed / "pharma-b" / "startup" / MASK_KEY_FILE, copy)
    workspace = tmp_path / "server-workspace"
    (workspace / "startup").mkdir(parents=True)
    (workspace / "startup" / MASK_KEY_FILE).write_bytes(b"\0" * 32)
    report = verify_masks(keyed, config=config, workspace=workspace)
    assert not report.ok and report.checked == MEMBERS
    assert [f.path for f in report.findings] == [copy, workspace / "startup" / MASK_KEY_FILE]
    assert "the private mask key of 'pharma-b' in the operator's server kit" in report.findings[0].problem
    assert "in the operator's server workspace" in report.findings[1].problem
    with pytest.raises(KeyCeremonyError, match="--workspace"):
        verify_masks(keyed, config=config, workspace=tmp_path / "absent")


def test_verify_finds_a_key_that_is_not_the_listed_one(keyed, config):
    from jobs.he.masks import new_private_key

    (keyed / "pharma-b" / "startup" / MASK_KEY_FILE).write_bytes(private_bytes(new_private_key()))
    report = verify_masks(keyed, config=config)
    [finding] = report.findings
    assert finding.path == keyed / "pharma-b" / "startup" / MASK_KEY_FILE
    assert "not the key mask_public_keys.json names for 'pharma-b'" in finding.problem
    assert report.checked == ["pharma-a", "pharma-c"]


def test_verify_finds_a_missing_member_and_lists_that_differ(keyed, config):
    full = read_public_keys(keyed / "pharma-a" / "startup" / MASK_PUBLIC_KEYS_FILE)
    write_public_keys(keyed / "pharma-c" / "startup", {m: full[m] for m in ["pharma-a", "pharma-b"]})
    report = verify_masks(keyed, config=config)
    problems = _problems(report)
    assert "pharma-c/startup/mask_public_keys.json: no public mask key for ['pharma-c']" in problems
    assert "pharma-c/startup/mask_public_keys.json: not the list the other member kits hold" in problems
    assert "consortium keys masks" in problems


def test_verify_names_damaged_and_missing_files(keyed, config):
    (keyed / "pharma-a" / "startup" / MASK_PUBLIC_KEYS_FILE).write_text("{not json")
    (keyed / "pharma-b" / "startup" / MASK_KEY_FILE).unlink()
    (keyed / "pharma-c" / "startup" / MASK_KEY_FILE).chmod(0o644)
    problems = _problems(verify_masks(keyed, config=config))
    assert "pharma-a/startup/mask_public_keys.json: not a public mask key list" in problems
    assert "pharma-b/startup/mask_key.x25519: missing: this member cannot mask" in problems
    assert "pharma-c/startup/mask_key.x25519: mode 644: others may read it; chmod 600" in problems
    # a member holding only its own kit checks just that kit
    assert verify_masks(keyed, config=config, sites=["pharma-b"]).checked == []
    assert verify_masks(keyed, config=config, sites=[config.operator.host]).ok
    with pytest.raises(KeyCeremonyError, match=r"--site \['nobody'\]"):
        verify_masks(keyed, config=config, sites=["nobody"])


def test_refusals_name_the_file_and_the_fix(tmp_path, kits, config):
    public = tmp_path / "public"
    member_ceremony(kits / "pharma-a", config=config, public_dir=public)
    damaged = public / "pharma-b.maskpub.json"
    damaged.write_text('{"version": "consortium-mask-public/1", "member": "pharma-b", "public_key": "zz"}')
    with pytest.raises(KeyCeremonyError, match=r"pharma-b.maskpub.json: not a public mask key file"):
        member_ceremony(kits / "pharma-a", config=config, public_dir=public)
    damaged.unlink()
    (kits / "pharma-a" / "startup" / MASK_KEY_FILE).unlink()  # a new key: its old public file no longer fits
    with pytest.raises(KeyCeremonyError, match=r"pharma-a.maskpub.json: names another public key .* delete the file"):
        member_ceremony(kits / "pharma-a", config=config, public_dir=public)
    (kits / "pharma-b" / "startup" / MASK_KEY_FILE).write_bytes(b"short")
    with pytest.raises(KeyCeremonyError, match=r"mask_key.x25519: 5 bytes.*delete"):
        member_ceremony(kits / "pharma-b", config=config, public_dir=public)
    with pytest.raises(KeyCeremonyError, match="the operator's server kit"):
        member_ceremony(kits / config.operator.host, config=config, public_dir=public)
    with pytest.raises(KeyCeremonyError, match="'stranger' is not a member"):
        member_ceremony(tmp_path / "stranger", config=config, public_dir=public)
    with pytest.raises(KeyCeremonyError, match="no member kit here"):
        ceremony_on_one_machine(tmp_path / "public", config=config)


def test_a_kits_run_is_refused_where_a_member_kit_beside_the_lead_kit_cannot_mask(keyed, config):
    lead = keyed / "lead@pharma-a.org"
    (lead / "startup").mkdir(parents=True)
    kit = AdminKit(lead, "lead@pharma-a.org")
    assert mask_key_problems(kit, config) == []
    (keyed / "pharma-b" / "startup" / MASK_PUBLIC_KEYS_FILE).unlink()
    [problem] = mask_key_problems(kit, config)
    assert "pharma-b/startup/mask_public_keys.json" in problem and "consortium keys masks" in problem


def test_a_kits_run_without_mask_keys_is_refused_before_anything_is_written(kits, config_file, capsys, tmp_path):
    lead = kits / "lead@pharma-a.org" / "startup"
    lead.mkdir(parents=True)
    (lead / "fed_admin.json").write_text("{}")
    (kits / "pharma-a" / "startup" / "client_context.tenseal").write_bytes(b"context")  # only its presence counts
    out = tmp_path / "run"
    argv = ["run", "--config", str(config_file), "--env", "kits", "--startup-kit", str(lead.parent), "--out", str(out)]
    assert main(argv) == 2
    err = _flat(capsys.readouterr().err)
    assert "uses secure aggregation" in err and "pharma-a/startup/mask_key.x25519: missing" in err
    assert "consortium keys masks" in err and not out.exists()


# -- the CLI ------------------------------------------------------------------------------------------


def test_cli_masks_on_one_machine_then_verify_records_the_fingerprints(kits, config, config_file, capsys, tmp_path):
    install_keys(kits, create_keys(config.privacy.he, out=tmp_path / "he").secret_context.parent, config=config)
    assert main(["keys", "masks", "--config", str(config_file), "--kits", str(kits), "--json"]) == 0
    made = json.loads(capsys.readouterr().out)
    assert [k["member"] for k in made["keys"]] == MEMBERS and len(made["installed"]) == 3
    assert made["fingerprints"] == {k["member"]: k["fingerprint"] for k in made["keys"]}
    log, key = tmp_path / "check.jsonl", tmp_path / "mine" / "audit.key"
    verify = ["keys", "verify", "--config", str(config_file), "--kits", str(kits)]
    assert main([*verify, "--audit", str(log), "--signing-key", str(key)]) == 0
    assert "mask keys" in capsys.readouterr().out
    entry = json.loads(log.read_text().splitlines()[-1])["details"]
    assert entry["masks_ok"] is True and entry["mask_fingerprints"] == made["fingerprints"]
    (kits / config.operator.host / "startup" / MASK_KEY_FILE).write_bytes(b"\1" * 32)
    assert main([*verify, "--json"]) == 1
    captured = capsys.readouterr()
    assert json.loads(captured.out)["masks"]["ok"] is False
    assert "mask key verification failed" in captured.err and "startup/mask_key.x25519" in captured.err


def test_cli_member_kit_writes_its_public_file_and_installs_once_all_are_there(kits, config_file, capsys, tmp_path):
    public = tmp_path / "public"
    for member in MEMBERS:
        assert (
            main(["keys", "masks", "--config", str(config_file), "--kit", str(kits / member), "--public", str(public)])
            == 0
        )
    out = _flat(capsys.readouterr().out)
    assert "not installed yet: no public key file" in out and "hand it on to every member" in out
    assert f"installed {kits / 'pharma-c' / 'startup' / MASK_PUBLIC_KEYS_FILE}" in out
    assert main(["keys", "masks", "--config", str(config_file), "--kit", str(kits / "pharma-a")]) == 0
    assert (kits / "pharma-a.maskpub.json").is_file()  # default: beside the kit


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "give --kit KITS/<member> (your own member kit) or --kits KITS"),
        (["--kit", "KITS/pharma-a", "--kits", "KITS"], "not both or neither"),
        (["--kit", "KITS/localhost"], "the operator's server kit"),
        (["--kit", "KITS/nobody"], "'nobody' is not a member"),
        (["--kits", "KITS/pharma-a/startup"], "no member kit here"),
        (["--kit", "KITS/pharma-a", "--public", "KITS/pharma-b/startup/file"], "is a file"),
    ],
    ids=["neither", "both", "server", "stranger", "empty", "public-is-a-file"],
)
def test_cli_masks_bad_input_exits_2_with_a_message(kits, config_file, capsys, args, message):
    (kits / "pharma-b" / "startup" / "file").write_text("x")
    argv = [arg.replace("KITS", str(kits)) for arg in args]
    assert main(["keys", "masks", "--config", str(config_file), *argv]) == 2
    err = _flat(capsys.readouterr().err)
    assert message in err and "Traceback" not in err
