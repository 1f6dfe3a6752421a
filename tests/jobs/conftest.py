"""Fixtures of the job tests: small CKKS key pairs, site folders holding them, a consortium with a shared endpoint."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import tenseal as ts
import yaml
from nvflare.apis.fl_constant import FLContextKey, ReservedKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.workspace import Workspace
from nvflare.app_common.app_constant import AppConstants

from jobs.he.context import context_from_bytes, make_contexts
from schema.config import HomomorphicEncryption
from schema.names import CLIENT_CONTEXT_FILE, SERVER_CONTEXT_FILE

SHARED_ENDPOINT = "pfs"
"""Both members' survival task, renamed to one name: the shared endpoint of ``shared_consortium``."""


@pytest.fixture(scope="session")
def he_settings() -> HomomorphicEncryption:
    """The consortium's default CKKS chain, small enough for fast tests: N=8192, [60, 40], scale 2^40."""
    return HomomorphicEncryption(poly_modulus_degree=8192, coeff_mod_bit_sizes=[60, 40], global_scale_bits=40)


@pytest.fixture(scope="session")
def he_contexts(he_settings: HomomorphicEncryption) -> tuple[bytes, bytes]:
    """``(client_context, server_context)`` bytes of one key pair."""
    return make_contexts(he_settings)


@pytest.fixture(scope="session")
def member_context(he_contexts: tuple[bytes, bytes]) -> ts.Context:
    return context_from_bytes(he_contexts[0], source=CLIENT_CONTEXT_FILE, private=True)


@pytest.fixture(scope="session")
def server_context(he_contexts: tuple[bytes, bytes]) -> ts.Context:
    return context_from_bytes(he_contexts[1], source=SERVER_CONTEXT_FILE, private=False)


@pytest.fixture(scope="session")
def kits(tmp_path_factory: pytest.TempPathFactory, he_contexts: tuple[bytes, bytes]) -> dict[str, Path]:
    """Site folders as the key ceremony leaves them: the secret context at members, the public one at the server."""
    client, server = he_contexts
    root = tmp_path_factory.mktemp("kits")
    sites = {}
    for name, file, data in [
        ("site-1", CLIENT_CONTEXT_FILE, client),
        ("site-2", CLIENT_CONTEXT_FILE, client),
        ("site-3", CLIENT_CONTEXT_FILE, client),
        ("server", SERVER_CONTEXT_FILE, server),
    ]:
        (root / name / "startup").mkdir(parents=True)
        (root / name / "local").mkdir()
        (root / name / "startup" / file).write_bytes(data)
        sites[name] = root / name
    return sites


@pytest.fixture
def site_ctx() -> Callable[..., FLContext]:
    """``site_ctx(folder, current_round=0)``: an FLContext whose workspace is ``folder`` (its startup/ kit)."""

    def make(site_root: Path, *, current_round: int = 0) -> FLContext:
        fl_ctx = FLContext()
        fl_ctx.set_prop(FLContextKey.WORKSPACE_OBJECT, Workspace(root_dir=str(site_root)), private=True, sticky=False)
        fl_ctx.set_prop(AppConstants.CURRENT_ROUND, current_round, private=True, sticky=False)
        return fl_ctx

    return make


class _ServerEngine:
    """The one part of FLARE's server engine the server components here ask for: the workspace."""

    def __init__(self, workspace: Workspace) -> None:
        self.workspace = workspace

    def get_workspace(self) -> Workspace:
        return self.workspace

    def fire_event(self, event_type, fl_ctx) -> None:
        pass


@pytest.fixture
def server_run(tmp_path) -> tuple[FLContext, Path]:
    """The server's FLContext for job 'job-1' (an engine with a workspace under ``tmp_path``) and the job's
    run folder."""
    (tmp_path / "startup").mkdir()
    (tmp_path / "local").mkdir()
    workspace = Workspace(root_dir=str(tmp_path))
    run_dir = Path(workspace.get_run_dir("job-1"))
    run_dir.mkdir()
    fl_ctx = FLContext()
    fl_ctx.put(ReservedKey.ENGINE, _ServerEngine(workspace), private=True, sticky=False)
    fl_ctx.set_prop(FLContextKey.CURRENT_JOB_ID, "job-1", private=True, sticky=False)
    return fl_ctx, run_dir


@pytest.fixture(scope="session")
def shared_consortium(tiny_consortium: Path) -> Path:
    """The tiny consortium with both members' survival task renamed to ``pfs``: one shared endpoint.

    Written beside ``tiny_consortium`` so the members' data paths (relative to the yaml) stay valid.
    """
    raw = yaml.safe_load(tiny_consortium.read_text())
    for member in raw["members"]:
        (survival,) = [t for t in member["tasks"] if t["type"] == "survival"]
        survival["name"] = SHARED_ENDPOINT
    path = tiny_consortium.with_name("shared_endpoint.yaml")
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path
