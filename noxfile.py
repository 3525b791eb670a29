"""The suite on every Python that pyproject.toml declares beyond the one `make test` uses (3.11):
`make test-pythons` (and .ci/run) runs it on 3.12 and 3.13, on PostgreSQL and Redis only (SQLite
and the browser check run once, on 3.11, so CI stays within its time).

Interpreters come from the machine (PATH, or pyenv's versions); nox never downloads one."""

from __future__ import annotations

import os
from pathlib import Path

import nox

PYTHONS = ["3.12", "3.13"]
nox.options.sessions = ["tests"]
nox.options.reuse_existing_virtualenvs = True
nox.options.download_python = "never"
nox.options.error_on_missing_interpreters = True


def put_pyenv_versions_on_path(versions: list[str]) -> None:
    """pyenv's shims only answer for the versions selected with `pyenv global`: put the newest
    installed 3.X of each version first on PATH, so nox finds `python3.X` there."""
    root = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    for version in versions:
        installed = sorted(
            root.glob(f"{version}.*/bin/python{version}"),
            key=lambda p: [int(n) for n in p.parent.parent.name.split(".") if n.isdigit()],
        )
        if installed:
            os.environ["PATH"] = f"{installed[-1].parent}{os.pathsep}{os.environ['PATH']}"


put_pyenv_versions_on_path(PYTHONS)


@nox.session(python=PYTHONS)
def tests(session: nox.Session) -> None:
    session.install("-e", ".[dev]")
    session.run(
        "pytest",
        "-m",
        "not browser",
        "-p",
        "no:cacheprovider",
        *session.posargs,
        env={
            "DATABASE_URL": os.environ.get(
                "TEST_DATABASE_URL", "postgres://postgres@127.0.0.1:5432/profile_sync_audit"
            ),
            "REDIS_URL": os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/9"),
            "PROFILE_AUDIT_TEST_DB": "postgres",
        },
    )
