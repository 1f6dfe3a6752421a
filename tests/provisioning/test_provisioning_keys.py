import shutil

import pytest
import tenseal as ts

from consortium.cli import main
from provisioning.errors import KeyCeremonyError
from provisioning.he_keys import (
    CLIENT_CONTEXT,
    SERVER_CONTEXT,
    create_keys,
    install_keys,
    public_fingerprint,
    verify_keys,
)
from provisioning.kits import add_member
from schema.config import dump_config

# A 2^40 scale: at the shared conftest's 2^20 the CKKS noise (~1e-3) sits at the key-pair probe's
# tolerance, and install_keys failed now and then.
PRECISE_HE = {"he": {"poly_modulus_degree": 4096, "coeff_mod_bit_sizes": [60, 40], "global_scale_bits": 40}}


@pytest.fixture
def config(make_config):
    return make_config(privacy=PRECISE_HE)


@pytest.fixture
def config_file(config, tmp_path):
    path = tmp_path / "consortium.yaml"
    dump_config(config, path)
    return path


def _load(path):
    return ts.context_from(path.read_bytes())


@pytest.fixture
def keyed_kits(kits, keys, config):
    install_keys(kits, keys.secret_context.parent, config=config)
    return kits


def test_created_contexts_split_secret_and_public(keys, config):
    secret, public = _load(keys.secret_context), _load(keys.public_context)
    assert secret.is_private() and secret.has_secret_key()
    assert not public.is_private() and not public.has_secret_key()
    assert not secret.has_galois_keys()
    assert secret.global_scale == 2**config.privacy.he.global_scale_bits
    assert public_fingerprint(secret) == public_fingerprint(public) == keys.fingerprint
    assert (keys.secret_context.stat().st_mode & 0o777) == 0o600
    # a ciphertext made with the public context decrypts with the secret one
    vector = ts.ckks_vector(public, [0.25, -1.5])
    decrypted = ts.ckks_vector_from(secret, vector.serialize()).decrypt()
    assert decrypted == pytest.approx([0.25, -1.5], abs=1e-6)


def test_create_refuses_to_overwrite(keys, config):
    with pytest.raises(KeyCeremonyError, match="already exist"):
        create_keys(config.privacy.he, out=keys.secret_context.parent)


def test_only_member_kits_hold_a_secret_context(keyed_kits, keys):
    for member in ("pharma-a", "pharma-b"):
        context = _load(keyed_kits / member / "startup" / CLIENT_CONTEXT)
        assert context.is_private() and context.has_secret_key()
        assert not (keyed_kits / member / "startup" / SERVER_CONTEXT).exists()
    server = _load(keyed_kits / "localhost/startup" / SERVER_CONTEXT)
    assert not server.is_private() and not server.has_secret_key()
    assert not (keyed_kits / "localhost/startup" / CLIENT_CONTEXT).exists()
    holders = sorted(p.relative_to(keyed_kits).parts[0] for p in keyed_kits.rglob(CLIENT_CONTEXT))
    assert holders == ["pharma-a", "pharma-b"]


def test_verify_passes_after_install(keyed_kits, keys, config):
    report = verify_keys(keyed_kits, config=config)
    assert report.ok, report.findings
    assert report.fingerprint == keys.fingerprint
    assert report.checked == {"localhost": "public", "pharma-a": "secret", "pharma-b": "secret"}


@pytest.mark.fault
def test_verify_names_a_secret_context_planted_in_the_server_kit(keyed_kits, keys, config):
    server_file = keyed_kits / "localhost/startup" / SERVER_CONTEXT
    shutil.copyfile(keys.secret_context, server_file)
    report = verify_keys(keyed_kits, config=config)
    assert [(f.path, f.problem) for f in report.findings] == [
        (server_file, "holds a secret key: the operator could decrypt updates")
    ]
    with pytest.raises(Exception, match=r"localhost/startup/server_context.tenseal: holds a secret key"):
        report.raise_for_failure()


def test_verify_names_a_stray_client_context_in_the_server_kit(keyed_kits, keys, config):
    shutil.copyfile(keys.secret_context, keyed_kits / "localhost/startup" / CLIENT_CONTEXT)
    [finding] = verify_keys(keyed_kits, config=config).findings
    assert finding.path == keyed_kits / "localhost/startup" / CLIENT_CONTEXT
    assert "secret (client) context in the operator's server kit" in finding.problem


def test_verify_names_a_member_with_a_different_key(keyed_kits, config, tmp_path):
    other = create_keys(config.privacy.he, out=tmp_path / "other-keys")
    shutil.copyfile(other.secret_context, keyed_kits / "pharma-b/startup" / CLIENT_CONTEXT)
    [finding] = verify_keys(keyed_kits, config=config).findings
    assert finding.path == keyed_kits / "pharma-b/startup" / CLIENT_CONTEXT
    assert "a different key pair" in finding.problem


def test_verify_names_a_missing_context(kits, config):
    report = verify_keys(kits, config=config)
    assert {f.path.parts[-3] for f in report.findings} == {"localhost", "pharma-a", "pharma-b"}
    assert all("missing" in f.problem for f in report.findings)


def test_install_refuses_swapped_key_files(kits, keys, config, tmp_path):
    swapped = tmp_path / "swapped"
    swapped.mkdir()
    shutil.copyfile(keys.secret_context, swapped / SERVER_CONTEXT)
    shutil.copyfile(keys.public_context, swapped / CLIENT_CONTEXT)
    with pytest.raises(KeyCeremonyError, match="holds no secret key"):
        install_keys(kits, swapped, config=config)
    assert not list(kits.rglob("*.tenseal"))


def test_new_member_gets_the_existing_key_without_rekeying(keyed_kits, keys, make_config, new_member):
    before = {p: p.read_bytes() for p in keyed_kits.rglob("*.tenseal")}
    grown = make_config(extra_members=[new_member], privacy=PRECISE_HE)
    add_member(grown, kits=keyed_kits, member="pharma-c")
    installed = install_keys(keyed_kits, keys.secret_context.parent, config=grown, members=["pharma-c"])
    assert installed == [keyed_kits / "pharma-c/startup" / CLIENT_CONTEXT]
    assert {p: p.read_bytes() for p in before} == before
    report = verify_keys(keyed_kits, config=grown)
    assert report.ok, report.findings
    assert report.fingerprint == keys.fingerprint


def test_verify_one_site_against_a_recorded_fingerprint(keyed_kits, keys, config, tmp_path):
    shutil.rmtree(keyed_kits / "pharma-b")  # a member holding only its own kit
    report = verify_keys(keyed_kits, config=config, sites=["pharma-a"], fingerprint=keys.fingerprint)
    assert report.ok, report.findings
    assert report.checked == {"pharma-a": "secret"}
    other = create_keys(config.privacy.he, out=tmp_path / "other-keys")
    [finding] = verify_keys(keyed_kits, config=config, sites=["localhost"], fingerprint=other.fingerprint).findings
    assert finding.path == keyed_kits / "localhost/startup" / SERVER_CONTEXT
    assert "a different key pair" in finding.problem
    with pytest.raises(KeyCeremonyError, match="pharma-z"):
        verify_keys(keyed_kits, config=config, sites=["pharma-z"])


# -- the server kit is searched, not looked up: a secret key under any name is found ----------------


@pytest.mark.fault
def test_verify_searches_the_whole_server_kit(keyed_kits, keys, config):
    backup = keyed_kits / "localhost/local/backup.tenseal"
    shutil.copyfile(keys.secret_context, backup)
    report = verify_keys(keyed_kits, config=config)
    [finding] = report.findings
    assert finding.path == backup
    assert "a secret HE context (secret key) in the operator's server kit" in finding.problem
    assert report.scanned >= 10  # certificates, scripts, policies and the public context were all parsed


def test_public_copies_elsewhere_in_the_server_kit_pass(keyed_kits, keys, config):
    shutil.copyfile(keys.public_context, keyed_kits / "localhost/local/public-copy.bin")
    assert verify_keys(keyed_kits, config=config).ok


@pytest.mark.fault
def test_verify_searches_the_server_workspace(keyed_kits, keys, config, tmp_path):
    workspace = tmp_path / "server-workspace"
    (workspace / "run_1" / "app_server").mkdir(parents=True)
    (workspace / "run_1" / "app_server" / "model.bin").write_bytes(b"\0" * 4096)
    assert verify_keys(keyed_kits, config=config, workspace=workspace).ok
    hidden = workspace / "run_1" / "app_server" / "ctx"
    shutil.copyfile(keys.secret_context, hidden)
    [finding] = verify_keys(keyed_kits, config=config, workspace=workspace).findings
    assert finding.path == hidden and "server workspace" in finding.problem
    with pytest.raises(KeyCeremonyError, match="--workspace .*no such folder"):
        verify_keys(keyed_kits, config=config, workspace=tmp_path / "absent")


@pytest.mark.fault
def test_cli_keys_verify_names_a_secret_backup_in_the_server_kit(keyed_kits, keys, config_file, capsys):
    assert main(["keys", "verify", "--config", str(config_file), "--kits", str(keyed_kits)]) == 0
    assert "server files searched, no secret key" in " ".join(capsys.readouterr().out.split())
    shutil.copyfile(keys.secret_context, keyed_kits / "localhost/local/backup.tenseal")
    assert main(["keys", "verify", "--config", str(config_file), "--kits", str(keyed_kits)]) == 1
    captured = capsys.readouterr()
    err = captured.err.replace("\n", "")
    assert "localhost/local/backup.tenseal: a secret HE context" in err
    assert "Traceback" not in err + captured.out


def test_create_keys_refuses_a_file_as_out(config, tmp_path):
    (tmp_path / "taken").write_text("x")
    with pytest.raises(KeyCeremonyError, match="taken: is a file"):
        create_keys(config.privacy.he, out=tmp_path / "taken")
