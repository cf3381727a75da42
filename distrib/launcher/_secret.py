"""Where a launch's secret comes from, so that it never crosses the network.

The secret authenticates the control plane (CURVE keys are derived from it)
and signs what the launchers write to the rendezvous store. On one node the
launcher makes a fresh one and hands it to its workers through their
environment. On several, every node derives the same one on its own:

- from ``DISTRIB_SECRET``, when the user or the job system sets it (a
  Kubernetes Secret, ``srun --export``, the SLURM launcher);
- otherwise from a per-user key file, ``~/.config/distrib/key`` (or
  ``$XDG_CONFIG_HOME/distrib/key``, or ``DISTRIB_KEY_FILE``), created with
  mode 0600 on first use; home folders are shared on most clusters.

Either way the launch's secret is an HMAC of that value and the launch id, so
every launch (and every restart, which has an id of its own) gets its own.
Nodes prove they share it at the rendezvous (signed records; see
:mod:`._rendezvous`), never by sending it.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import stat
from pathlib import Path
from typing import Mapping, Optional

from ..errors import ConfigError

__all__ = ["SECRET_VAR", "KEY_FILE_VAR", "launch_secret", "key_file_path", "derive"]

SECRET_VAR = "DISTRIB_SECRET"
KEY_FILE_VAR = "DISTRIB_KEY_FILE"


def derive(base: str, launch_id: str) -> str:
    """The secret of launch ``launch_id`` from the shared ``base`` value (hex, 128 bits)."""
    return hmac.new(base.encode(), b"distrib launch secret\0" + launch_id.encode(), hashlib.sha256).hexdigest()[:32]


def launch_secret(launch_id: str, environ: Optional[Mapping[str, str]] = None) -> tuple[str, str]:
    """``(secret, where its base came from)`` for a launch on several nodes (see the module docstring)."""
    env = os.environ if environ is None else environ
    if env.get(SECRET_VAR):
        return derive(env[SECRET_VAR], launch_id), SECRET_VAR
    path = key_file_path(env)
    return derive(_read_or_create(path), launch_id), f"the key file {path}"


def key_file_path(environ: Optional[Mapping[str, str]] = None) -> Path:
    env = os.environ if environ is None else environ
    if env.get(KEY_FILE_VAR):
        return Path(env[KEY_FILE_VAR])
    config = Path(env["XDG_CONFIG_HOME"]) if env.get("XDG_CONFIG_HOME") else Path.home() / ".config"
    return config / "distrib" / "key"


def _read_or_create(path: Path) -> str:
    """The key in ``path``, made first (mode 0600, atomically) if there is none."""
    try:
        return _read(path)
    except FileNotFoundError:
        pass
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32) + "\n")
        try:
            os.link(tmp, path)  # fails if another launcher made it first: theirs is the key
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)
    except OSError as exc:
        raise ConfigError(f"could not create the key file {path} ({exc}); set {SECRET_VAR} to the same "
                          f"random value on every node (e.g. `export {SECRET_VAR}=$(openssl rand -hex 32)`), "
                          f"or {KEY_FILE_VAR} to a file every node can read") from None
    return _read(path)


def _read(path: Path) -> str:
    info = path.stat()
    if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(f"the key file {path} can be read by others (mode {stat.filemode(info.st_mode)}); "
                          f"run `chmod 600 {path}`")
    key = path.read_text().strip()
    if len(key) < 32:
        raise ConfigError(f"the key file {path} holds no key (expected at least 32 characters); delete it, "
                          "and distrib makes a new one")
    return key
