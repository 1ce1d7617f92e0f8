"""Internal extinction of galaxies (Filgueira et al., IJHPCA 2017, second use case).

    aiod4p run examples/science/astro.py -i 1 --mapping async
    aiod4p run examples/science/astro.py -d '{"ReadCatalogue": [{"galaxies": 1000}]}' -m multi -n 4

Galaxies are read from a catalogue (a VOTable, read with astropy); each one is
looked up in a Virtual-Observatory-like service for its morphological type
``T`` and axis ratio ``logr25``; the internal extinction follows from both
(:func:`internal_extinction`), and the last PE gives statistics per
morphological type.

The service is a small HTTP server on 127.0.0.1 that answers like VizieR
(a VOTable per query) after a real network latency (:data:`LATENCY`). Each
process that queries starts its own copy (:func:`service_url`), serving the
same deterministic catalogue. The queries are the bottleneck, as in the
paper: :class:`QueryService` is an ``async def`` PE with
:data:`CONCURRENCY` instances, so queries overlap in one event loop, where
dispel4py's blocking calls (:func:`query_blocking`) wait one after another.

Size knob: ``galaxies`` (and ``seed``). Each call of the root reads the next
galaxies of the catalogue (``-i 2``: CIG 0001 to CIG 0400, as ``galaxies: 400``
once); a galaxy that an earlier call emitted fails the run (it would be counted twice).
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import math
import os
import threading
import time
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import astropy
import numpy as np
from astropy.io.votable import parse_single_table
from astropy.io.votable.tree import Field, Resource, TableElement, VOTableFile

from aiod4p import GenericPE, IterativePE, WorkflowGraph, group_by

LATENCY = 0.02  # seconds the service takes to answer one query
CONCURRENCY = 16  # instances of the query PE: queries in flight at once
DEFAULTS = {"galaxies": 200, "seed": 2017}
# each setting's kind and least value
LEAST = {"galaxies": (int, 1), "seed": (int, 0)}
TYPES = range(-5, 11)  # de Vaucouleurs' morphological types T

# -- the synthetic catalogue and the service's data ----------------------------------------


def galaxy_name(index: int) -> str:
    return f"CIG {index + 1:04d}"


def catalogue(galaxies: int, seed: int, first: int = 0) -> bytes:
    """A VOTable catalogue of ``galaxies`` galaxies (name, right ascension, declination), written by astropy:
    those from index ``first`` of the catalogue of ``seed`` (the rows of ``catalogue(first + galaxies, seed)``
    that ``catalogue(first, seed)`` lacks)."""
    rng = np.random.default_rng(seed)
    rng.random(2 * first)  # the positions of the galaxies before ``first``
    votable = VOTableFile()
    resource = Resource()
    votable.resources.append(resource)
    table = TableElement(votable, name="galaxies")
    resource.tables.append(table)
    table.fields.extend(
        [
            Field(votable, name="name", datatype="char", arraysize="*"),
            Field(votable, name="ra", datatype="double", unit="deg"),
            Field(votable, name="dec", datatype="double", unit="deg"),
        ]
    )
    table.create_arrays(galaxies)
    for index in range(galaxies):
        table.array[index] = (galaxy_name(first + index), rng.uniform(0, 360), rng.uniform(-30, 60))
    out = io.BytesIO()
    votable.to_xml(out)
    return out.getvalue()


def service_record(name: str) -> tuple[int, float]:
    """What the service knows of galaxy ``name``: its morphological type and ``logr25`` (deterministic)."""
    digest = hashlib.blake2b(name.encode(), digest_size=8).digest()
    t = TYPES[digest[0] % len(TYPES)]
    logr25 = round(0.02 + 0.9 * int.from_bytes(digest[1:4], "big") / 2**24, 3)
    return t, logr25


def internal_extinction(t: int, logr25: float) -> float:
    """Internal extinction in the B band, magnitudes: ``gamma(T) * logr25``.

    ``gamma(T) = 1.5 - 0.03 (T - 5)^2`` for spirals and irregulars (T >= 0,
    HyperLeda's form), 0 for early types (T < 0, no dust lane).
    """
    gamma = 1.5 - 0.03 * (t - 5) ** 2 if t >= 0 else 0.0
    return round(max(gamma, 0.0) * logr25, 4)


# -- the VO-like service -------------------------------------------------------------------------

_RESPONSE = """<?xml version="1.0" encoding="utf-8"?>
<VOTABLE version="1.4" xmlns="http://www.ivoa.net/xml/VOTable/v1.3">
 <RESOURCE><TABLE name="result">
  <FIELD name="name" datatype="char" arraysize="*"/>
  <FIELD name="T" datatype="int"/>
  <FIELD name="logr25" datatype="double"/>
  <DATA><TABLEDATA><TR><TD>{name}</TD><TD>{t}</TD><TD>{logr25}</TD></TR></TABLEDATA></DATA>
 </TABLE></RESOURCE>
</VOTABLE>
"""


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
        name = query.get("name", [""])[0]
        time.sleep(LATENCY)  # the network and the remote database
        if not name:
            self.send_error(400, "the query needs ?name=")
            return
        t, logr25 = service_record(name)
        body = _RESPONSE.format(name=name, t=t, logr25=logr25).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/x-votable+xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128


_services: dict[int, str] = {}
_lock = threading.Lock()


def service_url() -> str:
    """The URL of this process's service, started on 127.0.0.1 (a free port) on first use."""
    with _lock:
        pid = os.getpid()  # a forked worker has the parent's dict but not its serving thread
        if pid not in _services:
            server = _Server(("127.0.0.1", 0), _Handler)
            threading.Thread(target=server.serve_forever, name="vo-service", daemon=True).start()
            _services[pid] = f"http://127.0.0.1:{server.server_address[1]}/vizier"
        return _services[pid]


def parse_answer(body: bytes) -> tuple[str, int, float]:
    """The ``(name, T, logr25)`` of one VOTable answer, read with astropy."""
    row = parse_single_table(io.BytesIO(body)).array[0]
    return str(row["name"]), int(row["T"]), float(row["logr25"])


def query_blocking(url: str, name: str) -> tuple[str, int, float]:
    """One query, dispel4py style: the caller waits, doing nothing else."""
    with urllib.request.urlopen(f"{url}?{urllib.parse.urlencode({'name': name})}", timeout=30) as answer:
        return parse_answer(answer.read())


async def query_async(url: str, name: str) -> tuple[str, int, float]:
    """One query over asyncio streams (HTTP/1.0, one connection per query): other queries run meanwhile.

    Raises:
        OSError: the service answered with an error status or not at all.
    """
    parts = urllib.parse.urlsplit(url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    try:
        target = f"{parts.path}?{urllib.parse.urlencode({'name': name})}"
        writer.write(f"GET {target} HTTP/1.0\r\nHost: {parts.hostname}\r\n\r\n".encode())
        await writer.drain()
        answer = await reader.read()
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    status = head.split(b"\r\n", 1)[0]
    if b" 200 " not in status:
        raise OSError(f"the service answered {status.decode(errors='replace')} for {name!r}")
    return parse_answer(body)


def settings(given: Any) -> dict[str, Any]:
    """:data:`DEFAULTS` updated with ``given``, the root's input: a dict of some of its settings
    (or ``path``, a VOTable file).

    Raises:
        ValueError: ``given`` is not a dict, names a setting :data:`DEFAULTS` lacks, or gives one a value
            that is not a number of :data:`LEAST`'s kind and at least its least value.
    """
    if not isinstance(given, dict):
        raise ValueError(f"the input {given!r} is not a dict of settings ({', '.join(DEFAULTS)})")
    unknown = [name for name in given if name not in DEFAULTS and name != "path"]
    if unknown:
        raise ValueError(f"unknown setting {unknown[0]!r}: the settings are {', '.join([*DEFAULTS, 'path'])}")
    size = {**DEFAULTS, **given}
    for name, (kind, least) in LEAST.items():
        value = size[name]
        number = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        if not number or value < least or (kind is int and value != int(value)):
            whole = "a whole number" if kind is int else "a number"
            raise ValueError(f"{name} must be {whole} of at least {least:g}, not {value!r}")
        size[name] = kind(value)
    if not isinstance(size.get("path", ""), str):
        raise ValueError(f"path must be the name of a VOTable file, not {size['path']!r}")
    return size


# -- the workflow ------------------------------------------------------------------------------


class ReadCatalogue(GenericPE):
    """Emits ``(name, ra, dec)`` for every galaxy of the catalogue.

    The input (optional) is ``{"galaxies": N, "seed": S}`` for a synthetic
    catalogue, or ``{"path": FILE}`` for a VOTable file. Each synthetic call
    reads the galaxies that follow the previous call's (``-i 2``: CIG 0001 to
    CIG 0400, as ``galaxies: 400`` once).

    Raises:
        ValueError: the catalogue cannot be read, or has a galaxy that an earlier call emitted already
            (the same file read twice, say): it would be counted twice.
    """

    def __init__(self) -> None:
        super().__init__(inputs=["size"], outputs=["output"])
        self.next_galaxy = 0  # the index of the next synthetic call's first galaxy
        self.emitted: set[str] = set()  # the names emitted so far: each galaxy once

    def process(self, inputs: dict[str, Any]) -> None:
        size = settings(inputs.get("size", {}))
        if "path" in size:
            source: Any = size["path"]
        else:
            first, self.next_galaxy = self.next_galaxy, self.next_galaxy + int(size["galaxies"])
            source = io.BytesIO(catalogue(int(size["galaxies"]), int(size["seed"]), first))
        self.annotate(**{k: str(v) for k, v in size.items()}, astropy=astropy.__version__)
        try:
            table = parse_single_table(source).array
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot read the catalogue {size.get('path', '')}: {exc}") from exc
        names = [str(row["name"]) for row in table]
        again = next((name for name in names if name in self.emitted), None)
        if again is not None:
            where = f"the catalogue {size['path']}" if "path" in size else "the synthetic catalogue"
            raise ValueError(
                f"{where} has galaxy {again!r}, which an earlier call emitted: each galaxy is counted once"
                " (a file read twice?)"
            )
        self.emitted.update(names)
        for name, row in zip(names, table, strict=True):
            self.write("output", (name, float(row["ra"]), float(row["dec"])))


class QueryService(IterativePE):
    """Looks a galaxy up in the service (``async def``: the instances' queries overlap)."""

    def __init__(self) -> None:
        super().__init__(parallelism=CONCURRENCY)

    def preprocess(self) -> None:
        self.url = service_url()
        self.annotate(service=self.url, latency_s=LATENCY)

    async def process_item(self, galaxy: tuple[str, float, float]) -> tuple[str, int, float]:
        return await query_async(self.url, galaxy[0])


class Extinction(IterativePE):
    """``(name, T, logr25)`` to ``(name, T, A_int)``."""

    def process_item(self, record: tuple[str, int, float]) -> tuple[str, int, float]:
        name, t, logr25 = record
        return name, t, internal_extinction(t, logr25)


def summarise(t: int, values: list[float]) -> tuple[int, int, float, float]:
    """``(T, galaxies, mean A_int, standard deviation)``; exact sums, so the order of arrival does not matter."""
    mean = math.fsum(values) / len(values)
    spread = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / len(values))
    return t, len(values), round(mean, 4), round(spread, 4)


class StatsPerType(GenericPE):
    """Statistics of the internal extinction per morphological type (grouped by ``T``)."""

    def __init__(self) -> None:
        super().__init__(inputs=[("input", group_by(1))], outputs=["output"])
        self.values: dict[int, list[float]] = {}

    def process(self, inputs: dict[str, Any]) -> None:
        _, t, extinction = inputs["input"]
        self.values.setdefault(t, []).append(extinction)
        self.remember(t)

    def postprocess(self) -> None:
        for t in sorted(self.values):
            self.recall(t)
            self.write("output", summarise(t, self.values[t]))


def build(graph: WorkflowGraph | None = None) -> WorkflowGraph:
    """The workflow, added to ``graph`` when given (several workflows can share one run)."""
    graph = graph if graph is not None else WorkflowGraph()
    read, query, extinction, stats = ReadCatalogue(), QueryService(), Extinction(), StatsPerType()
    graph.connect(read, "output", query, "input")
    graph.connect(query, "output", extinction, "input")
    graph.connect(extinction, "output", stats, "input")
    return graph


graph = build()
