"""The scientific examples (examples/science/) at a small size on every mapping, and `aiod4p stats plot`.

The three domains share one graph, so each mapping is launched once.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

import aiod4p
from aiod4p import PEError, WorkflowGraph
from aiod4p._loading import load_module

for _module in ("numpy", "scipy", "astropy", "vaderSentiment", "afinn"):
    pytest.importorskip(_module, reason="the science examples need aiod4p[science]")

SCIENCE = Path(__file__).resolve().parent.parent / "examples" / "science"
BIN = Path(sys.executable).parent
SMALL = {
    "Synthesise": [{"stations": 5, "seconds": 300}],
    "ReadCatalogue": [{"galaxies": 40}],
    "Articles": [{"articles": 150}],
}


def example(name: str) -> ModuleType:
    return load_module(str(SCIENCE / f"{name}.py"))


seismic, astro, sentiment = example("seismic"), example("astro"), example("sentiment")
DOMAINS = {"seismic": seismic, "astro": astro, "sentiment": sentiment}


def three_domains() -> WorkflowGraph:
    graph = WorkflowGraph()
    for module in (seismic, astro, sentiment):
        module.build(graph)
    return graph


def by_pe(results: aiod4p.Results) -> dict[str, list[Any]]:
    """Results per PE class name (ids carry counters), sorted: mappings deliver in different orders."""
    grouped: dict[str, list[Any]] = defaultdict(list)
    for record in results:
        grouped[record.pe.rstrip("0123456789")].append(record.data)
    return {pe: sorted(items, key=repr) for pe, items in grouped.items()}


# Two calls of each root (as `-i 2` makes): the second call's stations, galaxies and articles follow the
# first's, so the data is twice as much, every id is unique and the results are those of one call twice as big.
TWICE = {
    "Synthesise": [{"stations": 3, "seconds": 120}] * 2,
    "ReadCatalogue": [{"galaxies": 20}] * 2,
    "Articles": [{"articles": 60}] * 2,
}
TWICE_AS_BIG = {
    "Synthesise": [{"stations": 6, "seconds": 120}],
    "ReadCatalogue": [{"galaxies": 40}],
    "Articles": [{"articles": 120}],
}


def six_domains() -> tuple[WorkflowGraph, dict[Any, Any], set[str]]:
    """The three domains twice in one graph (one launch per mapping): the first fed :data:`SMALL`, the
    second :data:`TWICE`; with the ids of the first's PEs."""
    graph = three_domains()
    first = {pe.id for pe in graph.pes}
    for module in (seismic, astro, sentiment):
        module.build(graph)
    inputs = {
        pe: (SMALL if pe.id in first else TWICE)[type(pe).__name__] for pe in graph.pes if type(pe).__name__ in SMALL
    }
    return graph, inputs, first


def run_six(mapping: str, workers: int | None = None) -> tuple[dict[str, list[Any]], dict[str, list[Any]]]:
    """The results of :func:`six_domains` per PE class: those of :data:`SMALL`, those of :data:`TWICE`."""
    graph, inputs, first = six_domains()
    results = list(aiod4p.run(graph, inputs, mapping=mapping, workers=workers))
    return by_pe([r for r in results if r.pe in first]), by_pe([r for r in results if r.pe not in first])


@pytest.fixture(scope="module")
def both() -> tuple[dict[str, list[Any]], dict[str, list[Any]]]:
    return run_six("simple")


@pytest.fixture(scope="module")
def reference(both: tuple[dict[str, list[Any]], dict[str, list[Any]]]) -> dict[str, list[Any]]:
    return both[0]


@pytest.fixture(scope="module")
def twice(both: tuple[dict[str, list[Any]], dict[str, list[Any]]]) -> dict[str, list[Any]]:
    return both[1]


def test_seismic_recovers_the_hidden_travel_time_differences(reference: dict[str, list[Any]]) -> None:
    truth = seismic.true_lags(5)
    found = {(i, j): lag for i, j, lag, _ in reference["CrossCorrelate"]}
    assert found.keys() == truth.keys()  # every pair
    step = seismic.DECIMATE / seismic.RATE
    for pair, lag in found.items():
        assert abs(lag - truth[pair]) <= step / 2, pair
    assert len({round(lag, 3) for lag in truth.values()}) > 3  # the delays differ: a real test


def test_astrophysics_gives_extinction_statistics_per_type(reference: dict[str, list[Any]]) -> None:
    names = [astro.galaxy_name(i) for i in range(40)]
    values: dict[int, list[float]] = defaultdict(list)
    for name in names:
        t, logr25 = astro.service_record(name)
        values[t].append(astro.internal_extinction(t, logr25))
    expected = sorted((astro.summarise(t, v) for t, v in values.items()), key=repr)
    assert reference["StatsPerType"] == expected
    assert any(mean > 0 for _, _, mean, _ in expected)


def test_sentiment_joins_both_scores_and_ranks_states(reference: dict[str, list[Any]]) -> None:
    from afinn import Afinn
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    afinn, vader, words = Afinn(), SentimentIntensityAnalyzer(), sentiment.lexicon_words()
    scores: dict[str, tuple[list[float], list[float]]] = defaultdict(lambda: ([], []))
    for number in range(150):
        article = sentiment.article(number, sentiment.DEFAULTS["seed"], words)
        _, state, text, tokens = sentiment.tokenise(article)
        scores[state][0].append(sentiment.score_afinn(afinn, tokens))
        scores[state][1].append(sentiment.score_vader(vader, text))
    summaries = [sentiment.state_summary(state, *lists) for state, lists in scores.items()]
    assert reference["PerState"] == sorted(summaries, key=repr)
    assert reference["TopBottom"] == sorted(sentiment.ranking(summaries), key=repr)
    top, bottom = dict(sentiment.ranking(summaries))["top"], dict(sentiment.ranking(summaries))["bottom"]
    seed = sentiment.DEFAULTS["seed"]
    assert sentiment.positivity(top[0], seed) > sentiment.positivity(bottom[0], seed)


@pytest.mark.timeout(240)  # four worker processes import the scientific stack, on a busy machine
@pytest.mark.parametrize(("mapping", "workers"), [("async", 4), ("multi", 4), ("mpi", 4)])
def test_every_mapping_gives_the_same_results(
    both: tuple[dict[str, list[Any]], dict[str, list[Any]]], mapping: str, workers: int
) -> None:
    """Fed once and fed twice (each root called twice: those results changed with the mapping)."""
    assert run_six(mapping, workers) == both


def test_a_second_call_of_each_root_adds_as_much_new_data(twice: dict[str, list[Any]]) -> None:
    """Each call made the same stations, galaxies and articles again: PairUp paired a station with its
    double (('ST000', 'ST000', 0.0, 1.0)), JoinScores joined the scores of two articles by their one id,
    and the results changed with the mapping and from run to run."""
    assert twice == by_pe(aiod4p.run(three_domains(), TWICE_AS_BIG, mapping="simple"))
    truth = seismic.true_lags(6)
    found = {(i, j): lag for i, j, lag, _ in twice["CrossCorrelate"]}
    assert found.keys() == truth.keys() and len(found) == 15  # 6 stations, no station with itself
    step = seismic.DECIMATE / seismic.RATE
    assert all(abs(lag - truth[pair]) <= step / 2 for pair, lag in found.items())
    assert sum(count for _, count, _, _ in twice["StatsPerType"]) == 40  # 2 x 20 galaxies
    assert sum(count for _, _, count, _, _ in twice["PerState"]) == 120  # 2 x 60 articles


@pytest.mark.parametrize(
    ("module", "root", "calls", "message"),
    [
        ("seismic", "Synthesise", [{}, {"seed": 5}], "seed 5 differs from the first call's 2017"),
        ("astro", "ReadCatalogue", "twice the file", "which an earlier call emitted: each galaxy is counted once"),
    ],
)
def test_a_second_call_that_cannot_add_new_data_is_refused(
    tmp_path: Path, module: str, root: str, calls: Any, message: str
) -> None:
    if calls == "twice the file":
        path = tmp_path / "catalogue.xml"
        path.write_bytes(astro.catalogue(3, 1))
        calls = [{"path": str(path)}] * 2
    with pytest.raises(PEError, match=root) as caught:
        aiod4p.run(DOMAINS[module].build(), {root: calls}, mapping="simple")
    assert message in str(caught.value)


@pytest.mark.parametrize(
    ("module", "root", "size", "message"),
    [
        ("seismic", "Synthesise", {"stations": "many"}, "stations must be a whole number of at least 2, not 'many'"),
        ("seismic", "Synthesise", {"stations": -3}, "stations must be a whole number of at least 2, not -3"),
        ("seismic", "Synthesise", {"stations": 2.5}, "stations must be a whole number of at least 2, not 2.5"),
        ("seismic", "Synthesise", {"seconds": 0}, "seconds must be a number of at least 60, not 0"),
        ("seismic", "Synthesise", {"statoins": 3}, "unknown setting 'statoins': the settings are stations, seconds"),
        ("astro", "ReadCatalogue", {"galaxies": 0}, "galaxies must be a whole number of at least 1, not 0"),
        ("astro", "ReadCatalogue", {"galaxy": 9}, "unknown setting 'galaxy': the settings are galaxies, seed, path"),
        ("astro", "ReadCatalogue", {"path": 5}, "path must be the name of a VOTable file, not 5"),
        ("astro", "ReadCatalogue", {"path": "/nonexistent.xml"}, "cannot read the catalogue /nonexistent.xml: "),
        ("sentiment", "Articles", {"articles": True}, "articles must be a whole number of at least 1, not True"),
        ("sentiment", "Articles", {"seed": -1}, "seed must be a whole number of at least 0, not -1"),
    ],
)
def test_a_bad_size_names_the_pe_and_the_setting(module: str, root: str, size: dict[str, Any], message: str) -> None:
    """A size that is not one (a typo in a key, a negative or fractional count) fails the run naming it; it
    was ignored, truncated or gave no results, silently."""
    with pytest.raises(PEError, match=root) as caught:
        aiod4p.run(DOMAINS[module].build(), {root: [size]}, mapping="simple")
    assert message in str(caught.value)


def test_the_service_rejects_a_query_without_a_name() -> None:
    import asyncio

    with pytest.raises(OSError, match="400"):
        asyncio.run(asyncio.wait_for(astro.query_async(astro.service_url(), ""), 30))


def test_blocking_and_async_queries_agree() -> None:
    import asyncio

    url = astro.service_url()
    name = astro.galaxy_name(7)
    assert astro.query_blocking(url, name) == asyncio.run(asyncio.wait_for(astro.query_async(url, name), 30))
    assert astro.query_blocking(url, name)[1:] == astro.service_record(name)


# -- one command, and the statistics plot -----------------------------------------------------


@pytest.mark.parametrize(("mapping", "workers"), [("simple", None), ("multi", 2)])
def test_each_station_pair_traces_back_to_its_two_stations(tmp_path: Path, mapping: str, workers: int | None) -> None:
    async def recorded() -> list[aiod4p.InstanceStats]:
        graph = seismic.build()
        async with aiod4p.start(graph, {"Synthesise": SMALL["Synthesise"]}, mapping=mapping, workers=workers,
                                provenance="item") as run:  # fmt: skip
            await run.results()
        return run.stats

    path = str(tmp_path / "seismic.json")
    aiod4p.write_document(aiod4p.provenance_document(asyncio.run(recorded())), path)
    lineage = aiod4p.read_lineage(path)
    pairs = lineage.results()
    assert len(pairs) == 10  # 5 stations
    for entity in pairs:
        first, second = eval(lineage.values[entity])[:2]  # ('ST001', 'ST003', lag, peak)
        made = [e for e in lineage.trace(entity) if lineage.made_by.get(e, "").startswith("aiod4p:Synthesise")]
        requests = sorted(eval(lineage.values[e])[0] for e in made)  # (index, seconds, seed)
        assert requests == [int(first[2:]), int(second[2:])], lineage.values[entity]


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "aiod4p"), *args], capture_output=True, text=True, timeout=120, cwd=cwd)


@pytest.mark.timeout(180)
def test_one_command_runs_an_example_and_its_statistics_plot(tmp_path: Path) -> None:
    stats = tmp_path / "stats.json"
    size = json.dumps({"Articles": [{"articles": 60}]})
    done = cli("run", str(SCIENCE / "sentiment.py"), "-d", size, "-m", "async", "-n", "2", "-q",
               "--results", str(tmp_path / "out.jsonl"), "--stats-json", str(stats), cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert {tuple(r["data"][:1]) for r in records} >= {("top",), ("bottom",), ("state",)}
    document = json.loads(stats.read_text())
    assert document["samples"] and set(document["samples"][-1]["pes"]) == set(document["pes"])
    last = document["samples"][-1]["pes"]
    assert all(last[pe][0] == summary["items_in"] for pe, summary in document["pes"].items())  # final figures
    plotted = cli("stats", "plot", str(stats), "-o", str(tmp_path / "stats.png"), cwd=tmp_path)
    assert plotted.returncode == 0, plotted.stderr
    assert (tmp_path / "stats.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("finished", [True, False])
def test_stats_plot_of_a_run_that_did_not_finish_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, finished: bool
) -> None:
    # A run that failed midway or was aborted drew as a finished one: nothing in the picture told it had stopped.
    figure = pytest.importorskip("matplotlib.figure")
    from aiod4p._plot import plot_stats

    titles: list[str] = []
    monkeypatch.setattr(figure.Figure, "savefig", lambda drawn, _: titles.append(drawn.axes[0].get_title()))
    stats = tmp_path / "stats.json"
    samples = [{"t": 0.25, "pes": {"Count0": [1, 5, 0.1]}}, {"t": 0.5, "pes": {"Count0": [1, 9, 0.2]}}]
    stats.write_text(json.dumps({"mapping": "multi", "workers": 2, "finished": finished, "pes": {"Count0": {}},
                                 "samples": samples}))  # fmt: skip
    plot_stats(stats, tmp_path / "stats.png")
    assert titles == [
        f"Per-PE throughput and busy time (multi, 2 workers, 0.50 s{'' if finished else ', did not finish'})"
    ]


def test_stats_plot_errors_name_the_file(tmp_path: Path) -> None:
    missing = cli("stats", "plot", str(tmp_path / "none.json"), "-o", str(tmp_path / "x.png"), cwd=tmp_path)
    assert missing.returncode == 1 and "cannot read statistics file" in missing.stderr
    (tmp_path / "other.json").write_text('{"entity": {}}')
    other = cli("stats", "plot", str(tmp_path / "other.json"), "-o", str(tmp_path / "x.png"), cwd=tmp_path)
    assert other.returncode == 1 and "is not a statistics file" in other.stderr
    (tmp_path / "junk.json").write_text("{")
    junk = cli("stats", "plot", str(tmp_path / "junk.json"), "-o", str(tmp_path / "x.png"), cwd=tmp_path)
    assert junk.returncode == 1 and "is not JSON" in junk.stderr


@pytest.mark.parametrize(
    "samples",
    [[{"t": 0.5}], [{"t": 0.5, "pes": {"Count0": [3]}}], [{"t": "0.5", "pes": {}}], ["0.5"], 7],
    ids=["no pes", "short row", "t not a number", "not a dict", "not a list"],
)
def test_stats_plot_of_a_malformed_sample_names_the_file(tmp_path: Path, samples: Any) -> None:
    """A sample not as --stats-json writes it (a file edited, or another tool's) gave a KeyError or TypeError
    traceback, or numpy's message as a usage error (exit 2); it is one line naming the file and sample."""
    stats = tmp_path / "stats.json"
    stats.write_text(json.dumps({"pes": {"Count0": {}}, "samples": samples}))
    done = cli("stats", "plot", str(stats), "-o", str(tmp_path / "x.png"), cwd=tmp_path)
    assert done.returncode == 1, done.stderr
    assert done.stderr.startswith(f"aiod4p: error: {stats} is not a statistics file written by")
    assert "Traceback" not in done.stderr and not (tmp_path / "x.png").exists()
