"""A TCP service that embeds a workflow: observations in, results streamed back.

    python examples/service.py --port 8765
    # then, from another terminal, send observations (one JSON object per line) and print the replies
    # with docs/live.md's client (Python, one line), or with netcat-openbsd's `nc -N 127.0.0.1 8765`

Standard library only. Each client sends JSON Lines observations
``{"sensor": str, "value": number}`` and receives JSON Lines back, on the
same connection:

* ``{"sensor", "value", "calibrated"}`` for every valid observation;
* ``{"sensor", "mean", "count"}`` for every window of ``--window``
  observations of one sensor from that client (a keyed count window);
* ``{"error": ..., "line": ...}`` for an invalid observation, or a line that is
  not valid JSON.

One workflow runs for the whole service, inside the server's event loop. A
client's observations are fed with ``await run.send(...)``, which waits while
the workflow is full: the connection is then not read, so TCP flow control
slows that client down. Results come out of ``async for record in run`` and
go back to the client that sent the observation.

A client may close its sending side when done (``shutdown(SHUT_WR)``,
``nc -N``): the server still replies to everything it sent,
every window mean included, then closes the connection. On SIGINT/SIGTERM
the server stops accepting, drains the workflow (every accepted observation
gets its result), and exits; a client still sending then is no longer read,
and gets the replies to what was accepted, then the end of the stream.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import statistics
from typing import Any

import aiod4p
from aiod4p import GenericPE, WorkflowGraph
from aiod4p.windows import CountWindow

LINGER = 5.0  # seconds a connection closed with input unread waits for its client to read the last replies


class Validate(GenericPE):
    """Checks an observation: valid ones go to ``output``, the others to ``errors``."""

    def __init__(self) -> None:
        super().__init__(inputs=["input"], outputs=["output", "errors"])

    def process(self, inputs: dict[str, Any]) -> dict[str, Any]:
        obs = inputs["input"]
        data = obs.get("data")
        if "not_json" in obs:
            return {"errors": {"client": obs["client"], "error": f"not valid JSON ({obs['not_json']})", "line": data}}
        if not isinstance(data, dict) or not isinstance(data.get("sensor"), str):
            return {
                "errors": {"client": obs["client"], "error": "an observation needs a 'sensor' string", "line": data}
            }
        value = data.get("value")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return {"errors": {"client": obs["client"], "error": "'value' must be a number", "line": data}}
        return {"output": {"client": obs["client"], "sensor": data["sensor"], "value": value}}


class Calibrate(GenericPE):
    """Applies the sensor calibration (a gain and an offset).

    Writes each calibrated observation to ``output`` (on to the window) and
    to ``reply`` (not connected: a result, sent back to the client).
    """

    def __init__(self, gain: float = 1.0, offset: float = 0.0) -> None:
        super().__init__(inputs=["input"], outputs=["output", "reply"])
        self.gain, self.offset = gain, offset

    def process(self, inputs: dict[str, Any]) -> dict[str, Any]:
        obs = inputs["input"]
        calibrated = {**obs, "calibrated": round(obs["value"] * self.gain + self.offset, 6)}
        return {"output": calibrated, "reply": calibrated}


def client_and_sensor(obs: dict[str, Any]) -> tuple[int, str]:
    """The window key: one window series per client and sensor."""
    return obs["client"], obs["sensor"]


def mean_of(observations: list[dict[str, Any]]) -> float:
    return statistics.fmean(obs["calibrated"] for obs in observations)


def service_graph(window: int = 5, gain: float = 1.0, offset: float = 0.0) -> WorkflowGraph:
    """validate -> calibrate -> (results, keyed count window -> results)."""
    graph = WorkflowGraph()
    validate = Validate()
    validate.id = "validate"
    calibrate = Calibrate(gain, offset)
    means = CountWindow(window, key=client_and_sensor, aggregate=mean_of, partial=False, name="means")
    graph.connect(validate, "output", calibrate, "input")
    graph.connect(calibrate, "output", means, "input")
    return graph


class _Client:
    """One connection: what it sent, what came back, and when it is answered in full."""

    def __init__(self, writer: asyncio.StreamWriter, window: int) -> None:
        self.writer = writer
        self.window = window
        self.sent = 0  # observations fed to the workflow
        self.answered = 0  # of those, replied to (calibrated or error)
        self.valid: dict[str, int] = {}  # calibrated observations per sensor
        self.means = 0  # window means sent back
        self.input_ended = False
        self.settled = asyncio.Event()  # its input ended and every reply it is due has been sent

    def check(self) -> None:
        due_means = sum(count // self.window for count in self.valid.values())
        if self.input_ended and self.answered == self.sent and self.means == due_means:
            self.settled.set()


class ObservationService:
    """The service: a TCP server and the workflow it feeds.

    Args:
        window: observations per mean (per client and sensor).
        gain, offset: the calibration.
    """

    def __init__(self, window: int = 5, gain: float = 1.0, offset: float = 0.0) -> None:
        self.feed = aiod4p.LiveFeed(maxsize=256)
        self.run = aiod4p.start(service_graph(window, gain, offset), {"validate": self.feed})
        self.window = window
        self.clients: dict[int, _Client] = {}
        self._next_client = 0
        self._server: asyncio.Server | None = None
        self._dispatcher: asyncio.Task[None] | None = None
        self._handlers: set[asyncio.Task[Any]] = set()  # one per connection

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> tuple[str, int]:
        """Start the workflow and listen; returns the bound address."""
        self.run.start()
        self._dispatcher = asyncio.create_task(self._dispatch())
        self._server = await asyncio.start_server(self._serve, host, port)
        address: tuple[str, int] = self._server.sockets[0].getsockname()[:2]
        return address

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        client_id = self._next_client
        self._next_client += 1
        client = self.clients[client_id] = _Client(writer, self.window)
        handler = asyncio.current_task()
        assert handler is not None  # asyncio.start_server runs each connection's handler as a task
        self._handlers.add(handler)
        try:
            async for line in reader:
                if not line.strip():
                    continue
                try:
                    obs = {"client": client_id, "data": json.loads(line)}
                except ValueError as exc:  # Validate answers it, in its turn
                    obs = {"client": client_id, "data": line.decode("utf-8", "replace").strip(), "not_json": str(exc)}
                client.sent += 1
                try:
                    await self.run.send("validate", obs)  # waits while the workflow is full
                except aiod4p.Aiod4pError:  # the service is shutting down (the feed is closed), or the run failed
                    client.sent -= 1  # not taken: this line, and the rest, go unanswered
                    break
                await writer.drain()  # a client that does not read its results is not read either
            client.input_ended = True  # the client closed its sending side, or is no longer read: answer it, close
            client.check()
            await client.settled.wait()
            await writer.drain()
            await _linger(reader, writer)
        except ConnectionError:
            pass  # the client went away
        finally:
            writer.close()
            try:
                with contextlib.suppress(ConnectionError):
                    await writer.wait_closed()  # once the client took the last replies (aclose() cuts that short)
            finally:
                del self.clients[client_id]
                self._handlers.discard(handler)

    async def _dispatch(self) -> None:
        try:
            async for record in self.run:
                data = dict(record.data)
                if record.port == "output":  # the window's (the other results are on "reply" and "errors")
                    client_id, sensor = data["key"]
                    reply: dict[str, Any] = {"sensor": sensor, "mean": data["value"], "count": data["count"]}
                else:
                    client_id = data.pop("client")
                    reply = data
                client = self.clients.get(client_id)
                if client is None:
                    continue
                if record.port == "output":
                    client.means += 1
                else:
                    client.answered += 1
                    if record.port == "reply":
                        client.valid[reply["sensor"]] = client.valid.get(reply["sensor"], 0) + 1
                if not client.writer.is_closing():
                    client.writer.write(json.dumps(reply).encode() + b"\n")
                client.check()
        finally:
            for client in self.clients.values():  # the run is over: nothing more will come
                client.settled.set()

    async def aclose(self) -> None:
        """Stop accepting, let every accepted observation through, then close the connections."""
        if self._server is not None:
            self._server.close()
        self.run.drain()
        if self._dispatcher is not None:
            await self._dispatcher
        for client in list(self.clients.values()):
            if not client.input_ended:
                client.writer.close()  # a client sending nothing: every reply it is due was written
        if self._handlers:  # the others are answered in full: let them read their replies, LINGER s at most
            await asyncio.wait(self._handlers, timeout=LINGER)
        for client in list(self.clients.values()):
            client.writer.transport.abort()  # a client that does not read its replies: cut it off
        if self._handlers:
            await asyncio.wait(self._handlers)
        if self._server is not None:
            await self._server.wait_closed()
        await self.run.aclose()


async def _linger(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """End a connection whose client may still be sending: close the sending side, then read (and drop) what the
    client sends until it closes, ``LINGER`` seconds at most. A socket closed with unread input is reset, and its
    client loses the replies it had not read yet."""
    if reader.at_eof():
        return
    writer.write_eof()
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(LINGER):
            while await reader.read(1 << 16):
                pass


async def serve(host: str, port: int, window: int) -> None:
    service = ObservationService(window)
    address = await service.start(host, port)
    print(f"listening on {address[0]}:{address[1]}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    await service.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--window", type=int, default=5, help="observations per mean")
    args = parser.parse_args()
    asyncio.run(serve(args.host, args.port, args.window))


if __name__ == "__main__":
    main()
