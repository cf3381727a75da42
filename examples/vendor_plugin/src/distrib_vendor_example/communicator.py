"""A CPU Communicator whose "vendor library" exchanges bytes through the Coordinator.

It is deliberately simple (every rank receives every rank's whole tensor), but
it follows the whole contract: the master makes a token, every rank joins the
session it names, each message carries the token, results are reduced in rank
order so every rank gets bitwise the same answer, and ``close`` releases the
session.
"""
from __future__ import annotations

import secrets
from typing import Optional

import torch

from distrib.communicator import Communicator, DeviceType, DType, ReduceOp, TensorView
from distrib.errors import CommunicatorError


class _Session:
    """Stands in for a vendor library's communicator handle."""

    def __init__(self, token: bytes, rank: int, world_size: int, coordinator):
        self.token, self.rank, self.world_size = token, rank, world_size
        self._coordinator = coordinator

    def exchange(self, payload: bytes) -> list[bytes]:
        """Every rank's ``payload``, by rank; refuses messages of another session."""
        replies = self._coordinator.all_gather(self.token + payload)
        for rank, reply in enumerate(replies):
            if not reply.startswith(self.token):
                raise CommunicatorError(f"rank {rank} answered from another session")
        return [reply[len(self.token):] for reply in replies]


class ByteExchangeCommunicator(Communicator):
    """All collectives on CPU tensors, through the Coordinator's all_gather of bytes;
    send and recv through its point-to-point messages."""

    name = "vendor_example"
    # Below gloo (0): installed, it never takes CPU tensors from gloo in a default
    # chain. A real vendor ranks itself above the built-ins for the tensors it takes.
    priority = -10
    device_type = DeviceType.CPU
    dtypes = frozenset(DType)
    ops = frozenset(ReduceOp)

    @classmethod
    def unavailable_reason(cls, coordinator, device) -> Optional[str]:
        return None  # only needs torch and a coordinator

    def _make_token(self) -> bytes:
        return secrets.token_bytes(16)

    def _initialize(self, token: bytes) -> None:
        self._session = _Session(token, self.rank, self.world_size, self.coordinator)

    def _gather(self, view: TensorView) -> torch.Tensor:
        """Every rank's tensor, stacked by rank: shape (world_size, numel)."""
        mine = view.tensor.reshape(-1).view(torch.uint8).numpy().tobytes()
        rows = [torch.frombuffer(bytearray(b), dtype=view.tensor.dtype) for b in self._session.exchange(mine)]
        return torch.stack(rows)

    def _reduce(self, stacked: torch.Tensor, op: ReduceOp) -> torch.Tensor:
        if op is ReduceOp.SUM or op is ReduceOp.AVG:
            result = stacked.sum(0, dtype=stacked.dtype)
            return result / self.world_size if op is ReduceOp.AVG else result
        if op is ReduceOp.PROD:
            return stacked.prod(0, dtype=stacked.dtype)
        return stacked.amax(0) if op is ReduceOp.MAX else stacked.amin(0)

    def _all_reduce(self, src: TensorView, dst: TensorView, op: ReduceOp) -> None:
        dst.tensor.view(-1).copy_(self._reduce(self._gather(src), op))

    def _all_gather(self, src: TensorView, dst: TensorView) -> None:
        dst.tensor.view(-1).copy_(self._gather(src).reshape(-1))

    def _reduce_scatter(self, src: TensorView, dst: TensorView, op: ReduceOp) -> None:
        whole = self._reduce(self._gather(src), op)
        dst.tensor.view(-1).copy_(whole.view(self.world_size, -1)[self.rank])

    def _broadcast(self, view: TensorView, src: int) -> None:
        mine = view.tensor.reshape(-1).view(torch.uint8).numpy().tobytes()
        data = self.coordinator.broadcast(self._session.token + mine, src=src)
        if not data.startswith(self._session.token):
            raise CommunicatorError(f"rank {src} broadcast from another session")
        received = torch.frombuffer(bytearray(data[len(self._session.token):]), dtype=view.tensor.dtype)
        view.tensor.view(-1).copy_(received)

    def _send(self, view: TensorView, dst: int) -> None:
        mine = view.tensor.reshape(-1).view(torch.uint8).numpy().tobytes()
        self.coordinator.send(self._session.token + mine, dst)

    def _recv(self, view: TensorView, src: int) -> None:
        data = self.coordinator.recv(src)
        if not data.startswith(self._session.token):
            raise CommunicatorError(f"rank {src} sent from another session")
        received = torch.frombuffer(bytearray(data[len(self._session.token):]), dtype=view.tensor.dtype)
        view.tensor.view(-1).copy_(received)

    def _close(self) -> None:
        self._session = None
