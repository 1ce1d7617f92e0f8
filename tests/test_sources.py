"""Live sources against real files, pipes and sockets on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import itertools
import json
import math
import os
import pickle
import re
import socket
import struct
import sys
import termios
import threading
import tracemalloc
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path
from typing import Any

import pytest
import workflows as wf

import aiod4p
from aiod4p import IterativePE, PEError, ProducerPE, WorkflowGraph, sources
from aiod4p.sources import (
    AsyncIterSource,
    DatagramStream,
    LinesSource,
    LineStream,
    SocketStream,
    TCPSource,
    TimerSource,
    TimerStream,
    UDPSource,
    _endpoint,
    iterate,
)


class Echo(IterativePE):
    def process_item(self, item: Any) -> Any:
        return item


class Gate(IterativePE):
    """Passes items once its gate is open (the test opens it)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = wf.Shared(event=asyncio.Event())

    async def process_item(self, item: Any) -> Any:
        await self.gate.event.wait()
        return item


def source_graph(source: Any) -> WorkflowGraph:
    graph = WorkflowGraph()
    graph.connect(source, "output", Echo(), "input")
    return graph


def fed_graph() -> tuple[WorkflowGraph, Echo]:
    graph = WorkflowGraph()
    echo = Echo(name="echo")
    graph.add(echo)
    return graph, echo


async def collect(run: aiod4p.WorkflowRun, count: int | None = None) -> list[Any]:
    """Results of ``run``; with ``count``, drain the run after that many."""
    seen: list[Any] = []
    async with asyncio.timeout(20), run:
        async for record in run:
            seen.append(record.data)
            if count is not None and len(seen) == count:
                run.drain()
    return seen


# -- files and pipes ------------------------------------------------------------------


@pytest.mark.asyncio
async def test_lines_from_a_file(tmp_path: Path) -> None:
    path = tmp_path / "obs.txt"
    path.write_text("a\nb\n\nc")  # an empty line, and a last line without newline
    assert await collect(aiod4p.start(source_graph(LinesSource(path)))) == ["a", "b", "", "c"]


@pytest.mark.asyncio
async def test_json_lines_from_a_file_skip_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "obs.jsonl"
    path.write_text('{"x": 1}\n\n{"x": 2}\n')
    assert await collect(aiod4p.start(source_graph(LinesSource(path, json=True)))) == [{"x": 1}, {"x": 2}]


@pytest.mark.asyncio
async def test_invalid_json_names_the_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"x": 1}\nnot json\n')
    with pytest.raises(PEError, match=r"bad\.jsonl, line 2: not valid JSON"):
        await collect(aiod4p.start(source_graph(LinesSource(path, json=True))))


@pytest.mark.asyncio
async def test_a_missing_file_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(PEError, match=r"cannot open file .*missing\.txt"):
        await collect(aiod4p.start(source_graph(LinesSource(tmp_path / "missing.txt"))))


@pytest.mark.asyncio
async def test_follow_a_file_being_appended_to(tmp_path: Path) -> None:
    path = tmp_path / "growing.jsonl"
    path.write_text('{"n": 0}\n{"n": 1}\n')
    run = aiod4p.start(source_graph(LinesSource(path, json=True, follow=True, poll_interval=0.01)))
    seen = []
    async with asyncio.timeout(20), run:
        async for record in run:
            seen.append(record.data["n"])
            if len(seen) == 2:
                with path.open("a") as out:  # appended while the run follows the file
                    out.write('{"n": 2}\n{"n": ')
                    out.flush()
                    out.write("3}\n")
            if len(seen) == 4:
                with path.open("a") as out:  # written before the drain: still read
                    out.write('{"n": 4}\n')
                run.drain()
    assert seen == [0, 1, 2, 3, 4]


async def test_a_followed_file_drained_while_its_writer_is_in_the_middle_of_a_line_discards_that_part(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """SIGINT to a live ingest of a file a logger appends to: the drain read the file to its end, and the line the
    logger was writing then (``{"n": ``, its rest not written yet) was a line of its own: with ``json=True`` a bad
    line that failed the drained run (exit 1), else half a record among the results. It is discarded, with a
    warning, as the part of a line a TCP connection held at a drain."""
    path = tmp_path / "growing.jsonl"
    path.write_text('{"n": 0}\n{"n": 1}\n{"n": ')
    for as_json in (True, False):
        stream = LineStream(path, json=as_json, follow=True, poll_interval=0.01)
        async with asyncio.timeout(20), contextlib.aclosing(aiter(stream)) as lines:
            seen = [await anext(lines), await anext(lines)]
            stream.drain()
            seen += [line async for line in lines]
        assert seen == ([{"n": 0}, {"n": 1}] if as_json else ['{"n": 0}', '{"n": 1}'])
    assert f"file {path}: the drain came in the middle of a line, 6 bytes without a newline yet" in caplog.text


async def test_a_file_drained_in_the_middle_of_a_line_it_reads_gives_that_line_whole(tmp_path: Path) -> None:
    """A file is read in chunks, so a drain nearly always comes with part of a line read: that part was a line of
    its own (a bad JSON line that failed the drained run, or half a record), counted as read (a checkpoint's
    offset past the real line). The line is read to its end, as a file's lines are all there, and no further."""
    path = tmp_path / "lines.jsonl"
    path.write_text("".join(f'{{"n": {n}, "pad": "{"x" * 30}"}}\n' for n in range(10)))
    for as_json in (True, False):
        stream = LineStream(path, json=as_json, chunk_size=64)  # lines of 50 bytes: the first read ends in the second
        async with asyncio.timeout(20), contextlib.aclosing(aiter(stream)) as lines:
            seen = [await anext(lines)]
            stream.drain()
            seen += [line async for line in lines]
        expected = [{"n": 0, "pad": "x" * 30}, {"n": 1, "pad": "x" * 30}]
        assert seen == (expected if as_json else [json.dumps(line) for line in expected])


@pytest.mark.parametrize("mapping", ["simple", "async", "multi"])
async def test_a_followed_file_drained_before_its_source_started_is_read_to_its_end(
    tmp_path: Path, mapping: str
) -> None:
    # The drain came before the source's call: the feed stopped, and the source was never called (no lines).
    # A source with its own drain() is called all the same, and drains as it says: a followed file to its end.
    path = tmp_path / "log.txt"
    path.write_text("".join(f"{n}\n" for n in range(1000)))
    run = aiod4p.start(source_graph(LinesSource(path, follow=True)), mapping=mapping, workers=2)
    async with asyncio.timeout(30), run:
        run.drain()
        results = await run.results()
    assert sorted(results.data(), key=int) == [str(n) for n in range(1000)]


@pytest.mark.asyncio
async def test_follow_restarts_after_truncation(tmp_path: Path) -> None:
    path = tmp_path / "rotating.txt"
    path.write_text("old\n")
    run = aiod4p.start(source_graph(LinesSource(path, follow=True, poll_interval=0.01)))
    seen = []
    async with asyncio.timeout(20), run:
        async for record in run:
            seen.append(record.data)
            if record.data == "old":
                path.write_text("n\n")  # truncated (shorter than what was read): read again from the top
            else:
                run.drain()
    assert seen == ["old", "n"]


@pytest.mark.asyncio
async def test_follow_goes_on_with_the_new_file_once_the_old_one_is_rotated_away(tmp_path: Path) -> None:
    """logrotate's ``create``: the file is renamed, a new one made at its path. What the old file got before
    the new one came is read too, then the new file from its top (``tail -F``); it read the old one forever."""
    path = tmp_path / "app.log"
    path.write_text("old\n")
    run = aiod4p.start(source_graph(LinesSource(path, follow=True, poll_interval=0.01)))
    seen = []
    async with asyncio.timeout(20), run:
        async for record in run:
            seen.append(record.data)
            if record.data == "old":
                path.rename(tmp_path / "app.log.1")
                with (tmp_path / "app.log.1").open("a") as old:
                    old.write("last\n")  # the writer had the old file open still
                path.write_text("new\n")
            elif record.data == "new":
                run.drain()
    assert seen == ["old", "last", "new"]


@pytest.mark.asyncio
async def test_the_unterminated_last_line_of_a_rotated_file_is_a_line_of_its_own(tmp_path: Path) -> None:
    """The old file's last line, with no newline, was joined with the new file's first: "lastnew"."""
    path = tmp_path / "app.log"
    path.write_text("old\nlast")
    run = aiod4p.start(source_graph(LinesSource(path, follow=True, poll_interval=0.01)))
    seen = []
    async with asyncio.timeout(20), run:
        async for record in run:
            seen.append(record.data)
            if record.data == "old":
                path.rename(tmp_path / "app.log.1")
                path.write_text("new\n")
            elif "new" in record.data:
                run.drain()
    assert seen == ["old", "last", "new"]


async def _taken(lines: AsyncIterator[Any], count: int) -> list[Any]:
    async with asyncio.timeout(20):
        return [await anext(lines) for _ in range(count)]


@pytest.mark.asyncio
async def test_a_truncated_file_written_past_where_it_was_read_is_read_from_its_top(tmp_path: Path) -> None:
    """copytruncate, then more written than had been read before the next poll: its size never fell below the
    offset read, and the stream went on from there, in the middle of a new line ("itten again"), joined to the
    old file's unterminated last line ("halfitten again")."""
    path = tmp_path / "app.log"
    path.write_text("first line\nhalf")
    stream = LineStream(path, follow=True, poll_interval=0.01)
    lines = aiter(stream)
    assert await _taken(lines, 1) == ["first line"]
    with path.open("r+") as log:
        log.truncate(0)
        log.write("a line written again\nand one more\n")
    assert await _taken(lines, 3) == ["half", "a line written again", "and one more"]
    stream.drain()


@pytest.mark.asyncio
@pytest.mark.parametrize("rotate", ["copytruncate", "create"])
async def test_a_followed_file_seeks_its_offset_in_the_file_it_read_it_from(tmp_path: Path, rotate: str) -> None:
    """A restore at line 3 after the file was truncated (or rotated) dropped the new file's first 3 lines; one at
    line 4, taken after, drops the new file's first line only; one of a file unchanged since, its first 3."""
    path = tmp_path / "app.log"
    path.write_text("1\n2\n3\n")
    stream = LineStream(path, follow=True, poll_interval=0.01)
    lines = aiter(stream)
    assert await _taken(lines, 3) == ["1", "2", "3"]
    at_3 = pickle.loads(pickle.dumps(stream.generations))  # as a checkpoint at line 3 saves them
    if rotate == "copytruncate":
        with path.open("r+") as log:
            log.truncate(0)
            log.write("4\n")
    else:
        path.rename(tmp_path / "app.log.1")
        path.write_text("4\n")
    assert await _taken(lines, 1) == ["4"]
    at_4 = pickle.loads(pickle.dumps(stream.generations))
    with path.open("a") as log:
        log.write("5\n6\n7\n")
    assert await _taken(lines, 3) == ["5", "6", "7"]
    stream.drain()
    for offset, generations, expected in [(3, at_3, ["4", "5", "6", "7"]), (4, at_4, ["5", "6", "7"])]:
        restored = LineStream(path, follow=True, poll_interval=0.01, generations=generations)
        restored.seek(offset)
        again = aiter(restored)
        assert await _taken(again, len(expected)) == expected
        restored.drain()
        assert [line async for line in again] == []
    unchanged = tmp_path / "unchanged.log"
    unchanged.write_text("1\n2\n3\n4\n")
    stream = LineStream(unchanged, follow=True, poll_interval=0.01)
    assert await _taken(aiter(stream), 3) == ["1", "2", "3"]
    stream.drain()
    restored = LineStream(unchanged, follow=True, poll_interval=0.01, generations=stream.generations)
    restored.seek(3)
    restored.drain()
    assert [line async for line in restored] == ["4"]


@pytest.mark.asyncio
async def test_a_file_truncated_again_and_again_keeps_its_generations_bounded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A followed file rewritten in place (truncated) once a second added a generation a second to the stream's
    state, held in memory and pickled into every checkpoint for as long as the run went on (a soak of 20 rewrites a
    second: the source's checkpointed state grew by 5 kB a second). It keeps the newest, and one that yielded
    nothing not at all; a restore at the last line still finds its file."""
    monkeypatch.setattr(sources, "MAX_GENERATIONS", 8, raising=False)  # (before the bound, no such name)
    path = tmp_path / "status.txt"
    path.write_text("reading 0\n")
    stream = LineStream(path, follow=True, poll_interval=0.001)
    lines = aiter(stream)
    for n in range(1, 40):
        assert await _taken(lines, 1) == [f"reading {n - 1}"]
        with path.open("r+") as status:  # rewritten in place: its first bytes differ, so it is a truncation
            status.truncate(0)
            status.write(f"reading {n}\n" if n % 2 else "")  # every other rewrite holds no line yet
        if n % 2 == 0:
            path.write_text(f"reading {n}\n")
    assert await _taken(lines, 1) == ["reading 39"]
    stream.drain()
    assert len(stream.generations) <= 8
    assert [generation.first for generation in stream.generations] == sorted({g.first for g in stream.generations})
    with path.open("a") as status:
        status.write("reading 40\n")
    restored = LineStream(path, follow=True, poll_interval=0.01, generations=stream.generations)
    restored.seek(40)  # as a checkpoint taken after "reading 39" saves it
    restored.drain()
    assert [line async for line in restored] == ["reading 40"]


@pytest.mark.asyncio
async def test_a_restore_older_than_every_generation_kept_reads_the_file_from_its_top(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Once :data:`MAX_GENERATIONS` had dropped the generation a restore's line lay in, the restore took the file at
    the path for the one its line counts in, and silently skipped that many of its lines (10 of a new file's 20).
    That file was replaced since: it is read from its top, with the warning of a rotation."""
    path = tmp_path / "status.txt"
    path.write_text("".join(f"old{n}\n" for n in range(20)))
    stream = LineStream(path, follow=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        for first in range(100, 100 + sources.MAX_GENERATIONS + 5):  # each with a line, all after line 10
            stream._begin_generation(fd, first)
    finally:
        os.close(fd)
    path.unlink()
    path.write_text("".join(f"new{n}\n" for n in range(20)))
    restored = LineStream(path, follow=True, generations=list(stream.generations))
    restored.seek(10)
    restored.drain()
    with caplog.at_level("WARNING", logger="aiod4p"):
        assert [line async for line in restored] == [f"new{n}" for n in range(20)]
    assert "was truncated or rotated since its item 10 was read" in caplog.text


@pytest.mark.asyncio
async def test_follow_from_the_end_skips_what_is_there(tmp_path: Path) -> None:
    path = tmp_path / "log.txt"
    path.write_text("old\n" * 10)
    stream = LineStream(path, follow=True, from_end=True, poll_interval=0.01)
    lines = aiter(stream)
    async with asyncio.timeout(20):
        first = asyncio.ensure_future(anext(lines))
        await asyncio.sleep(0)  # one step: the stream opens the file and waits at its end
        with path.open("a") as out:
            out.write("fresh\n")
        assert await first == "fresh"
        stream.drain()
        assert [line async for line in lines] == []


async def test_a_drain_ends_a_pipe_whose_writer_keeps_it_full() -> None:
    """``yes | aiod4p run --stdin``: the drain takes what the pipe held when it came, then ends (it read until
    the pipe was empty, which a writer faster than the run never let happen: Ctrl-C took minutes)."""
    read_fd, write_fd = os.pipe()
    line = b'{"i": 1}\n'

    def keep_full() -> None:
        with contextlib.suppress(OSError), open(write_fd, "wb", buffering=0) as out:  # EPIPE once the reader goes
            while True:
                out.write(line * 1024)

    writer = threading.Thread(target=keep_full, daemon=True)
    writer.start()
    stream = LineStream(read_fd, json=True)
    items = aiter(stream)
    try:
        async with asyncio.timeout(20):
            for _ in range(10_000):
                await anext(items)
            stream.drain()
            after = [item async for item in items]
    finally:
        os.close(read_fd)
        writer.join(timeout=20)
    assert len(after) <= 2 * 65536 // len(line) + 1024  # what the pipe and the last chunk held, at most


@pytest.mark.asyncio
async def test_lines_from_a_pipe_end_when_the_writer_closes() -> None:
    read_fd, write_fd = os.pipe()
    graph, echo = fed_graph()
    run = aiod4p.start(graph, {echo: LineStream(read_fd, json=True)})
    try:
        seen = []
        async with asyncio.timeout(20), run:
            os.write(write_fd, b'{"i": 0}\n{"i": 1}\n')
            async for record in run:
                seen.append(record.data["i"])
                if len(seen) == 2:
                    os.write(write_fd, b'{"i": 2}\n')
                    os.close(write_fd)
                    write_fd = -1
        assert seen == [0, 1, 2]
    finally:
        os.close(read_fd)
        if write_fd >= 0:
            os.close(write_fd)


@pytest.mark.asyncio
async def test_drain_reads_what_is_already_in_the_pipe() -> None:
    read_fd, write_fd = os.pipe()
    graph, echo = fed_graph()
    run = aiod4p.start(graph, {echo: LineStream(read_fd)})
    try:
        seen = []
        async with asyncio.timeout(20), run:
            os.write(write_fd, b"first\n")
            async for record in run:
                seen.append(record.data)
                if len(seen) == 1:
                    os.write(write_fd, b"".join(b"line %d\n" % i for i in range(1000)) + b"partial")
                    run.drain()  # the writer never closes: the drain ends the stream
        assert seen == ["first", *(f"line {i}" for i in range(1000)), "partial"]
        assert os.get_blocking(read_fd)  # the descriptor's mode is restored
    finally:
        os.close(read_fd)
        os.close(write_fd)


# -- TCP ------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_tcp_server_source_merges_clients() -> None:
    listening: asyncio.Future[tuple[str, int]] = asyncio.get_running_loop().create_future()
    source = TCPSource(port=0, json=True, connections=2, on_listen=listening.set_result)
    run = aiod4p.start(source_graph(source))
    async with asyncio.timeout(20), run:
        results = asyncio.ensure_future(run.results())
        host, port = await listening
        assert run.instances(source)[0].address == (host, port) and host == "127.0.0.1"
        for client in range(2):
            _, writer = await asyncio.open_connection(host, port)
            writer.write(b"".join(json.dumps({"c": client, "i": i}).encode() + b"\n" for i in range(100)))
            await writer.drain()
            writer.close()
            await writer.wait_closed()
        data = (await results).data()
    assert sorted((d["c"], d["i"]) for d in data) == [(c, i) for c in range(2) for i in range(100)]


@pytest.mark.asyncio
async def test_tcp_client_source_reads_until_the_peer_closes() -> None:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"".join(b"%d\n" % i for i in range(500)))
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        data = await collect(aiod4p.start(source_graph(TCPSource(port=port, mode="client", json=True))))
    finally:
        server.close()
        await server.wait_closed()
    assert data == list(range(500))


@pytest.mark.asyncio
async def test_tcp_connection_refused_is_an_error() -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(PEError, match=rf"cannot connect to 127\.0\.0\.1:{port}"):
        await collect(aiod4p.start(source_graph(TCPSource(port=port, mode="client"))))


@pytest.mark.asyncio
async def test_tcp_bad_json_from_a_client_fails_the_run() -> None:
    listening: asyncio.Future[tuple[str, int]] = asyncio.get_running_loop().create_future()
    run = aiod4p.start(source_graph(TCPSource(json=True, on_listen=listening.set_result)))
    async with asyncio.timeout(20), run:
        results = asyncio.ensure_future(run.results())
        _, writer = await asyncio.open_connection(*await listening)
        writer.write(b'{"ok": 1}\n{oops\n')
        await writer.drain()
        with pytest.raises(PEError, match="line 2: not valid JSON"):
            await results
        writer.close()
        await writer.wait_closed()


@pytest.mark.asyncio
async def test_tcp_source_stops_reading_when_the_workflow_is_behind() -> None:
    listening: asyncio.Future[tuple[str, int]] = asyncio.get_running_loop().create_future()
    stream = SocketStream(connections=1, on_listen=listening.set_result, max_pending=100)
    graph = WorkflowGraph()
    gate = Gate()
    graph.add(gate)
    run = aiod4p.start(graph, {gate: stream}, batch_size=16, credits=2)
    total = 20_000
    pad = b"x" * 1000
    payload = b"".join(b"%d %s\n" % (i, pad) for i in range(total))  # 20 MB: more than loopback socket buffers hold
    async with asyncio.timeout(30), run:
        results = asyncio.ensure_future(run.results())
        _, writer = await asyncio.open_connection(*await listening)
        writer.transport.set_write_buffer_limits(high=0)
        writer.write(payload)
        while not stream.paused:  # noqa: ASYNC110 - the source stops reading once the workflow is full
            await asyncio.sleep(0.005)
        assert writer.transport.get_write_buffer_size() > 0  # so the sender is held back
        assert stream.pending + 100 < total  # most items wait in the sender and the kernel, not here
        gate.gate.event.set()
        await writer.drain()
        writer.close()
        await writer.wait_closed()
        data = (await results).data()
    assert [int(line.split()[0]) for line in data] == list(range(total))


async def test_a_socket_stream_of_heavy_lines_stops_reading_at_its_bytes_bound() -> None:
    """Its queue was bounded by count alone: 1,500 lines of 1 MB for a slow PE took 1 GB (1,024 lines held)."""
    listening: asyncio.Future[tuple[str, int]] = asyncio.get_running_loop().create_future()
    stream = SocketStream(connections=1, on_listen=listening.set_result, max_pending_bytes=100_000)
    lines = aiter(stream)
    line, total = b"x" * 9_999 + b"\n", 2_000  # 20 MB: more than loopback socket buffers hold

    async def send(writer: asyncio.StreamWriter) -> None:
        writer.write(line * total)
        await writer.drain()
        writer.close()
        await writer.wait_closed()

    async with asyncio.timeout(30):
        first = asyncio.ensure_future(anext(lines))
        _, writer = await asyncio.open_connection(*await listening)
        sending = asyncio.ensure_future(send(writer))
        assert await first == line[:-1].decode()
        while not stream.paused:  # noqa: ASYNC110 - the source stops reading once its bound is reached
            await asyncio.sleep(0.005)
        assert stream.pending * len(line) <= 100_000 + 256 * 1024  # the bound, and at most one read beyond it
        rest = [item async for item in lines]
        await sending
    assert len(rest) == total - 1


async def _listening(stream: SocketStream | DatagramStream) -> tuple[AsyncIterator[Any], asyncio.Future[Any], Any]:
    """Start iterating ``stream`` (which listens): its items, its first item to come, and the address it listens on."""
    listening: asyncio.Future[tuple[str, int]] = asyncio.get_running_loop().create_future()
    stream.on_listen = listening.set_result
    items = aiter(stream)
    first = asyncio.ensure_future(anext(items))
    return items, first, await listening


async def test_a_datagram_stream_drops_what_comes_beyond_its_bytes_bound(caplog: pytest.LogCaptureFixture) -> None:
    """Dropped datagrams were only counted in ``dropped``, which nothing reported: the first drop is a warning,
    and so is their count when the stream ends."""
    stream = DatagramStream("127.0.0.1", 0, max_pending_bytes=10_000)
    async with asyncio.timeout(20):
        items, first, address = await _listening(stream)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
            sender.sendto(b"first\n", address)
            assert await first == "first"
            for number in range(50):
                sender.sendto(b"%03d %s\n" % (number, b"x" * 995), address)  # 1,000 bytes each
            while stream.dropped < 40:  # noqa: ASYNC110 - datagrams arrive as the loop turns
                await asyncio.sleep(0.005)
        stream.drain()
        kept = [item async for item in items]
    assert [int(item.split()[0]) for item in kept] == list(range(10))
    assert stream.dropped == 40
    warnings = [r.getMessage() for r in caplog.records if r.name == "aiod4p.sources"]
    where = f"UDP {address[0]}:{address[1]}"
    assert warnings == [
        f"{where}: the workflow is behind (65536 items or 10000 bytes wait: max_pending, max_pending_bytes):"
        " datagrams are dropped from datagram 12 on; their count is logged when the stream ends",
        f"{where}: 40 datagrams dropped in all, the workflow being behind (max_pending=65536, max_pending_bytes=10000)",
    ]


async def _datagrams(stream: DatagramStream, datagrams: list[bytes], taken: int) -> tuple[list[Any], str]:
    """Send ``datagrams`` to ``stream`` and take ``taken`` items; with the sender's address."""
    async with asyncio.timeout(20):
        items, first, address = await _listening(stream)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
            for datagram in datagrams:
                sender.sendto(datagram, address)
            return [
                await first,
                *[await anext(items) for _ in range(taken - 1)],
            ], f"127.0.0.1:{sender.getsockname()[1]}"


async def test_a_bad_datagram_fails_naming_the_datagram_and_its_sender() -> None:
    """The second datagram was "line 3": the empty piece after each newline counted as a line."""
    stream = DatagramStream(json=True)
    with pytest.raises(aiod4p.InputError) as failed:
        await _datagrams(stream, [b'{"i": 1}\n', b"oops\n"], 2)
    assert re.fullmatch(
        r"UDP 127\.0\.0\.1:\d+, datagram 2 from 127\.0\.0\.1:\d+, line 1: not valid JSON \(.*\): b'oops'",
        str(failed.value),
    )


async def test_bad_datagrams_skipped_with_a_warning_and_a_count(caplog: pytest.LogCaptureFixture) -> None:
    stream = DatagramStream(json=True, on_bad="skip", max_line=20)
    datagrams = [b'{"i": 1}\n', b"\xff\xfe", b"9" * 30, b'{"i": 2}\nnope\n{"i": 3}']
    data, sender = await _datagrams(stream, datagrams, 3)
    assert data == [{"i": 1}, {"i": 2}, {"i": 3}] and stream.skipped == 3
    warnings = [r.getMessage() for r in caplog.records if r.name == "aiod4p.sources"]
    assert [w.split(": ")[0].split(", datagram ")[1] for w in warnings] == [
        f"{n} from {sender}, line {line}" for n, line in ((2, 1), (3, 1), (4, 2))
    ]
    assert (
        "not UTF-8 (byte 0: invalid start byte)" in warnings[0]
        and "longer than 20 bytes (30 bytes; --max-line" in warnings[1]
    )


@pytest.mark.parametrize("on_bad", ["skip", "dead-letter"])
async def test_udp_source_bad_lines(on_bad: str) -> None:
    listening: asyncio.Future[tuple[str, int]] = asyncio.get_running_loop().create_future()
    source = UDPSource(json=True, count=2, on_listen=listening.set_result, on_bad=on_bad)
    run = aiod4p.start(source_graph(source))
    async with asyncio.timeout(20), run:
        results = asyncio.ensure_future(run.results())
        address = await listening
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
            for datagram in (b"{bad\n", b'{"i": 1}', b'{"i": 2}\n'):
                sender.sendto(datagram, address)
        records = (await results).records
    assert sorted(r.data["i"] for r in records if r.port == "output") == [1, 2]
    letters = [(r.data["line"], r.data["text"]) for r in records if r.port == "dead_letter"]
    assert letters == ([(1, "{bad")] if on_bad == "dead-letter" else [])
    assert {(entry.pe, entry.skipped) for entry in run.stats if entry.skipped} == {(source.id, 1)}


async def test_a_socket_stream_read_again_accepts_its_clients_anew() -> None:
    """A restart closes the dead attempt's reading of a feed, with its clients' connections, and reads it again:
    with ``connections=1``, the new reading ended at once (its client counted already), and the run succeeded
    with the rest of the input dropped (100 of 3,000 lines). It now accepts its client anew."""
    listening: asyncio.Queue[tuple[str, int]] = asyncio.Queue()
    stream = SocketStream(connections=1, on_listen=listening.put_nowait)
    async with asyncio.timeout(20):
        for line in ("before", "after"):
            items = aiter(stream)
            reading = asyncio.ensure_future(anext(items))
            _, writer = await asyncio.open_connection(*await listening.get())
            writer.write(f"{line}\n".encode())
            await writer.drain()
            assert await reading == line
            if line == "before":
                await items.aclose()  # what a restart does to the dead attempt's reading
            writer.close()
            await writer.wait_closed()
        assert [item async for item in items] == []  # its one client closed: the new reading ends


async def test_a_drain_ends_a_socket_stream_whose_client_keeps_sending() -> None:
    """A client that sends faster than the run: the drain reads what its socket held then, and ends (the stream
    took what kept arriving, and resumed the reading it had paused, so Ctrl-C waited for the client)."""
    stream = SocketStream(max_pending=100)
    async with asyncio.timeout(20):
        items, first, address = await _listening(stream)
        _, writer = await asyncio.open_connection(*address)

        async def keep_sending() -> None:
            while True:
                writer.write(b"line\n" * 1000)
                await writer.drain()

        sender = asyncio.ensure_future(keep_sending())
        await first
        for _ in range(10_000):
            await anext(items)
        held = stream.pending  # read before the drain: still given
        stream.drain()
        after = []
        async for item in items:
            after.append(item)
            await asyncio.sleep(0)  # as a workflow does: the loop turns, the client's data comes in
        sender.cancel()
        writer.close()
    assert len(after) >= held  # and what the kernel held for the connection, but not what kept coming


def _unacknowledged(writer: asyncio.StreamWriter) -> int:
    """Bytes the client has written that the peer's kernel has not acknowledged (its send queue)."""
    fd = writer.get_extra_info("socket").fileno()
    return int.from_bytes(fcntl.ioctl(fd, termios.TIOCOUTQ, bytes(4)), sys.byteorder)


async def _acknowledged(writer: asyncio.StreamWriter) -> None:
    """Wait until every byte written is in the peer's kernel (read or in its receive buffer)."""
    writer.transport.set_write_buffer_limits(high=0)
    await writer.drain()  # in the client's kernel
    while _unacknowledged(writer):  # noqa: ASYNC110 - loopback acknowledges as the peer's buffer takes it
        await asyncio.sleep(0.005)


async def test_a_drain_delivers_what_the_kernel_acknowledged(caplog: pytest.LogCaptureFixture) -> None:
    """The drain paused the sockets and closed them: lines TCP had acknowledged to the client (in the socket's
    receive buffer, the reading paused because the workflow was behind) were lost. It now reads what each
    connection holds when it comes, then closes it; a line begun is discarded with a warning naming the client,
    and new connections are refused."""
    stream = SocketStream(json=True, max_pending=100)
    async with asyncio.timeout(30):
        items, first, address = await _listening(stream)
        reader, writer = await asyncio.open_connection(*address)
        writer.write(b"".join(b'{"i": %d}\n' % i for i in range(300)))  # beyond max_pending: reading pauses
        assert await first == {"i": 0}
        while not stream.paused:  # noqa: ASYNC110 - the stream pauses once it has read the first write
            await asyncio.sleep(0.005)
        writer.write(b"".join(b'{"i": %d}\n' % i for i in range(300, 2300)) + b'{"i": 23')  # 26 KB: unread
        await _acknowledged(writer)
        stream.drain()
        rest = [item["i"] async for item in items]
        with pytest.raises(OSError):  # the drain closed the listening socket
            await asyncio.open_connection(*address)
        assert await reader.read() == b""  # a clean close: the client's bytes were all read
        writer.close()
    assert rest == list(range(1, 2300))
    client = _endpoint(writer.get_extra_info("sockname"))
    assert (
        f"TCP client {client} of {_endpoint(address)}: the drain closed the connection in the middle of a line:"
        " its 8 bytes received are discarded"
    ) in caplog.text


async def test_a_socket_stream_drained_before_it_listens_ends_at_once() -> None:
    listening: asyncio.Future[tuple[str, int]] = asyncio.get_running_loop().create_future()
    stream = SocketStream(on_listen=listening.set_result)
    stream.drain()
    async with asyncio.timeout(20):
        assert [item async for item in stream] == []
        with pytest.raises(OSError):  # nothing listens
            await asyncio.open_connection(*listening.result())


async def test_a_drain_that_cannot_tell_what_a_connection_holds_says_so(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Where ``FIONREAD`` fails, the connection is closed at once, with a warning naming it: nothing is lost
    without a word."""
    stream = SocketStream()
    async with asyncio.timeout(20):
        items, first, address = await _listening(stream)
        _, writer = await asyncio.open_connection(*address)
        writer.write(b"one\n")
        assert await first == "one"
        monkeypatch.setattr(sources, "_readable_now", lambda fd, regular: None)
        stream.drain()
        assert [item async for item in items] == []
        writer.close()
    peer = _endpoint(writer.get_extra_info("sockname"))
    assert f"TCP client {peer} of " in caplog.text
    assert "the drain cannot tell what the connection holds: closed at once" in caplog.text


@pytest.mark.parametrize("mapping", ["simple", "async"])
async def test_a_drained_tcp_source_delivers_what_the_kernel_acknowledged(mapping: str) -> None:
    """``aiod4p run`` with a TCPSource, SIGTERM: of 20,000 lines a client had sent, only those the source had
    read reached the results. Every line acknowledged before the drain does now."""
    listening: asyncio.Future[tuple[str, int]] = asyncio.get_running_loop().create_future()
    source = TCPSource(json=True, max_pending=100, on_listen=listening.set_result)
    graph = WorkflowGraph()
    gate = Gate()
    graph.connect(source, "output", gate, "input")
    run = aiod4p.start(graph, mapping=mapping)
    total = 2000
    async with asyncio.timeout(30), run:
        results = asyncio.ensure_future(run.results())
        _, writer = await asyncio.open_connection(*await listening)
        writer.write(b"".join(b'{"i": %d}\n' % i for i in range(total)))  # 24 KB: the receive buffer holds it
        await _acknowledged(writer)
        run.drain()
        gate.gate.event.set()
        data = (await results).data()
        writer.close()
    assert sorted(item["i"] for item in data) == list(range(total))


# -- UDP ------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_udp_source_receives_datagrams() -> None:
    listening: asyncio.Future[tuple[str, int]] = asyncio.get_running_loop().create_future()
    run = aiod4p.start(source_graph(UDPSource(json=True, count=50, on_listen=listening.set_result)))
    async with asyncio.timeout(20), run:
        results = asyncio.ensure_future(run.results())
        address = await listening
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
            for i in range(0, 50, 2):
                sender.sendto(b'{"i": %d}\n{"i": %d}' % (i, i + 1), address)
        data = (await results).data()
    assert sorted(d["i"] for d in data) == list(range(50))


@pytest.mark.asyncio
async def test_udp_bind_failure_names_the_address() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        with pytest.raises(PEError, match=rf"cannot bind UDP 127\.0\.0\.1:{port}"):
            await collect(aiod4p.start(source_graph(UDPSource(port=port))))


# -- timer, any async iterator ------------------------------------------------------------


@pytest.mark.asyncio
async def test_timer_ticks_count_times() -> None:
    data = await collect(aiod4p.start(source_graph(TimerSource(0.005, count=5))))
    assert [d["tick"] for d in data] == sorted(d["tick"] for d in data)
    assert len(data) == 5
    assert all(isinstance(d["time"], float) for d in data)


@pytest.mark.asyncio
async def test_an_endless_timer_stops_on_drain() -> None:
    data = await collect(aiod4p.start(source_graph(TimerSource(0.002))), count=3)
    assert len(data) >= 3  # ticks already emitted when the drain came still arrive
    assert [d["tick"] for d in data] == sorted({d["tick"] for d in data})


async def numbers(n: int) -> AsyncIterator[int]:
    for i in range(n):
        yield i


@pytest.mark.asyncio
async def test_any_async_iterator_as_a_source() -> None:
    assert await collect(aiod4p.start(source_graph(AsyncIterSource(numbers, 1000)))) == list(range(1000))


@pytest.mark.asyncio
async def test_an_aiostream_pipeline_as_source_and_as_feed() -> None:
    from aiostream import pipe, stream

    def pipeline() -> Any:
        return stream.range(10) | pipe.map(lambda x: x * x) | pipe.filter(lambda x: x % 2 == 0)

    assert await collect(aiod4p.start(source_graph(AsyncIterSource(pipeline)))) == [0, 4, 16, 36, 64]
    graph, echo = fed_graph()
    assert await collect(aiod4p.start(graph, {echo: iterate(pipeline())})) == [0, 4, 16, 36, 64]


@pytest.mark.asyncio
async def test_a_factory_that_returns_no_async_iterable_is_an_error() -> None:
    with pytest.raises(PEError, match="returned list, not an async iterable"):
        await collect(aiod4p.start(source_graph(AsyncIterSource(lambda: [1, 2]))))


@pytest.mark.asyncio
async def test_endless_iterator_without_drain_is_cancelled_on_drain() -> None:
    async def forever() -> AsyncIterator[int]:
        i = 0
        while True:
            yield i
            i += 1
            await asyncio.sleep(0)

    data = await collect(aiod4p.start(source_graph(AsyncIterSource(forever))), count=10)
    assert data[:10] == list(range(10))


class Waiting(ProducerPE):
    """A plain async-generator source that waits after each item until the test releases it."""

    def __init__(self) -> None:
        super().__init__()
        self.release = wf.Shared(event=asyncio.Event())

    async def produce(self) -> AsyncIterator[int]:
        for i in range(3):
            yield i
            await self.release.event.wait()
            self.release.event.clear()


@pytest.mark.asyncio
async def test_items_of_a_waiting_generator_source_are_not_held_back() -> None:
    source = Waiting()
    run = aiod4p.start(source_graph(source), batch_size=256, max_delay=60)
    seen = []
    async with asyncio.timeout(20), run:
        async for record in run:  # each item arrives while its source still waits
            seen.append(record.data)
            source.release.event.set()
    assert seen == [0, 1, 2]


@pytest.mark.asyncio
async def test_a_plain_generator_source_stops_on_drain() -> None:
    source = Waiting()
    run = aiod4p.start(source_graph(source))
    async with asyncio.timeout(20), run:
        assert (await run.__anext__()).data == 0
        run.drain()  # cancels the waiting generator: no drain() of its own
        assert [r.data async for r in run] == []


def test_source_pes_are_picklable_and_reusable(tmp_path: Path) -> None:
    path = tmp_path / "x.txt"
    path.write_text("1\n2\n")
    for source in (
        LinesSource(path),
        TCPSource(port=1),
        UDPSource(port=1),
        TimerSource(1.0),
        AsyncIterSource(numbers, 3),
    ):
        clone = pickle.loads(pickle.dumps(source))
        assert type(clone) is type(source)
    lines = LinesSource(path, json=True)
    for _ in range(2):  # the same PE object runs twice: the stream is made per run
        assert aiod4p.run(source_graph(lines)).data() == [1, 2]


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: UDPSource(port=70000), "UDPSource: port must be 0 to 65535, not 70000"),
        (lambda: DatagramStream(port=-1), "DatagramStream: port must be 0 to 65535, not -1"),
        (lambda: TCPSource(port=65536), "TCPSource: port must be 0 to 65535, not 65536"),
        (lambda: SocketStream(port=1 << 16), "SocketStream: port must be 0 to 65535, not 65536"),
        (lambda: UDPSource(max_pending=0), "UDPSource: max_pending must be at least 1, not 0"),
        (lambda: DatagramStream(max_pending_bytes=-5), "DatagramStream: max_pending_bytes must be at least 1, not -5"),
        (lambda: TCPSource(max_pending=0), "TCPSource: max_pending must be at least 1, not 0"),
        (lambda: SocketStream(max_pending_bytes=0), "SocketStream: max_pending_bytes must be at least 1, not 0"),
        (lambda: TCPSource(connections=0), r"TCPSource: connections \(None for no limit\) must be at least 1, not 0"),
        (lambda: SocketStream(connections=-2), r"SocketStream: connections \(None for no limit\) must be at least 1"),
        (lambda: UDPSource(count=0), r"UDPSource: count \(None for no limit\) must be at least 1, not 0"),
        (lambda: DatagramStream(count=-1), r"DatagramStream: count \(None for no limit\) must be at least 1"),
        (lambda: TimerSource(1.0, count=-1), r"TimerSource: count \(None for no limit\) must be at least 1, not -1"),
        (lambda: TimerStream(1.0, count=0), r"TimerStream: count \(None for no limit\) must be at least 1, not 0"),
        (lambda: TimerSource(math.inf), r"TimerSource: interval must be positive and finite \(seconds\), not inf"),
        (lambda: TimerStream(math.nan), r"TimerStream: interval must be positive and finite \(seconds\), not nan"),
        (lambda: TimerStream(-1.0), r"TimerStream: interval must be positive and finite \(seconds\), not -1.0"),
        (lambda: LinesSource(poll_interval=math.inf), "LinesSource: poll_interval must be positive and finite"),
        (lambda: LineStream(poll_interval=0), "LineStream: poll_interval must be positive and finite"),
        (lambda: LineStream(chunk_size=0), "LineStream: chunk_size must be at least 1, not 0"),
        (lambda: UDPSource(max_line=0), r"UDPSource: max_line \(bytes\) must be at least 1, not 0"),
        (lambda: aiod4p.LiveFeed(-3), "LiveFeed: maxsize must be at least 1, not -3"),
    ],
)
def test_nonsensical_numeric_options_are_refused_naming_the_class_and_option(
    make: Callable[[], object], message: str
) -> None:
    """``UDPSource(port=70000)`` bound port 4464 (70000 modulo 65536); ``max_pending=0`` dropped every datagram."""
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: TCPSource(port="9000"), "TCPSource: port must be an int, not '9000'"),  # type: ignore[arg-type]
        (lambda: UDPSource(max_pending=True), "UDPSource: max_pending must be an int, not True"),
        (lambda: TimerStream("1"), "TimerStream: interval must be a number of seconds, not '1'"),  # type: ignore[arg-type]
    ],
)
def test_numeric_options_of_another_type_are_refused(make: Callable[[], object], message: str) -> None:
    with pytest.raises(TypeError, match=message):
        make()


def test_invalid_source_options_are_refused() -> None:
    with pytest.raises(ValueError, match="mode must be"):
        TCPSource(mode="peer")
    with pytest.raises(ValueError, match="interval must be positive"):
        TimerSource(0)
    with pytest.raises(ValueError, match="maxsize"):
        aiod4p.LiveFeed(0)
    with pytest.raises(ValueError, match="max_bytes must be at least 1, not 0"):
        aiod4p.LiveFeed(max_bytes=0)


async def test_a_live_feed_of_heavy_items_is_full_at_its_bytes_bound() -> None:
    """Bounded by count alone, a feed of 50 MB arrays held up to 1,024 of them (51 GB) before ``send`` waited."""
    feed = aiod4p.LiveFeed(max_bytes=3_000_000)
    items = aiter(feed)
    async with asyncio.timeout(20):
        for _ in range(3):
            feed.send_nowait(b"x" * 1_000_000)
        with pytest.raises(asyncio.QueueFull):
            feed.send_nowait(b"y")
        blocked = asyncio.ensure_future(feed.send(b"z" * 5_000_000))  # more than the bound: waits for room
        await asyncio.sleep(0)
        assert not blocked.done()
        assert len(await anext(items)) == 1_000_000
        await blocked  # one item taken: room again (an item larger than the bound still goes)
        assert feed.full()
        feed.close()
        assert [len(item) async for item in items] == [1_000_000, 1_000_000, 5_000_000]


# -- long and bad lines ------------------------------------------------------------------


def _write_in_thread(fd: int, data: bytes | Iterable[bytes]) -> threading.Thread:
    """Write ``data`` (or each of its pieces) to the pipe ``fd`` from a thread, then close it."""

    def write() -> None:
        with os.fdopen(fd, "wb") as pipe:
            for piece in [data] if isinstance(data, bytes) else data:
                pipe.write(piece)

    thread = threading.Thread(target=write)
    thread.start()
    return thread


async def _read_pipe(data: bytes | Iterable[bytes], **options: Any) -> tuple[list[Any], LineStream]:
    read_fd, write_fd = os.pipe()
    stream = LineStream(read_fd, **options)
    writer = _write_in_thread(write_fd, data)
    try:
        async with asyncio.timeout(50):
            return [item async for item in stream], stream
    finally:
        writer.join()
        os.close(read_fd)


@pytest.mark.asyncio
async def test_a_long_line_is_read_in_time_linear_in_its_size() -> None:
    """A 50 MB line read 4 KiB at a time: 12,800 reads; joining the pieces each time would copy 320 GB."""
    line = b"x" * 50_000_000
    items, _ = await _read_pipe(b"short\n" + line + b"\nlast", chunk_size=4096)
    assert [len(item) for item in items] == [5, 50_000_000, 4]


@pytest.mark.asyncio
async def test_an_over_long_line_is_never_held_whole() -> None:
    tracemalloc.start()
    try:
        pieces = itertools.chain([b"a\n"], itertools.repeat(b"y" * 65536, 500), [b"\nb\n"])  # a 32 MB line
        items, stream = await _read_pipe(pieces, max_line=1_000_000, on_bad="skip")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert items == ["a", "b"] and stream.skipped == 1
    assert peak < 8_000_000  # the 1 MB kept at most, the pipe's chunks, never the 32 MB line


@pytest.mark.asyncio
async def test_an_over_long_line_costs_at_most_max_line() -> None:
    """Going over ``max_line`` keeps the first KiB without joining the bytes held so far: the memory a
    runaway line takes is ``max_line`` (as docs/cli.md says), not twice or three times that."""
    max_line = 8_000_000
    tracemalloc.start()
    try:
        pieces = itertools.chain(itertools.repeat(b"y" * 65536, 500), [b"\nb\n"])  # a 32 MB line
        items, stream = await _read_pipe(pieces, max_line=max_line, on_bad="skip")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert items == ["b"] and stream.skipped == 1
    assert peak < 1.25 * max_line


BAD_INPUT = b'{"i": 1}\n' + b'{"long": "' + b"z" * 5000 + b'"}\n{"i": 2}\nnot json\n\xff\xfe\n{"i": 3}\n'


@pytest.mark.asyncio
async def test_bad_lines_fail_by_default_naming_source_and_line() -> None:
    too_long = r"file descriptor \d+, line 2: longer than 1000 bytes \(5012 bytes; --max-line, or max_line=, raises"
    with pytest.raises(aiod4p.InputError, match=too_long):
        await _read_pipe(BAD_INPUT, json=True, max_line=1000)
    with pytest.raises(aiod4p.InputError, match=r"file descriptor \d+, line 4: not valid JSON"):
        await _read_pipe(BAD_INPUT, json=True)


@pytest.mark.asyncio
async def test_bad_lines_skipped_with_a_warning_and_a_count(caplog: pytest.LogCaptureFixture) -> None:
    items, stream = await _read_pipe(BAD_INPUT, json=True, max_line=1000, on_bad="skip")
    assert items == [{"i": 1}, {"i": 2}, {"i": 3}]
    assert stream.skipped == 3
    warnings = [r.getMessage() for r in caplog.records if r.name == "aiod4p.sources"]
    assert len(warnings) == 3
    assert (
        "line 2: longer than 1000 bytes (5012 bytes; --max-line, or max_line=, raises the limit); line skipped"
        in warnings[0]
    )
    assert "line 4: not valid JSON" in warnings[1] and "line 5: not UTF-8 (byte 0: invalid start byte)" in warnings[2]


@pytest.mark.asyncio
async def test_a_flood_of_bad_lines_warns_ten_times_and_counts_them_all(caplog: pytest.LogCaptureFixture) -> None:
    """A binary file into ``on_bad="skip"`` (388,650 bad lines for 100 MB of random bytes): a warning for each
    of the first 10, which says the others are only counted; the count has them all."""
    items, stream = await _read_pipe(b"\xff\n" * 1000 + b"1\n", json=True, on_bad="skip")
    assert items == [1] and stream.skipped == 1000
    warnings = [r.getMessage() for r in caplog.records if r.name == "aiod4p.sources"]
    assert [re.search(r"line (\d+):", w)[1] for w in warnings] == [str(n) for n in range(1, 11)]  # type: ignore[index]
    assert warnings[-1].endswith("; further bad lines are skipped without a warning, and counted")


@pytest.mark.asyncio
async def test_bad_lines_go_to_the_dead_letter_callback() -> None:
    letters: list[dict[str, Any]] = []
    items, stream = await _read_pipe(
        BAD_INPUT, json=True, max_line=1000, on_bad="dead-letter", dead_letter=letters.append
    )
    assert items == [{"i": 1}, {"i": 2}, {"i": 3}] and stream.skipped == 3
    assert [(d["line"], d["size"]) for d in letters] == [(2, 5012), (4, 8), (5, 2)]
    assert letters[0]["text"] == ('{"long": "' + "z" * 5000)[:1024] and letters[1]["text"] == "not json"
    assert letters[2]["text"] == "\ufffd\ufffd" and letters[0]["source"].startswith("file descriptor")


# A line with a UTF-8 byte-order mark, three that are not UTF-8 (json tells UTF-16 and UTF-32 by their first
# bytes; Latin-1), one that is.
NOT_UTF8_INPUT = b"\n".join(
    [
        b'\xef\xbb\xbf{"i": 1}',
        '"utf-16"'.encode("utf-16"),
        '"utf-32"'.encode("utf-32"),
        b'"caf\xe9"',
        b'{"i": "\xc3\xa9"}',
    ]
)
NOT_UTF8_ERRORS = [
    (2, "not UTF-8 (byte 0: invalid start byte)"),
    (3, "not UTF-8 (byte 0: invalid start byte)"),
    (4, "not UTF-8 (byte 4: invalid continuation byte)"),
]


@pytest.mark.parametrize("on_bad", ["fail", "skip", "dead-letter"])
async def test_a_json_line_that_is_not_utf8_is_a_bad_line_saying_so(
    on_bad: str, caplog: pytest.LogCaptureFixture
) -> None:
    """JSON lines went to ``json.loads`` as bytes, which reads UTF-16 and UTF-32 too: such lines were items, and
    other bytes were "not valid JSON". A line that is not UTF-8 is a bad line, said so; a byte-order mark is
    ignored, as before."""
    letters: list[dict[str, Any]] = []
    if on_bad == "fail":
        with pytest.raises(aiod4p.InputError) as failed:
            await _read_pipe(NOT_UTF8_INPUT, json=True)
        assert re.fullmatch(
            r"file descriptor \d+, line 2: not UTF-8 \(byte 0: invalid start byte\): b'\\xff\\xfe\"\\x00u.*'",
            str(failed.value),
        )
        return
    items, stream = await _read_pipe(NOT_UTF8_INPUT, json=True, on_bad=on_bad, dead_letter=letters.append)
    assert items == [{"i": 1}, {"i": "\u00e9"}] and stream.skipped == 3
    if on_bad == "dead-letter":
        assert [(letter["line"], letter["error"]) for letter in letters] == NOT_UTF8_ERRORS
        assert letters[2]["text"] == '"caf\ufffd"'
    else:
        warnings = [r.getMessage() for r in caplog.records if r.name == "aiod4p.sources"]
        assert [re.search(r"line (\d+): (.*); line skipped", w).groups() for w in warnings] == [  # type: ignore[union-attr]
            (str(line), error) for line, error in NOT_UTF8_ERRORS
        ]


def test_line_options_are_checked() -> None:
    with pytest.raises(ValueError, match="on_bad must be one of fail, skip, dead-letter, not 'drop'"):
        LineStream(on_bad="drop")
    with pytest.raises(ValueError, match=r"LinesSource: max_line \(bytes\) must be at least 1, not 0"):
        LinesSource(max_line=0)


@pytest.mark.parametrize("mapping", ["simple", "async", "multi"])
def test_skipped_lines_count_in_the_statistics(tmp_path: Path, mapping: str) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(BAD_INPUT)
    source = LinesSource(path, json=True, max_line=1000, on_bad="skip")
    run = aiod4p.start(source_graph(source), mapping=mapping, workers=2 if mapping == "multi" else None)
    assert len(asyncio.run(run.results())) == 3
    assert {(entry.pe, entry.skipped) for entry in run.stats if entry.skipped} == {(source.id, 3)}


@pytest.mark.parametrize("mapping", ["simple", "async", "multi"])
def test_lines_source_dead_letters_are_results(tmp_path: Path, mapping: str) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(BAD_INPUT)
    source = LinesSource(path, json=True, max_line=1000, on_bad="dead-letter")
    results = aiod4p.run(source_graph(source), mapping=mapping, workers=2 if mapping == "multi" else None)
    by_port: dict[tuple[str, str], list[Any]] = {(r.pe, r.port): [] for r in results.records}
    for record in results.records:
        by_port[(record.pe, record.port)].append(record.data)
    letters = by_port.pop((source.id, "dead_letter"))
    assert sorted(d["line"] for d in letters) == [2, 4, 5]
    assert [sorted(d["i"] for d in items) for items in by_port.values()] == [[1, 2, 3]]


@pytest.mark.parametrize("on_bad", ["skip", "dead-letter"])
@pytest.mark.asyncio
async def test_tcp_source_bad_lines(on_bad: str) -> None:
    listening: asyncio.Future[tuple[str, int]] = asyncio.get_running_loop().create_future()
    source = TCPSource(port=0, json=True, connections=1, on_listen=listening.set_result, max_line=1000, on_bad=on_bad)
    run = aiod4p.start(source_graph(source))
    async with asyncio.timeout(20), run:
        results = asyncio.ensure_future(run.results())
        _, writer = await asyncio.open_connection(*await listening)
        writer.write(BAD_INPUT)
        await writer.drain()
        writer.close()
        await writer.wait_closed()
        records = (await results).records
    good = [r.data["i"] for r in records if r.port == "output"]
    letters = [r.data["line"] for r in records if r.port == "dead_letter"]
    assert sorted(good) == [1, 2, 3]
    assert letters == ([2, 4, 5] if on_bad == "dead-letter" else [])


@pytest.mark.asyncio
async def test_tcp_source_fails_on_a_bad_line_by_default() -> None:
    listening: asyncio.Future[tuple[str, int]] = asyncio.get_running_loop().create_future()
    source = TCPSource(port=0, json=True, connections=1, on_listen=listening.set_result, max_line=1000)
    run = aiod4p.start(source_graph(source))
    with pytest.raises(
        PEError, match=r"TCP client 127\.0\.0\.1:\d+ of 127\.0\.0\.1:\d+, line 2: longer than 1000 bytes"
    ):
        async with asyncio.timeout(20), run:
            results = asyncio.ensure_future(run.results())
            _, writer = await asyncio.open_connection(*await listening)
            writer.write(BAD_INPUT)
            await writer.drain()
            writer.close()
            await writer.wait_closed()
            await results


def _reset_on_close(writer: asyncio.StreamWriter) -> None:
    """Make closing ``writer`` reset its connection (``SO_LINGER`` 0), as a client killed with unread bytes does."""
    writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


async def _two_clients(stream: SocketStream, *, reset: bool = False) -> tuple[list[Any], str]:
    """One client of ``stream`` sends two lines and dies in the middle of a third (closing its connection, or
    resetting it: ``reset``); another sends two lines. The items, and the address of the first."""
    async with asyncio.timeout(20):
        items, first, address = await _listening(stream)
        _, dying = await asyncio.open_connection(*address)
        dying.write(b'{"c": 0}\n{"c": 1}\n{"c": ')
        peer = _endpoint(dying.get_extra_info("sockname"))
        if reset:
            _reset_on_close(dying)
        dying.close()
        _, other = await asyncio.open_connection(*address)
        other.write(b'{"c": 2}\n{"c": 3}\n')
        other.close()
        return [await first, *[item async for item in items]], peer


_ENDED = "the connection ended mid-line"
_RESET = "the connection was lost mid-line: Connection reset by peer"


@pytest.mark.parametrize(("reset", "why"), [(False, _ENDED), (True, _RESET)])
async def test_a_client_that_dies_mid_line_fails_the_stream_by_default_naming_it(reset: bool, why: str) -> None:
    """The unterminated fragment of a client that died was taken as a line: its JSON error ("not valid JSON")
    ended a multi-client ingestion without saying that the connection had ended mid-line. A client that reset
    its connection (killed with unread data, ``SO_LINGER`` 0) left no error at all: its fragment was lost."""
    with pytest.raises(aiod4p.InputError) as failed:
        await _two_clients(SocketStream(json=True, connections=2), reset=reset)
    assert re.fullmatch(
        rf"TCP client 127\.0\.0\.1:\d+ of 127\.0\.0\.1:\d+, line 3: {why}"
        r" \(6 bytes without a newline\): b'\{\"c\": '",
        str(failed.value),
    )


@pytest.mark.parametrize(("reset", "why"), [(False, _ENDED), (True, _RESET)])
@pytest.mark.parametrize("on_bad", ["skip", "dead-letter"])
async def test_a_client_that_dies_mid_line_leaves_a_bad_line(
    on_bad: str, reset: bool, why: str, caplog: pytest.LogCaptureFixture
) -> None:
    letters: list[dict[str, Any]] = []
    stream = SocketStream(json=True, connections=2, on_bad=on_bad, dead_letter=letters.append)
    items, peer = await _two_clients(stream, reset=reset)
    assert sorted(item["c"] for item in items) == [0, 1, 2, 3] and stream.skipped == 1
    if on_bad == "dead-letter":
        [letter] = letters
        assert letter["line"] == 3 and letter["text"] == '{"c": ' and letter["size"] == 6
        assert letter["source"].startswith(f"TCP client {peer} of ")
        assert letter["error"] == f"{why} (6 bytes without a newline)"
    else:
        assert not letters
        assert f"TCP client {peer} of " in caplog.text and f"line 3: {why}" in caplog.text


@pytest.mark.parametrize("reset", [False, True])
@pytest.mark.parametrize(("as_json", "sent"), [(False, b"abc\nlast"), (True, b'"abc"\n{"last": 1}')])
async def test_a_line_not_ended_when_the_client_closed_is_a_line_when_it_is_whole(
    as_json: bool, sent: bytes, reset: bool
) -> None:
    """As a file's last line (`printf 'a\\nb' | nc`): text, or a JSON line that is valid; only a JSON line cut off is
    a bad line. So too when the client reset the connection: its last line was lost."""
    stream = SocketStream(connections=1, json=as_json)
    async with asyncio.timeout(20):
        items, first, address = await _listening(stream)
        _, writer = await asyncio.open_connection(*address)
        writer.write(sent)
        if reset:
            _reset_on_close(writer)
        writer.close()
        got = [await first, *[item async for item in items]]
    assert got == (["abc", {"last": 1}] if as_json else ["abc", "last"]) and stream.skipped == 0


async def test_a_drain_ends_a_datagram_stream_whose_sender_keeps_sending() -> None:
    """Datagrams that come after the drain are not received: a sender faster than the run cannot keep it going."""
    stream = DatagramStream("127.0.0.1", 0, max_pending=100)
    async with asyncio.timeout(20):
        items, first, address = await _listening(stream)
        sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sender.setblocking(False)

        async def keep_sending() -> None:
            while True:
                for _ in range(50):  # more each turn than the reader takes
                    with contextlib.suppress(BlockingIOError):
                        sender.sendto(b"ping\n", address)
                await asyncio.sleep(0)

        sending = asyncio.ensure_future(keep_sending())
        await first
        for _ in range(100):
            await anext(items)
        stream.drain()
        after = []
        async for item in items:
            after.append(item)
            await asyncio.sleep(0)  # as a workflow does: the loop turns, datagrams come in
        sending.cancel()
        sender.close()
    assert len(after) <= 100  # what was received before the drain, at most
