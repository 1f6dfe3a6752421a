"""``tracking.uri`` in consortium.yaml: where a run's MLflow tracking goes (docs/tracking.md).

An MLflow tracking server (``http(s)://host:port``, what a consortium with one store for all its runs
and its model registry uses) or a SQLite database (``sqlite:///path`` or a plain path to the ``.db``
file). Left out, each run writes ``mlflow.db`` in its own run folder.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

_TRACKING_FORMS = "give http://host:port (an MLflow tracking server), sqlite:///path/mlflow.db or a path to a .db file"


def tracking_store(uri: str) -> str:
    """``tracking.uri`` checked: an MLflow server's ``http(s)://host[:port][/prefix]`` as given, a SQLite URI
    as given, a plain path as the SQLite database it names; ``ValueError`` naming the fix otherwise.

    >>> tracking_store("http://mlflow.example.org:5000"), tracking_store("runs/mlflow.db")
    ('http://mlflow.example.org:5000', 'sqlite:///runs/mlflow.db')
    """
    uri = uri.strip()
    parts = urlsplit(uri)
    scheme = parts.scheme.lower()
    if not uri:
        raise ValueError(f"is empty; {_TRACKING_FORMS}, or leave it out (mlflow.db in the run folder)")
    if scheme in ("http", "https"):
        try:
            parts.port  # noqa: B018 - raises on a port that is no number or out of range
        except ValueError:
            raise ValueError(f"has no valid port; {_TRACKING_FORMS}") from None
        if not parts.hostname:
            raise ValueError(f"names no host; {_TRACKING_FORMS}")
        if parts.username or parts.password:
            raise ValueError(
                "holds credentials; take them out of consortium.yaml and set MLFLOW_TRACKING_USERNAME and "
                "MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) where the run is started"
            )
        if parts.query or parts.fragment:
            raise ValueError(f"has a query or fragment; {_TRACKING_FORMS}")
        return uri.rstrip("/")
    if scheme == "sqlite":
        path = uri[len("sqlite:///") :] if uri.lower().startswith("sqlite:///") else ""
        if not path or path == ":memory:":
            raise ValueError(f"names no database file (an in-memory store ends with the process); {_TRACKING_FORMS}")
        return f"sqlite:///{path}"
    if scheme == "file":
        raise ValueError(
            "is an MLflow file store, which MLflow 3 refuses (maintenance mode); "
            "give sqlite:///path/mlflow.db (mlflow migrate-filestore moves existing runs) or an MLflow server"
        )
    if re.fullmatch(r"[\w.-]+:\d+(/.*)?", uri):
        raise ValueError(f"names no scheme; give http://{uri} (an MLflow tracking server)")
    if scheme and len(scheme) > 1:  # 'C:' is a drive, not a scheme
        raise ValueError(
            f"has scheme '{parts.scheme}:', which the platform does not use; {_TRACKING_FORMS} "
            "(a database such as PostgreSQL: serve it with 'mlflow server --backend-store-uri ...' and give its URL)"
        )
    return f"sqlite:///{uri}"


def sqlite_under(base: Path, uri: str | None) -> str | None:
    """A SQLite database given relative to consortium.yaml's folder ``base``, made absolute (every job
    process, whatever its working folder, then finds the same file); any other URI as it is.

    >>> sqlite_under(Path("/study"), "sqlite:///runs/mlflow.db"), sqlite_under(Path("/study"), "http://h:5000")
    ('sqlite:////study/runs/mlflow.db', 'http://h:5000')
    """
    if uri is None or not uri.startswith("sqlite:///"):
        return uri
    path = Path(uri.removeprefix("sqlite:///"))
    return uri if path.is_absolute() else f"sqlite:///{base / path}"


def without_credentials(uri: str) -> str:
    """``uri`` with any user name and password in it replaced (for messages and logs).

    >>> without_credentials("https://ana:secret@mlflow.example.org:5000")
    'https://***@mlflow.example.org:5000'
    """
    parts = urlsplit(uri)
    if "@" not in parts.netloc:
        return uri
    return urlunsplit(parts._replace(netloc="***@" + parts.netloc.rsplit("@", 1)[1]))
