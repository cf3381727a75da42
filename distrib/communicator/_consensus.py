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

from .._text import rank_list
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
                error: Optional[str] = None, peer: int = 0) -> None:
    """Debug mode: compare this call across ranks before anything is enqueued.

    Raises :class:`CommunicatorError` on every rank when the ranks called
    different collectives or passed different shapes, dtypes, ops or roots,
    or when some rank rejected its input (that rank re-raises its own error).
    A send or recv is compared with its peer's call alone, through the
    Coordinator's point-to-point messages (both raise on a mismatch).
    """
    message = {"signature": list(signature) if signature else None, "error": error}
    if collective.is_point_to_point:
        if error is not None and not _is_rank(peer, comm):
            return  # no peer to tell: the caller raises its own error
        replies = _exchange(comm, message, peer, first=collective is Collective.SEND)
        ranks = [comm.rank, peer]
    else:
        replies = _gather(comm, message)
        ranks = list(range(comm.world_size))
    failed = {rank: reply["error"] for rank, reply in zip(ranks, replies) if reply["error"]}
    named = comm.coordinator.global_ranks if hasattr(comm.coordinator, "global_ranks") else list
    if failed:
        if error is not None:
            return  # the caller raises its own error
        (rank, text), *others = failed.items()
        also = f" (and {rank_list(named(r for r, _ in others))})" if others else ""
        raise CommunicatorError(
            f"{collective} was not run: rank {named([rank])[0]}{also} rejected its input: {text}")
    signatures = [_freeze(reply["signature"]) for reply in replies]
    if collective.is_point_to_point:
        mine, theirs = signatures
        if not _pair_matches(mine, theirs):
            raise CommunicatorError(
                f"{collective} does not match its peer's call (caught by debug mode before running): "
                f"rank {named([comm.rank])[0]}: {_describe(mine, named)}; rank {named([peer])[0]}: "
                f"{_describe(theirs, named)}. A send and its recv need the same shape and dtype.")
        return
    if any(s != signatures[0] for s in signatures):
        groups: dict = {}
        for rank, sig in enumerate(signatures):
            groups.setdefault(sig, []).append(rank)
        described = "; ".join(f"{rank_list(named(r))}: {_describe(s, named)}" for s, r in groups.items())
        raise CommunicatorError(
            f"{collective} calls differ across ranks (caught by debug mode before running): {described}. "
            "Every rank must call the same collective with the same shape, dtype and op.")


def _pair_matches(mine: tuple, theirs: tuple) -> bool:
    """A send and a recv pair up: each names the other, with the same dtype, shape and backend."""
    kinds = {mine[0], theirs[0]}
    return kinds == {"send", "recv"} and mine[2:4] == theirs[2:4] and mine[5] == theirs[5]


def _is_rank(peer, comm) -> bool:
    return isinstance(peer, int) and not isinstance(peer, bool) and 0 <= peer < comm.world_size \
        and peer != comm.rank


def _describe(signature: tuple, named=list) -> str:
    collective, op, dtype, shape, root, via = signature
    what = {"all_reduce": f"all_reduce {op}", "reduce_scatter": f"reduce_scatter {op}",
            "broadcast": f"broadcast from rank {named([root])[0]}",
            "send": f"send to rank {named([root])[0]}",
            "recv": f"recv from rank {named([root])[0]}"}.get(collective, collective)
    return f"{what} of {dtype}{list(shape)} via {via}"


def _freeze(value):
    return tuple(_freeze(v) for v in value) if isinstance(value, list) else value


def _gather(comm, message: dict) -> list[dict]:
    replies = comm.coordinator.all_gather(json.dumps(message).encode())
    return [_parse(comm, rank, reply, set(message)) for rank, reply in enumerate(replies)]


def _exchange(comm, message: dict, peer: int, first: bool) -> list[dict]:
    """This rank's and ``peer``'s messages; the sending side speaks first."""
    coordinator, data = comm.coordinator, json.dumps(message).encode()
    if first:
        coordinator.send(data, peer)
        reply = coordinator.recv(peer)
    else:
        reply = coordinator.recv(peer)
        coordinator.send(data, peer)
    return [message, _parse(comm, peer, reply, set(message))]


def _parse(comm, rank: int, reply: bytes, keys: set) -> dict:
    """A peer's message, or an error when the peer is at another step of the protocol."""
    try:
        parsed = json.loads(reply)
    except ValueError:
        parsed = None
    if not isinstance(parsed, dict) or not keys <= set(parsed):
        raise CommunicatorError(
            f"{comm.name}: rank {_global(comm, rank)} sent {bytes(reply[:40])!r} where this step expected its "
            f"{sorted(keys)}; the ranks are out of step (a start-up or a call failed on some ranks "
            "between two collective steps). Stop the launch.")
    return parsed


def _raise_for_reasons(comm, reasons: list[Optional[str]], what: str) -> None:
    groups: dict = {}
    for rank, reason in enumerate(reasons):
        if reason is not None:
            groups.setdefault(reason, []).append(_global(comm, rank))
    if groups:
        described = "; ".join(f"{rank_list(r)}: {reason}" for reason, r in groups.items())
        raise CommunicatorError(f"{comm.name} {what}{comm._on_group}: {described}")


def _global(comm, rank: int) -> int:
    """The global rank of ``comm``'s rank ``rank`` (coordinators without groups: the same)."""
    ranks = getattr(comm.coordinator, "ranks", None)
    return ranks[rank] if ranks is not None else rank

