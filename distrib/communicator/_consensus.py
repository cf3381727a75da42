"""Decisions every rank takes together, through the Coordinator.

A rank that fails alone, while its peers go on into a collective, leaves them
waiting. Each step here instead all-gathers every rank's outcome, so every
rank sees the same facts and raises (or goes on) together: starting a
communicator (availability, the master's token, initialisation) and, in debug
mode, each data call (the same collective, shape, dtype and op everywhere).
Messages are JSON: nothing is unpickled from a peer.
"""
from __future__ import annotations

import json
from typing import Callable, Optional

from .._text import format_ranks
from ..errors import CommunicatorError
from ._types import Collective


def agree_on_token(comm) -> bytes:
    """Every rank's go/no-go plus the master's new token; returns the token on every rank.

    The token travels in an all-gather rather than a bare broadcast so that
    a rank that cannot start is reported on every rank, instead of leaving
    the others to wait for it inside the vendor's initialisation.
    """
    reason = local_unavailable_reason(type(comm), comm.coordinator, comm.device)
    token = b""
    if reason is None and comm.coordinator.is_master():
        try:
            token = comm._make_token()
        except Exception as exc:  # noqa: BLE001 — reported to every rank below
            reason = f"could not make the token: {type(exc).__name__}: {exc}"
        if reason is None and not isinstance(token, (bytes, bytearray)):
            reason = f"_make_token returned {type(token).__name__}, expected bytes"
    replies = _gather(comm, {"reason": reason, "token": bytes(token).hex()})
    _raise_for_reasons(comm, [r["reason"] for r in replies], "cannot start")
    return bytes.fromhex(replies[0]["token"])


def agree(comm, reason: Optional[str], what: str, cleanup: Optional[Callable[[], None]] = None) -> None:
    """Raise on every rank if any rank has a ``reason``; ``cleanup`` undoes this rank's part first."""
    reasons = [r["reason"] for r in _gather(comm, {"reason": reason})]
    if any(r is not None for r in reasons):
        if reason is None and cleanup is not None:
            try:
                cleanup()
            except Exception:  # noqa: BLE001 — the peers' failure is the error to report
                pass
        _raise_for_reasons(comm, reasons, f"could not {what}")


def local_unavailable_reason(cls, coordinator, device) -> Optional[str]:
    """``cls.unavailable_reason``, with a crash in the check itself turned into a reason."""
    try:
        return cls.unavailable_reason(coordinator, device)
    except Exception as exc:  # noqa: BLE001 — a broken check must not take the launch down
        return f"its availability check raised {type(exc).__name__}: {exc}"


def check_peers(comm, collective: Collective, signature: Optional[tuple] = None,
                error: Optional[str] = None) -> None:
    """Debug mode: compare this call across ranks before anything is enqueued.

    Raises :class:`CommunicatorError` on every rank when the ranks called
    different collectives or passed different shapes, dtypes, ops or roots,
    or when some rank rejected its input (that rank re-raises its own error).
    """
    replies = _gather(comm, {"signature": list(signature) if signature else None, "error": error})
    failed = {rank: reply["error"] for rank, reply in enumerate(replies) if reply["error"]}
    if failed:
        if error is not None:
            return  # the caller raises its own error
        rank, message = next(iter(failed.items()))
        others = f" (and ranks {format_ranks(list(failed)[1:])})" if len(failed) > 1 else ""
        raise CommunicatorError(
            f"{collective} was not run: rank {rank}{others} rejected its input: {message}")
    signatures = [tuple(_freeze(reply["signature"])) for reply in replies]
    if any(s != signatures[0] for s in signatures):
        groups: dict = {}
        for rank, sig in enumerate(signatures):
            groups.setdefault(sig, []).append(rank)
        described = "; ".join(f"rank{'s' if len(r) > 1 else ''} {format_ranks(r)}: {_describe(s)}"
                              for s, r in groups.items())
        raise CommunicatorError(
            f"{collective} calls differ across ranks (caught by debug mode before running): {described}. "
            "Every rank must call the same collective with the same shape, dtype and op.")


def _describe(signature: tuple) -> str:
    collective, op, dtype, shape, root, via = signature
    what = {"all_reduce": f"all_reduce {op}", "reduce_scatter": f"reduce_scatter {op}",
            "broadcast": f"broadcast from rank {root}"}.get(collective, collective)
    return f"{what} of {dtype}{list(shape)} via {via}"


def _freeze(value):
    return tuple(_freeze(v) for v in value) if isinstance(value, list) else value


def _gather(comm, message: dict) -> list[dict]:
    replies = comm.coordinator.all_gather(json.dumps(message).encode())
    return [_parse(comm, rank, reply, set(message)) for rank, reply in enumerate(replies)]


def _parse(comm, rank: int, reply: bytes, keys: set) -> dict:
    """A peer's message, or an error when the peer is at another step of the protocol."""
    try:
        parsed = json.loads(reply)
    except ValueError:
        parsed = None
    if not isinstance(parsed, dict) or not keys <= set(parsed):
        raise CommunicatorError(
            f"{comm.name}: rank {rank} sent {bytes(reply[:40])!r} where this step expected its "
            f"{sorted(keys)}; the ranks are out of step (a start-up or a call failed on some ranks "
            "between two collective steps). Stop the launch.")
    return parsed


def _raise_for_reasons(comm, reasons: list[Optional[str]], what: str) -> None:
    groups: dict = {}
    for rank, reason in enumerate(reasons):
        if reason is not None:
            groups.setdefault(reason, []).append(rank)
    if groups:
        described = "; ".join(f"rank{'s' if len(r) > 1 else ''} {format_ranks(r)}: {reason}"
                              for reason, r in groups.items())
        raise CommunicatorError(f"{comm.name} {what}: {described}")
