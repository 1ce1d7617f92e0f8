"""The Ray comm passes the transport conformance suite inside a real Ray actor.

A comm end lives in an actor, so the checks run in one (as the MPI comm's run
under mpiexec): both ends of every pair live in the checking actor, and every
message still travels as a Ray actor call (the actor calls itself through its
own handle). The session's two-node cluster hosts it.
"""

from __future__ import annotations

import asyncio
import itertools
import sys
from collections.abc import Iterator
from typing import Any

import conformance
import pytest
import ray
from conformance import CHECKS, Check, TransportUnderTest
from ray import cloudpickle
from ray_cluster import RayCluster

from aiod4p.errors import ChannelClosed, EndOfChannel, PeerDied, UnpicklableMessage
from aiod4p.transports import Comm, get_transport
from aiod4p.transports.ray import RayComm, RayCommHost, ray_comm_pair

CAPACITY, WINDOW, BATCH = 8, 4, 4

# The cluster's workers have aiod4p installed, not the tests: these modules travel by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])
cloudpickle.register_pickle_by_value(conformance)


class CheckingActor(RayCommHost):
    """Runs conformance checks on comm pairs that live in this actor."""

    def __init__(self) -> None:
        self.pairs = itertools.count()
        self.deliveries = 0

    async def aiod4p_deliver(self, key: str, seq: int, data: list[bytes]) -> str | None:
        self.deliveries += 1
        return await super().aiod4p_deliver(key, seq, data)

    async def batched(self, messages: int) -> tuple[list[int], int]:
        """Send ``messages`` messages through a comm of one delivery in flight; what arrived, and in how
        many deliveries."""
        a, b = ray_comm_pair(self, ray.get_runtime_context().current_actor, "batched", window=1, batch=16)
        before = self.deliveries
        try:
            sender = asyncio.create_task(_send_all(a, range(messages)))
            received = [await b.receive() for _ in range(messages)]
            await sender
            return received, self.deliveries - before
        finally:
            await a.aclose()
            await b.aclose()

    async def run_check(self, name: str) -> None:
        handle = ray.get_runtime_context().current_actor

        async def make_pair() -> tuple[Comm, Comm]:
            return ray_comm_pair(
                self, handle, f"pair {next(self.pairs)}", capacity=CAPACITY, window=WINDOW, batch=BATCH
            )

        check = next(check for check in CHECKS if check.__name__ == name)
        transport = TransportUnderTest("ray", make_pair, max_buffered=CAPACITY + (WINDOW + 1) * BATCH)
        async with asyncio.timeout(50):  # 4,000 actor calls for the order check, on a busy machine
            await check(transport)

    async def unpicklable_message(self) -> str:
        """Sending what Ray cannot serialize fails alone, naming the message; the comm still works."""
        a, b = ray_comm_pair(self, ray.get_runtime_context().current_actor, "unpicklable")
        try:
            try:
                await a.send(("item", _Unpicklable()))
            except UnpicklableMessage as exc:
                error = str(exc)
            else:
                raise AssertionError("an unpicklable message was sent")
            await a.send("still fine")
            assert await b.receive() == "still fine"
            return error
        finally:
            await a.aclose()
            await b.aclose()

    async def connect(self, peer: Any) -> Any:
        """Join a comm to one whose end lives in ``peer``; returns the first message the peer sent."""
        me = ray.get_runtime_context().current_actor
        self.from_peer = RayComm(self, "from peer", peer, "to watcher")
        await peer.open_end.remote(me)
        return await self.from_peer.receive()

    async def receive_until_failure(self) -> str:
        """Receive on the comm :meth:`connect` made until it fails; the error's class name."""
        try:
            while True:
                await self.from_peer.receive()
        except (PeerDied, EndOfChannel, ChannelClosed) as exc:
            return type(exc).__name__
        finally:
            self.from_peer.abort()


async def _send_all(comm: Comm, messages: range) -> None:
    for message in messages:
        await comm.send(message)


class PeerActor(RayCommHost):
    """Holds one end of a comm with a :class:`CheckingActor`, then is killed."""

    async def open_end(self, watcher: Any) -> None:
        self.comm = RayComm(self, "to watcher", watcher, "from peer")
        await self.comm.send("hello")


class _Unpicklable:
    def __reduce__(self) -> Any:
        raise TypeError("not today")


@pytest.fixture(scope="module")
def checker(ray_cluster: RayCluster) -> Iterator[Any]:
    ray.init(address=ray_cluster.address)
    try:
        yield ray.remote(num_cpus=0)(CheckingActor).remote()
    finally:
        ray.shutdown()


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__.removeprefix("check_"))
def test_conformance(checker: Any, check: Check) -> None:
    ray.get(checker.run_check.remote(check.__name__), timeout=55)


def test_an_unpicklable_message_fails_alone(checker: Any) -> None:
    error = ray.get(checker.unpicklable_message.remote(), timeout=30)
    assert "cannot be pickled" in error and "not today" in error


def test_messages_sent_while_the_window_is_full_share_a_delivery(checker: Any) -> None:
    received, deliveries = ray.get(checker.batched.remote(64), timeout=30)
    assert received == list(range(64))
    assert deliveries <= 1 + 64 // 16  # the first alone, then batches of 16 while one is in flight


def test_a_killed_peer_actor_is_a_dead_peer(checker: Any) -> None:
    peer = ray.remote(num_cpus=0)(PeerActor).remote()
    assert ray.get(checker.connect.remote(peer), timeout=30) == "hello"
    ray.kill(peer)
    assert ray.get(checker.receive_until_failure.remote(), timeout=30) == "PeerDied"


def test_limits_must_be_positive(checker: Any) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        RayComm(CheckingActor(), "key", checker, "other", capacity=0)


def test_the_ray_transport_is_registered() -> None:
    assert get_transport("ray") is RayComm
