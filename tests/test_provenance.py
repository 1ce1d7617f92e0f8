"""Provenance: W3C PROV records of what each PE invocation used and generated, on every mapping."""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import workflows as wf
from helpers import ROOT, TIMES10_FLOW, aiod4p_cli, json_lines, numbers_flow
from hypothesis import given, settings
from hypothesis import strategies as st

import aiod4p
from aiod4p import GenericPE, IterativePE, PlanOptions, ProducerPE, Results, WorkflowGraph, _provenance, group_by
from aiod4p._provenance import _TERMS, DIGESTED_BYTES, Tagged, _replacing, value_repr

prov_model = pytest.importorskip(
    "prov.model", reason="provenance needs the prov package: pip install 'aiod4p[provenance]'"
)

BIN = Path(sys.executable).parent
LINES = [
    "the quick brown fox",
    "a lazy dog sleeps",
    "the dog barks at the fox",
    "fox runs home",
    "over the hill and far away",
    "nothing here",
]


class ReadLines(ProducerPE):
    def produce(self) -> Any:
        self.annotate(source="LINES", version="1.0")
        yield from LINES


class SplitWords(IterativePE):
    def process_item(self, line: str) -> None:
        assert type(line) is not Tagged  # a PE sees plain values
        for word in line.split():
            self.write("output", (word, 1))


class CountWords(GenericPE):
    """Counts per word and emits at the end; remember/recall make each count's lineage exact."""

    def __init__(self, exact: bool = True) -> None:
        super().__init__(inputs=[("input", group_by(0))], outputs=["output"], parallelism=3)
        self.counts: Counter[str] = Counter()
        self.exact = exact

    def process(self, inputs: dict[str, Any]) -> None:
        word, count = inputs["input"]
        self.counts[word] += count
        if self.exact:
            self.remember(word)

    def postprocess(self) -> None:
        for word, count in sorted(self.counts.items()):
            if self.exact:
                self.recall(word)
            self.write("output", (word, count))


def word_count(exact: bool = True) -> WorkflowGraph:
    graph = WorkflowGraph()
    lines, words, counts = ReadLines(), SplitWords(), CountWords(exact)
    graph.connect(lines, "output", words, "input")
    graph.connect(words, "output", counts, "input")
    return graph


def run_recorded(
    graph: WorkflowGraph, inputs: Any, mapping: str, workers: int | None, level: str | None
) -> tuple[Results, list[aiod4p.InstanceStats]]:
    async def go() -> tuple[Results, list[aiod4p.InstanceStats]]:
        async with aiod4p.start(graph, inputs, mapping=mapping, workers=workers, provenance=level) as run:
            results = await run.results()
        return results, run.stats

    return asyncio.run(go())


def record(tmp_path: Path, mapping: str, workers: int | None, level: str = "item", exact: bool = True) -> Path:
    results, stats = run_recorded(word_count(exact), 1, mapping, workers, level)
    assert sorted(results.data()) == sorted(Counter(w for line in LINES for w in line.split()).items())
    return Path(aiod4p.write_provenance(stats, str(tmp_path / "wc.json")))


class NamesItsFile(ProducerPE):
    """Annotates its agent with a file name that is not valid UTF-8 (as os.fsdecode makes it), and makes one item."""

    def preprocess(self) -> None:
        self.annotate(file="caf\udce9.csv")

    def produce(self) -> str:
        return "row"


class AnnotatesWithNames(ProducerPE):
    def preprocess(self) -> None:
        self.annotate(**{"ns:seis": "http://seis-prov.eu/ns", "run.id": "7", "a-b": "x"})

    def produce(self) -> str:
        return "row"


class AnnotatesWithASpace(ProducerPE):
    def preprocess(self) -> None:
        self.annotate(**{"file name": "a.csv"})

    def produce(self) -> str:
        return "row"


@pytest.mark.parametrize("level", [None, "item"])
def test_an_annotation_whose_name_is_not_an_identifier_fails_naming_it(level: str | None) -> None:
    """prov 3.2.3 wrote `file name` as a qualified name with a warning that 3.3.0 will refuse it (the file would
    not be read back): the PE fails at once, with or without provenance, naming the name and one to use."""
    graph = WorkflowGraph()
    graph.add(AnnotatesWithASpace())
    with pytest.raises(aiod4p.PEError, match=r"annotate\(\): 'file name' is not a name .* call it, say, 'file_name'"):
        aiod4p.run(graph, 1, provenance=level)


def test_annotation_names_that_prov_writes_are_kept(tmp_path: Path) -> None:
    """Qualified and dotted names (dispel4py's provenance annotates `ns:seis`) are PROV names: only a space and
    what PROV-N cannot write are refused."""
    graph = WorkflowGraph()
    graph.add(pe := AnnotatesWithNames())
    _, stats = run_recorded(graph, 1, "async", None, "pe")
    assert next(entry.provenance.annotations for entry in stats if entry.pe == pe.id) == {
        "ns:seis": "http://seis-prov.eu/ns",
        "run.id": "7",
        "a-b": "x",
    }
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # prov warns of the names it will refuse
        path = aiod4p.write_provenance(stats, str(tmp_path / "run.provn"))
        aiod4p.write_provenance(stats, str(tmp_path / "run.json"))
    assert "http://seis-prov.eu/ns" in Path(path).read_text()


class AnnotatesWithNumbers(ProducerPE):
    def preprocess(self) -> None:
        import numpy as np

        self.annotate(threshold=0.5, stations=24, dry_run=False, gain=np.float32(1.5), seed=np.int64(2017), ok=np.True_)
        self.annotate(missing=float("nan"), version="1.0", path=Path("in.csv"))

    def produce(self) -> str:
        return "row"


@pytest.mark.parametrize("mapping", ["async", "multi"])
def test_annotations_keep_numbers_and_booleans_typed(tmp_path: Path, mapping: str) -> None:
    # threshold=0.5 was written "0.5", a string: a PROV query for the runs with threshold > 0.4 found none.
    graph = WorkflowGraph()
    graph.add(AnnotatesWithNumbers())
    _, stats = run_recorded(graph, 1, mapping, 1 if mapping == "multi" else None, "item")
    kept = {
        "threshold": 0.5, "stations": 24, "dry_run": False, "gain": 1.5, "seed": 2017, "ok": True, "version": "1.0",
        "path": "in.csv",
    }  # fmt: skip
    for extension in (".json", ".provn", ".xml"):
        path = aiod4p.write_provenance(stats, str(tmp_path / f"run{extension}"))
        doc = prov_model.ProvDocument.deserialize(source=path, format=extension[1:])
        agents = doc.get_records(prov_model.ProvAgent)
        agent = next(record for record in agents if str(record.identifier).endswith(".0"))
        got = {name.localpart: value for name, value in agent.attributes if name.namespace.prefix == "aiod4p"}
        values = {name: got[name].value if isinstance(got[name], prov_model.Literal) else got[name] for name in kept}
        assert {name: (type(value), value) for name, value in values.items()} == {
            name: (type(value), value) for name, value in kept.items()
        }, extension
        missing = got["missing"]
        assert math.isnan(float(getattr(missing, "value", missing))), extension
    assert '"aiod4p:missing": {"$": "NaN", "type": "xsd:double"}' in (tmp_path / "run.json").read_text()  # as prov


def test_a_prov_json_file_keeps_a_value_that_is_not_valid_utf8(tmp_path: Path) -> None:
    # The record-by-record writer wrote UTF-8 and failed on a lone surrogate with a bare UnicodeEncodeError,
    # leaving an empty file; prov's own writer escapes it, as this one now does.
    graph = WorkflowGraph()
    graph.add(NamesItsFile())
    _, stats = run_recorded(graph, 1, "async", None, "item")
    path = aiod4p.write_provenance(stats, str(tmp_path / "run.json"))
    assert prov_model.ProvDocument.deserialize(source=path, format="json") == aiod4p.provenance_document(stats)
    assert "caf\\udce9.csv" in Path(path).read_text(encoding="ascii")


def test_an_unwritable_prov_json_file_is_named(tmp_path: Path) -> None:
    _, stats = run_recorded(word_count(), 1, "async", None, "item")
    with pytest.raises(aiod4p.Aiod4pError, match=r"cannot write provenance to .*missing/run.json: No such file"):
        aiod4p.write_provenance(stats, str(tmp_path / "missing" / "run.json"))


@pytest.mark.parametrize("level", ["item", "pe"])
def test_a_prov_json_file_written_record_by_record_holds_the_document(tmp_path: Path, level: str) -> None:
    """PROV-JSON files are written record by record: prov's document took a few kB a record (the word count
    example's 2,000 lines: 848 MB and 14 s, against 65 MB and 2.7 s now). prov reads back the same document."""
    _, stats = run_recorded(word_count(), 1, "multi", 2, level)
    path = aiod4p.write_provenance(stats, str(tmp_path / "wc.json"))
    assert prov_model.ProvDocument.deserialize(source=path, format="json") == aiod4p.provenance_document(stats)


@pytest.mark.parametrize(("mapping", "workers"), [("simple", None), ("multi", 3), ("mpi", 3)])
def test_a_word_count_traces_back_to_exactly_the_lines_with_the_word(
    tmp_path: Path, mapping: str, workers: int | None
) -> None:
    path = record(tmp_path, mapping, workers)
    prov_model.ProvDocument.deserialize(source=str(path), format="json")  # valid PROV-JSON, read back by prov
    lineage = aiod4p.read_lineage(str(path))
    results = lineage.results()
    assert len(results) == len({w for line in LINES for w in line.split()})
    for entity in results:
        word = eval(lineage.values[entity])[0]  # the repr of (word, count)
        sources = sorted(lineage.values[s] for s in lineage.sources(entity))
        assert sources == sorted(repr(line) for line in LINES if word in line.split()), word


def test_prov_json_holds_agents_activities_and_relations(tmp_path: Path) -> None:
    path = record(tmp_path, "async", 2)
    document = json.loads(path.read_text())
    for key in ("agent", "activity", "entity", "used", "wasGeneratedBy", "wasDerivedFrom", "wasAssociatedWith"):
        assert document.get(key), key
    assert "actedOnBehalfOf" in document
    agents = document["agent"]
    reader = next(v for k, v in agents.items() if k.startswith("aiod4p:ReadLines") and "." in k)
    assert plain(reader["aiod4p:source"]) == "LINES"
    assert plain(reader["aiod4p:version"]) == "1.0"
    counters = sorted(k.rsplit(".", 1)[1] for k in agents if k.startswith("aiod4p:CountWords") and "." in k)
    assert counters == ["0", "1", "2"]  # an agent per instance, each acting for the PE's agent


def test_postprocess_outputs_derive_from_everything_the_instance_used_without_recall(tmp_path: Path) -> None:
    path = record(tmp_path, "simple", None, exact=False)
    lineage = aiod4p.read_lineage(str(path))
    for entity in lineage.results():
        assert len(lineage.sources(entity)) == len(LINES)  # the one instance saw a word of every line


class Readings(ProducerPE):
    """Emits ``(sensor, time, n)`` for 20 readings of two sensors."""

    def produce(self) -> Any:
        yield from (("ab"[n % 2], n * 0.3, n) for n in range(20))


@pytest.mark.parametrize(("mapping", "workers"), [("simple", None), ("multi", 2)])
def test_a_window_derives_from_exactly_its_items(tmp_path: Path, mapping: str, workers: int | None) -> None:
    # The window PEs recorded no state: a window written in process derived from its last item only, and one
    # written in postprocess (a partial window, or any time window still open) from every item of the instance.
    from aiod4p.windows import CountWindow, TimeWindow

    graph = WorkflowGraph()
    readings = Readings()
    windows = [
        CountWindow(3, key=0, name="count_keyed", parallelism=2),
        CountWindow(4, 3, name="count_sliding"),
        TimeWindow(1.0, 0.5, key=0, timestamp=1, name="time_sliding_keyed", parallelism=2),
    ]
    for window in windows:
        graph.connect(readings, "output", window, "input")
    _, stats = run_recorded(graph, 1, mapping, workers, "item")
    lineage = aiod4p.read_lineage(aiod4p.write_provenance(stats, str(tmp_path / "windows.json")))
    results = lineage.results()
    assert len(results) == 40
    for entity in results:
        window = eval(lineage.values[entity])  # the repr of the window's record
        sources = sorted(lineage.values[source] for source in lineage.sources(entity))
        assert sources == sorted(repr(item) for item in window["items"]), window


class Numbers(ProducerPE):
    def produce(self) -> Any:
        yield from [*range(10), 1, 1, 2]  # small ints: one object each, written more than once


class ByParity(GenericPE):
    def __init__(self) -> None:
        super().__init__(inputs=[("input", wf.Parity())], outputs=["output"], parallelism=2)
        self.seen: list[int] = []

    def process(self, inputs: dict[str, Any]) -> None:
        self.seen.append(inputs["input"])

    def postprocess(self) -> None:
        self.write("output", sorted(self.seen))


@pytest.mark.parametrize(("mapping", "workers"), [("async", 2), ("multi", 2)])
def test_a_grouping_of_ones_own_routes_the_values_at_level_item(
    tmp_path: Path, mapping: str, workers: int | None
) -> None:
    # Its router was handed the tagged items that travel: `item % 2` failed with a TypeError on Tagged.
    graph = WorkflowGraph()
    graph.connect(Numbers(), "output", ByParity(), "input")
    results, stats = run_recorded(graph, 1, mapping, workers, "item")
    assert sorted(results.data()) == [[0, 2, 2, 4, 6, 8], [1, 1, 1, 3, 5, 7, 9]]
    lineage = aiod4p.read_lineage(aiod4p.write_provenance(stats, str(tmp_path / "parity.json")))
    for entity in lineage.results():
        sources = [lineage.values[source] for source in lineage.sources(entity)]
        assert sorted(sources, key=int) == [repr(n) for n in eval(lineage.values[entity])]


class EvensAtTheEnd(GenericPE):
    """Remembers the even numbers only; at the end writes a record of the odd ones (none remembered) and the evens."""

    def __init__(self) -> None:
        super().__init__(inputs=["input"], outputs=["output"])
        self.evens: list[int] = []

    def process(self, inputs: dict[str, Any]) -> None:
        if inputs["input"] % 2 == 0:
            self.evens.append(inputs["input"])
            self.remember("even")

    def postprocess(self) -> None:
        self.recall("odd")
        self.write("output", ("odd", []))
        self.recall("even")
        self.write("output", ("even", self.evens))


@pytest.mark.parametrize("extension", [".json", ".xml"])
def test_what_is_written_after_recalling_nothing_derives_from_nothing(tmp_path: Path, extension: str) -> None:
    # It had no derivation, so it was read as derived from everything its postprocess used: every item.
    graph = WorkflowGraph()
    graph.connect(Numbers(), "output", EvensAtTheEnd(), "input")
    _, stats = run_recorded(graph, 1, "async", None, "item")
    lineage = aiod4p.read_lineage(aiod4p.write_provenance(stats, str(tmp_path / f"evens{extension}")))
    odd, even = (lineage.find(f"('{name}', ")[0] for name in ("odd", "even"))
    assert lineage.trace(odd) == [odd]
    assert sorted(lineage.values[source] for source in lineage.sources(even)) == ["0", "2", "2", "4", "6", "8"]


def plain(value: Any) -> Any:
    """A PROV-JSON value: plain, or typed as ``{"$": 6, "type": "xsd:int"}``."""
    return value["$"] if isinstance(value, dict) else value


def number(value: Any) -> int:
    return int(plain(value))


def test_level_pe_records_counts_per_port_and_no_items(tmp_path: Path) -> None:
    path = record(tmp_path, "multi", 2, level="pe")
    document = json.loads(path.read_text())
    activities = document["activity"]
    split = [v for k, v in activities.items() if k.startswith("aiod4p:SplitWords")]
    assert sum(number(a["aiod4p:in_input"]) for a in split) == len(LINES)
    assert sum(number(a["aiod4p:out_output"]) for a in split) == sum(len(line.split()) for line in LINES)
    entities = document["entity"]
    assert all(plain(v["prov:type"]) == "aiod4p:Stream" for v in entities.values())
    with pytest.raises(aiod4p.Aiod4pError, match="item-level"):
        aiod4p.read_lineage(str(path)).find("('the', 4)")


class _Sample:
    """A sample that counts how often its repr is made."""

    reprs = 0

    def __repr__(self) -> str:
        _Sample.reprs += 1
        return "s"


def test_an_entity_keeps_the_start_of_a_large_values_repr_without_making_the_whole() -> None:
    # The whole repr of each item was made, then cut: a 20 MB record took a second per item (21 s against 3 s).
    values = [1, "it's", "x" * 300, b"\x00" * 300, [1, (2,)], (), {"a": [1, {"b": "c" * 500}]}, [list(range(99))] * 3]
    assert [value_repr(value) for value in values] == [repr(value)[:200] for value in values]
    record = {"station": "ST01", "samples": [_Sample() for _ in range(100_000)], "raw": bytes(10**7)}
    assert value_repr(record) == ("{'station': 'ST01', 'samples': [" + ", ".join(["s"] * 100))[:200]
    assert _Sample.reprs < 100


def test_prov_n_and_prov_xml_by_extension(tmp_path: Path) -> None:
    _, stats = run_recorded(word_count(), 1, "simple", None, "item")
    doc = aiod4p.provenance_document(stats)
    provn = aiod4p.write_document(doc, str(tmp_path / "wc.provn"))
    assert Path(provn).read_text().startswith("document")
    xml = aiod4p.write_document(doc, str(tmp_path / "wc.xml"))
    assert aiod4p.read_lineage(xml).results()
    # prov 3.2.3 reads PROV-N back; the lineage said it could not, naming prov.
    try:
        lineage = aiod4p.read_lineage(provn)
    except aiod4p.Aiod4pError as refused:
        assert "this prov reads PROV-JSON and PROV-XML back, not PROV-N" in str(refused)
    else:
        assert lineage == aiod4p.read_lineage(xml)


def test_run_says_that_the_provenance_it_records_is_lost(caplog: pytest.LogCaptureFixture) -> None:
    # aiod4p.run(graph, provenance="item") recorded it and returned the results only: in a notebook, a scientist's
    # provenance was thrown away without a word.
    with caplog.at_level("WARNING", logger="aiod4p"):
        results = aiod4p.run(word_count(), 1, provenance="item")
    assert ("fox", 3) in results.data()
    lost = [record.getMessage() for record in caplog.records if "provenance is lost" in record.getMessage()]
    assert len(lost) == 1 and "aiod4p.start(..., provenance='item')" in lost[0], caplog.text
    assert "aiod4p.write_provenance(run.stats" in lost[0]
    caplog.clear()
    with caplog.at_level("WARNING", logger="aiod4p"):
        aiod4p.run(word_count(), 1)
    assert not caplog.records


def test_off_records_nothing() -> None:
    results, stats = run_recorded(word_count(), 1, "async", 2, None)
    assert all(entry.provenance is None for entry in stats)
    assert all(type(item) is not Tagged for item in results.data())
    with pytest.raises(aiod4p.Aiod4pError, match="no provenance"):
        aiod4p.provenance_document(stats)


def test_a_bad_level_is_rejected() -> None:
    with pytest.raises(ValueError, match="provenance level must be one of pe, item, not 'all'"):
        PlanOptions(provenance="all")


def test_storm_refuses_provenance_rather_than_emit_tagged_items() -> None:
    pytest.importorskip("streamparse", reason="the storm extra is not installed")
    with pytest.raises(aiod4p.Aiod4pError, match="not recorded on the storm mapping"):
        aiod4p.start(word_count(), 1, mapping="storm", provenance="item")


def test_statistics_json_leaves_provenance_out() -> None:
    _, stats = run_recorded(word_count(), 1, "simple", None, "item")
    assert "provenance" not in stats[0].to_dict()
    json.dumps([entry.to_dict() for entry in stats])


# -- the command line ------------------------------------------------------------------------


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "aiod4p"), *args], capture_output=True, text=True, timeout=60, cwd=cwd)


def test_cli_records_traces_and_draws(tmp_path: Path) -> None:
    workflow = Path(__file__).resolve()
    path = tmp_path / "wc.json"
    done = cli("run", f"{workflow}:word_count_graph", "-i", "1", "-m", "multi", "-n", "2", "-q",
               "--provenance", str(path), cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr
    listing = cli("provenance", str(path), cwd=tmp_path)
    assert listing.returncode == 0, listing.stderr
    assert "results" in listing.stdout and "('fox', 3)" in listing.stdout
    traced = cli("provenance", str(path), "--trace", "('fox', 3)", "--draw", str(tmp_path / "fox.dot"), cwd=tmp_path)
    assert traced.returncode == 0, traced.stderr
    assert "3 sources" in traced.stdout
    for line in ("the quick brown fox", "the dog barks at the fox", "fox runs home"):
        assert repr(line) in traced.stdout
    assert "lazy" not in traced.stdout
    dot = (tmp_path / "fox.dot").read_text()
    assert dot.startswith("digraph lineage") and "fox runs home" in dot
    # A drawing that cannot be made is refused before anything is printed; --draw without --trace draws nothing.
    bad = cli("provenance", str(path), "--trace", "('fox', 3)", "--draw", str(tmp_path / "fox.bad"), cwd=tmp_path)
    assert (bad.returncode, bad.stdout) == (2, "")
    assert bad.stderr.startswith(f"aiod4p: error: cannot draw a lineage to {tmp_path / 'fox.bad'}: the file name")
    nowhere = tmp_path / "no" / "fox.svg"
    unwritable = cli("provenance", str(path), "--trace", "('fox', 3)", "--draw", str(nowhere), cwd=tmp_path)
    assert (unwritable.returncode, unwritable.stdout) == (1, "")  # the trace was printed before the drawing failed
    assert f"cannot write the lineage's drawing to {nowhere}: No such file or directory" in unwritable.stderr
    untraced = cli("provenance", str(path), "--draw", str(tmp_path / "all.svg"), cwd=tmp_path)
    assert (untraced.returncode, untraced.stdout) == (2, "")
    assert untraced.stderr == "aiod4p: error: --draw draws the lineage of a result: give it with --trace RESULT\n"
    # ... as the usage says: --draw goes with --trace, as the README's and docs/cli.md's synopses have it.
    usage = cli("provenance", "--help", cwd=tmp_path).stdout
    assert usage.startswith("usage: aiod4p provenance [-h] FILE [--trace RESULT [--draw OUT]] [--debug]\n"), usage
    synopsis = "aiod4p provenance FILE.json [--trace RESULT [--draw FILE.svg]]\n"
    assert all(synopsis in (ROOT / doc).read_text() for doc in ("README.md", "docs/cli.md"))


def test_cli_listing_of_a_level_pe_file_says_it_holds_no_items(tmp_path: Path) -> None:
    # It said "9 entities, 0 results" alone, as if the run had given no results.
    workflow = Path(__file__).resolve()
    path = tmp_path / "wc.json"
    done = cli("run", f"{workflow}:word_count_graph", "-i", "1", "-q", "--provenance", str(path),
               "--provenance-level", "pe", cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr
    listing = cli("provenance", str(path), cwd=tmp_path)
    assert listing.returncode == 0, listing.stderr
    assert listing.stdout == (
        f"{path}: 3 entities, 0 results\n  recorded at level pe: each PE's streams and each instance's counts, not the"
        " items nor the results (--provenance-level item records them, to trace a result)\n"
    )
    item = tmp_path / "item.json"
    cli("run", f"{workflow}:word_count_graph", "-i", "1", "-q", "--provenance", str(item), cwd=tmp_path)
    assert "level pe" not in cli("provenance", str(item), cwd=tmp_path).stdout


def test_cli_traces_a_result_as_results_writes_it(tmp_path: Path) -> None:
    # A result copied from the --results file, ["fox", 3], matched no result: --trace took only the repr, ('fox', 3).
    workflow = Path(__file__).resolve()
    path, results = tmp_path / "wc.json", tmp_path / "results.jsonl"
    done = cli("run", f"{workflow}:word_count_graph", "-i", "1", "-q", "--provenance", str(path),
               "--results", str(results), cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr
    line = next(line for line in results.read_text().splitlines() if '["fox", 3]' in line)
    for wanted in (line, '["fox", 3]', "('fox', 3)"):
        traced = cli("provenance", str(path), "--trace", wanted, cwd=tmp_path)
        assert traced.returncode == 0, traced.stderr
        assert traced.stdout.startswith("aiod4p:CountWords") and " = ('fox', 3)  (made by " in traced.stdout
        assert "3 sources" in traced.stdout
    missed = cli("provenance", str(path), "--trace", '["fox", 4]', cwd=tmp_path)
    assert missed.returncode == 1 and "no entity or result matches '[\"fox\", 4]'" in missed.stderr


ODD_RESULTS_FLOW = numbers_flow(
    """
    import numpy as np

    class Odd(IterativePE):
        def process_item(self, item):
            return [
                np.arange(4, dtype=float), np.arange(2000), np.int64(7), np.float32(1.25), {"k": np.float64(2.5)},
                {"a": [1, 2], "b": (1, 2)}, {(2, 3): "y", 1: "x"}, b"by\\x00tes", {"n": float("nan")}, "it's \\"7\\"",
            ][item - 1]
    """
)


@pytest.mark.parametrize(("mapping", "workers"), [("simple", "1"), ("multi", "2")])
def test_cli_traces_every_result_as_results_writes_it(tmp_path: Path, mapping: str, workers: str) -> None:
    # A result whose JSON is not its repr's (a numpy array or scalar, bytes, a dict with a tuple or with a tuple key)
    # matched no result by its --results line, or (np.int64(7)'s 7) the wrong ones by a part of their repr.
    (tmp_path / "odd.py").write_text(ODD_RESULTS_FLOW)
    path, results = tmp_path / "odd.json", tmp_path / "results.jsonl"
    done = cli("run", "odd.py", "-i", "10", "-m", mapping, "-n", workers, "-q", "--provenance", str(path),
               "--results", str(results), cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = results.read_text().splitlines()
    assert len(lines) == 10
    lineage = aiod4p.read_lineage(str(path))
    for line in lines:
        source = lineage.values[lineage.sources(lineage.find(line)[0])[0]]
        for wanted in (line, json.dumps(json.loads(line)["data"])):
            found = lineage.find(wanted)
            assert [lineage.sources(entity) for entity in found] == [lineage.sources(found[0])], (wanted, found)
            assert lineage.values[lineage.sources(found[0])[0]] == source
    traced = cli("provenance", str(path), "--trace", "[0, 1, 2, 3]", cwd=tmp_path)
    assert traced.returncode == 1 and "no entity or result matches" in traced.stderr  # floats were written
    traced = cli("provenance", str(path), "--trace", "7", cwd=tmp_path)  # np.int64(7)'s data, not a part of others
    assert traced.returncode == 0, traced.stderr
    assert [line.split(" = ")[1] for line in traced.stdout.splitlines() if not line.startswith(" ")] == [
        "np.int64(7)  (made by " + lineage.made_by[lineage.find("np.int64(7)")[0]] + ")"
    ]
    # Without --results, nothing says that a result is written as its repr (the digest writes nothing).
    quiet = cli("run", "odd.py", "-i", "10", "-m", mapping, "-n", workers, "--provenance", str(path), cwd=tmp_path)
    assert quiet.returncode == 0 and "written as their repr" not in quiet.stderr, quiet.stderr


def test_a_trace_of_json_nested_too_deep_matches_nothing_without_a_traceback(tmp_path: Path) -> None:
    # --trace '[[[...]]]' 900 deep parsed, then ended in a RecursionError traceback making its tuples' form.
    lineage = aiod4p.read_lineage(str(record(tmp_path, "simple", None)))
    for depth in (900, 5000):
        with pytest.raises(aiod4p.Aiod4pError, match=r"^no entity or result matches '\[\[\["):
            lineage.find("[" * depth + "]" * depth)


class SmallAndLargeArrays(ProducerPE):
    def produce(self) -> Any:
        import numpy as np

        yield np.arange(3.0)
        yield np.zeros(DIGESTED_BYTES // 8 + 1)


def test_a_result_keeps_the_digest_of_its_json_up_to_a_size(tmp_path: Path) -> None:
    # The digest costs the result's JSON once more: a result of megabytes, which no command line can pass to
    # --trace, keeps none (it is still found by its repr).
    graph = WorkflowGraph()
    graph.add(SmallAndLargeArrays())
    _, stats = run_recorded(graph, 1, "async", None, "item")
    lineage = aiod4p.read_lineage(aiod4p.write_provenance(stats, str(tmp_path / "run.json")))
    small, large = sorted(lineage.results(), key=lambda entity: int(entity.rsplit(".", 1)[1]))
    assert set(lineage.digests) == {small}
    assert lineage.find("[0.0, 1.0, 2.0]") == [small] and lineage.find("array([0., 0., 0., ...") == [large]


@pytest.mark.parametrize("graph", ["word count", "evens"])
def test_a_prov_json_file_reads_as_prov_reads_the_same_document(tmp_path: Path, graph: str) -> None:
    # PROV-JSON is read as JSON (prov took 28 s and 1 GB for a 54 MB file, against 2 s): the lineage is prov's.
    built = word_count() if graph == "word count" else WorkflowGraph()
    if graph == "evens":
        built.connect(Numbers(), "output", EvensAtTheEnd(), "input")
    _, stats = run_recorded(built, 1, "multi", 2, "item")
    doc = aiod4p.provenance_document(stats)
    as_json = aiod4p.read_lineage(aiod4p.write_document(doc, str(tmp_path / "p.json")))
    assert as_json == aiod4p.read_lineage(aiod4p.write_document(doc, str(tmp_path / "p.xml")))
    assert as_json.results() and any(as_json.parents.values())


def test_a_prov_json_file_that_is_no_document_is_named(tmp_path: Path) -> None:
    path = tmp_path / "list.json"
    path.write_text("[1, 2]")
    with pytest.raises(aiod4p.Aiod4pError, match=r"list.json is not a PROV document: a PROV-JSON document is an obj"):
        aiod4p.read_lineage(str(path))


@pytest.mark.parametrize(
    ("document", "wrong"),
    [
        ({"entity": 5}, "its 'entity' is a number, not an object of records by identifier"),
        ({"entity": {"e1": 5}}, "entity 'e1' is a number, not an object of attributes (or a list of them)"),
        ({"entity": {"e1": [{}, "x"]}}, "entity 'e1' is a string, not an object of attributes"),
        ([], "a PROV-JSON document is an object, not an array"),
        (
            {"wasDerivedFrom": {"_:id1": {"prov:usedEntity": "e"}}},
            "wasDerivedFrom '_:id1' has no 'prov:generatedEntity'",
        ),
        (
            {"used": {"_:id1": {"prov:activity": ["a"]}}},
            "the 'prov:activity' of used '_:id1' is an array, not an identifier (a string)",
        ),
        (
            {"entity": {"e1": {"prov:value": {"x": 1}}}},
            "the 'prov:value' of entity 'e1' holds an object with no \"$\"",
        ),
        (
            {"entity": {"e1": {"prov:type": [{"$": None}]}}},
            "the 'prov:type' of entity 'e1' holds an object whose \"$\" is null",
        ),
        (
            {"agent": {"a": {"aiod4p:restored_from_checkpoint": "x"}}},
            "the 'aiod4p:restored_from_checkpoint' of agent 'a' is 'x', not a checkpoint number",
        ),
    ],
)
def test_a_json_file_of_another_shape_says_what_is_wrong(tmp_path: Path, document: Any, wrong: str) -> None:
    # Valid JSON of another shape said `bad.json is not a PROV document: AttributeError: 'int' object has no
    # attribute 'items'`, which told a user nothing of what was wrong in the file.
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(document))
    with pytest.raises(aiod4p.Aiod4pError) as caught:
        aiod4p.read_lineage(str(path))
    assert str(caught.value).startswith(f"{path} is not a PROV document: {wrong}"), caught.value
    shown = cli("provenance", str(path), "--trace", "x", cwd=tmp_path)
    assert (shown.returncode, shown.stdout) == (1, "")
    assert shown.stderr.startswith(f"aiod4p: error: {path} is not a PROV document: {wrong}"), shown.stderr
    assert "Traceback" not in shown.stderr


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
    max_leaves=12,
)
_NAMES = [
    "prov:value",
    "prov:type",
    "$",
    "aiod4p:recalled",
    "aiod4p:restored_from_checkpoint",
    *(name for terms in _TERMS.values() for name in terms),
]
_VALUES = _JSON | st.sampled_from(["e1", "a1", "3", "nothing", "aiod4p:Result"]) | st.fixed_dictionaries({"$": _JSON})
_RECORD = st.dictionaries(st.sampled_from(_NAMES), _VALUES, max_size=4)
_PROV_LIKE = st.dictionaries(
    st.sampled_from(["entity", "agent", "activity", "prefix", *_TERMS]),
    _JSON | st.dictionaries(st.sampled_from(["e1", "a1", "_:id1"]), _JSON | _RECORD | st.lists(_RECORD, max_size=2)),
    max_size=4,
)


@settings(max_examples=300, deadline=None)
@given(document=_JSON | _PROV_LIKE)
def test_any_json_gives_a_lineage_or_says_what_is_wrong(document: Any) -> None:
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "any.json")
        with open(path, "w") as file:
            json.dump(document, file)
        try:
            lineage = aiod4p.read_lineage(path)
        except aiod4p.Aiod4pError as exc:
            assert str(exc).startswith(f"{path} is not a PROV document: "), exc
            assert not re.search(r"\w+Error\b", str(exc)), exc  # what is wrong in the file, not a Python exception
            return
    for entity in lineage.values:
        lineage.sources(entity)
    lineage.to_dot(lineage.values)


def test_cli_trace_of_a_restored_run_says_its_lineage_stops_at_the_checkpoint(tmp_path: Path) -> None:
    # Only the listing said the file was recorded from a checkpoint on: a trace printed a lineage short of the
    # sources before it (a count of 400 traced to 190 lines) as if it were whole.
    path = record(tmp_path, "simple", None)
    document = json.loads(path.read_text())
    agents = document["agent"]
    counter = next(agent for name, agent in agents.items() if name.startswith("aiod4p:CountWords") and "." in name)
    counter["aiod4p:restored_from_checkpoint"] = {"$": "3", "type": "xsd:int"}
    path.write_text(json.dumps(document))
    for args in ((), ("--trace", "fox")):
        shown = cli("provenance", str(path), *args, cwd=tmp_path)
        assert shown.returncode == 0, shown.stderr
        assert "recorded from checkpoint 3 on (a restored run)" in shown.stdout
        assert "lineage through PE state restored from it stops there" in shown.stdout


def test_cli_trace_counts_one_item_and_one_source_in_the_singular(tmp_path: Path) -> None:
    # `aiod4p provenance FILE --trace` said "lineage: 1 items; 1 sources:".
    path = record(tmp_path, "async", None)
    traced = cli("provenance", str(path), "--trace", "('lazy', 1)", cwd=tmp_path)
    assert traced.returncode == 0, traced.stderr
    assert "; 1 source:\n" in traced.stdout and "1 sources" not in traced.stdout, traced.stdout
    assert re.search(r"lineage: \d+ items?; ", traced.stdout) and "lineage: 1 items" not in traced.stdout


def test_cli_listing_into_a_closed_pipe_ends_quietly(tmp_path: Path) -> None:
    path = record(tmp_path, "async", None)
    reader, writer = os.pipe()
    os.close(reader)  # the reader went away (`| head` that has read its lines) before anything was written
    try:
        listing = subprocess.run([str(BIN / "aiod4p"), "provenance", str(path)], stdout=writer,
                                 stderr=subprocess.PIPE, timeout=60, cwd=tmp_path)  # fmt: skip
    finally:
        os.close(writer)
    assert listing.returncode == 141 and listing.stderr == b""


def test_a_result_not_found_in_an_item_level_file_is_not_blamed_on_the_level() -> None:
    # The item-level hint came with every miss, also in files that record every result (a typo in --trace).
    lineage = aiod4p.Lineage(values={"aiod4p:Sum1.0.0": "('ST01', 0.5)"}, kinds={"aiod4p:Sum1.0.0": "aiod4p:Result"})
    with pytest.raises(aiod4p.Aiod4pError) as caught:
        lineage.find("ST02")
    assert str(caught.value) == "no entity or result matches 'ST02' (1 result recorded)"  # was "1 results"
    with pytest.raises(aiod4p.Aiod4pError, match=r"\(0 results recorded; item-level provenance \(--provenance-level"):
        aiod4p.Lineage().find("ST02")
    for blank in ("", " "):  # a part of every value: it traced every result
        with pytest.raises(aiod4p.Aiod4pError, match=f"^{blank!r} names no result: give an entity id"):
            lineage.find(blank)


def test_cli_a_failed_run_says_the_earlier_provenance_file_is_not_its_own_and_keeps_it(tmp_path: Path) -> None:
    # It was removed as the run started: the failed run left none to pass for its own, and the earlier run's was lost.
    flow = tmp_path / "flow.py"
    flow.write_text(
        numbers_flow("class Fails(IterativePE):\n    def process_item(self, item):\n        raise ValueError(item)\n")
    )
    earlier = tmp_path / "run.json"
    earlier.write_text('{"an earlier run": "its provenance"}')
    failed = cli("run", str(flow), "-i", "3", "-q", "--provenance", str(earlier), cwd=tmp_path)
    assert failed.returncode == 1 and "PE Fails1" in failed.stderr
    assert f"--provenance: {earlier} not written: the file there is an earlier run's, left as it was" in failed.stderr
    assert earlier.read_text() == '{"an earlier run": "its provenance"}'


@pytest.mark.parametrize(("mapping", "level"), [("async", "pe"), ("multi", "item")])
def test_cli_restore_of_a_finished_run_writes_the_provenance_of_its_empty_attempt(
    tmp_path: Path, mapping: str, level: str
) -> None:
    # It failed with "the run recorded no provenance", its instances having finished, and the earlier file was gone.
    flow = tmp_path / "flow.py"
    flow.write_text(TIMES10_FLOW)
    options = ["-m", mapping, "-n", "2", "-i", "5", "--checkpoint-dir", "ck", "--results", "out.jsonl"]
    first = cli("run", str(flow), *options, "-q", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    earlier = tmp_path / "prov.json"
    earlier.write_text('{"an earlier run": "its provenance"}')
    restored = cli(
        "run", str(flow), *options, "--restore", "--provenance", str(earlier), "--provenance-level", level, cwd=tmp_path
    )
    assert restored.returncode == 0, restored.stderr
    assert "0 records" in restored.stderr
    document = json.loads(earlier.read_text())
    agents = document["agent"]
    assert {"aiod4p:Numbers0.0", "aiod4p:Times101.0"} <= set(agents)
    assert all("aiod4p:restored_from_checkpoint" in agents[agent] for agent in agents if agent.count(".") == 1)
    listing = cli("provenance", str(earlier), cwd=tmp_path)
    assert listing.returncode == 0, listing.stderr
    assert "0 results" in listing.stdout and "(a restored run)" in listing.stdout
    assert [path.name for path in tmp_path.iterdir() if ".tmp" in path.name] == []


def test_a_provenance_file_that_cannot_be_written_leaves_the_earlier_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # It was opened for writing at once: a write failing half-way left neither run's document.
    _, stats = run_recorded(word_count(), 1, "simple", None, "item")
    path = tmp_path / "prov.json"
    path.write_text('{"an earlier run": "its provenance"}')

    def full_disk(records: Any, out: Any, spool: str) -> None:
        out.write('{"prefix": ')
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("aiod4p._provenance._write_json", full_disk)
    with pytest.raises(aiod4p.Aiod4pError, match=f"cannot write provenance to {path}: No space left on device"):
        aiod4p.write_provenance(stats, str(path))
    assert path.read_text() == '{"an earlier run": "its provenance"}'
    assert [entry.name for entry in tmp_path.iterdir()] == ["prov.json"]


def test_cli_provenance_errors_name_the_problem(tmp_path: Path) -> None:
    missing = cli("provenance", str(tmp_path / "nope.json"), cwd=tmp_path)
    assert missing.returncode == 1 and "cannot read provenance file" in missing.stderr
    (tmp_path / "bad.json").write_text("{}")  # valid PROV, no results
    bad = cli("provenance", str(tmp_path / "bad.json"), "--trace", "x", cwd=tmp_path)
    assert bad.returncode == 1 and "no entity or result matches 'x'" in bad.stderr
    (tmp_path / "junk.json").write_text("not json")
    junk = cli("provenance", str(tmp_path / "junk.json"), cwd=tmp_path)
    assert junk.returncode == 1 and "is not a PROV document" in junk.stderr
    level = cli("run", "x.py", "--provenance", "p.json", "--provenance-level", "all", cwd=tmp_path)
    assert level.returncode == 2 and "invalid choice: 'all'" in level.stderr


word_count_graph = word_count()


def test_a_lineage_of_values_with_backslashes_and_quotes_draws(tmp_path: Path) -> None:
    # A value ending in a backslash (a custom repr) escaped the label's line break: both lines ran into one.
    item, result = "aiod4p:Read0.0.0", "aiod4p:Sum1.0.0"
    lineage = aiod4p.Lineage(
        values={item: "ends in \\", result: "('say \"hi\"', 1)"},
        kinds={item: "aiod4p:Item", result: "aiod4p:Result"},
        parents={result: [item]},
        made_by={result: "Sum1[0]"},
    )
    dot_file = tmp_path / "lineage.dot"
    dot_file.write_text(lineage.to_dot([result]))
    drawn = subprocess.run(["dot", "-Tsvg", str(dot_file)], capture_output=True, text=True, check=False)
    assert drawn.returncode == 0, drawn.stderr
    lines = re.findall(r"<text[^>]*>([^<]*)</text>", drawn.stdout)
    assert lines == [
        "(&#39;say &quot;hi&quot;&#39;, 1)",
        "aiod4p:Sum1.0.0 (Sum1[0])",
        "ends in \\",
        "aiod4p:Read0.0.0 (input)",
    ]


def test_a_trace_lists_its_sources_in_their_order() -> None:
    # Sorted as strings: Read0.0.0, Read0.0.1, Read0.0.10, Read0.0.100, Read0.0.1000, Read0.0.101 ...
    from aiod4p._cli import _natural

    ids = [f"aiod4p:Read0.0.{n}" for n in (10, 9, 100, 1000, 0)]
    assert sorted(ids, key=_natural) == [f"aiod4p:Read0.0.{n}" for n in (0, 9, 10, 100, 1000)]


@pytest.mark.skipif(os.name != "posix", reason="process ids told by os.kill(pid, 0)")
def test_a_provenance_file_removes_what_a_killed_writer_left(tmp_path: Path) -> None:
    # A run killed (SIGKILL) while it wrote its provenance file left `.run.json.tmp-...`, hidden, as large as the
    # file (100 MB for a large run), and every such run one more. The next write of that file removes those no
    # writer holds locked (a writer holds its own: a live one's stays, on any host or container sharing the
    # directory, which a process id could not tell), once a minute old; another file's, and younger ones, stay.
    left, live, young = (tmp_path / f".run.json.tmp-{name}" for name in ("left", "live", "young"))
    other = tmp_path / ".other.json.tmp-left"
    for path in (left, live, young, other):
        path.write_text("half a document")
    old = time.time() - 2 * _provenance.STALE_TEMPORARY_SECONDS
    for path in (left, live, other):
        os.utime(path, (old, old))
    holder = subprocess.Popen(  # a writer at work, in another process
        [
            sys.executable,
            "-c",
            "import fcntl, sys; f = open(sys.argv[1]); fcntl.flock(f, fcntl.LOCK_EX);"
            " print('held', flush=True); sys.stdin.read()",
            str(live),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        graph = WorkflowGraph()
        graph.add(AnnotatesWithNames())
        _, stats = run_recorded(graph, 1, "async", None, "pe")
        aiod4p.write_provenance(stats, str(tmp_path / "run.json"))
    finally:
        holder.communicate(timeout=30)
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(["run.json", live.name, young.name, other.name])


@pytest.mark.skipif(os.name != "posix", reason="symbolic links and modes")
def test_a_provenance_file_behind_a_link_is_written_in_place_and_keeps_its_mode(tmp_path: Path) -> None:
    """A provenance file is replaced by a renamed one beside it: a symbolic link was replaced by a regular file
    (its target kept the earlier document), and a file's permissions were lost."""
    target, link, plain = tmp_path / "target.json", tmp_path / "link.json", tmp_path / "plain.json"
    target.write_text("earlier")
    link.symlink_to(target)
    plain.write_text("earlier")
    plain.chmod(0o640)
    for path in (link, plain):
        with _replacing(str(path)) as out:
            out.write("new")
    assert link.is_symlink() and target.read_text() == "new"
    assert plain.read_text() == "new" and plain.stat().st_mode & 0o777 == 0o640


HOLDS_CALLS_FLOW = """
import aiod4p._provenance
from aiod4p import IterativePE, ProducerPE, WorkflowGraph

aiod4p._provenance.HELD_CALLS_WARNING = 50


class Numbers(ProducerPE):
    def produce(self):
        yield from range(200)


class Double(IterativePE):
    def process_item(self, number):
        return 2 * number


graph = WorkflowGraph()
graph.connect(Numbers(), "output", Double(), "input")
"""


@pytest.mark.parametrize("mapping", [["-m", "async"], ["-m", "multi", "-n", "2"]])
def test_item_level_says_once_that_it_holds_every_call_in_memory(tmp_path: Path, mapping: list[str]) -> None:
    # An endless run recorded at level item grew without bound and said nothing: its records travel with the
    # final statistics, so they are all held until the run ends.
    (tmp_path / "flow.py").write_text(HOLDS_CALLS_FLOW)
    done = aiod4p_cli(
        "run", str(tmp_path / "flow.py"), *mapping, "--results", str(tmp_path / "out.jsonl"),
        "--provenance", str(tmp_path / "prov.json"),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert len(json_lines(tmp_path / "out.jsonl")) == 200
    held = [line for line in done.stderr.splitlines() if "all held in memory" in line]
    assert 1 <= len(held) <= 2, done.stderr  # once per process that records
    assert "has recorded 50 calls" in held[0] and "--provenance-level pe" in held[0]
