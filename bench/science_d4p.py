"""The three workflows of examples/science/ written for dispel4py 1.2.1, for bench/bench_science.py.

    SCIENCE_SIZE='{"stations": 16}' dispel4py multi bench/science_d4p.py -a seismic -n 10 -i 1

The same graphs, PE for PE, calling the same functions as the aiod4p examples
(imported from examples/science/, with the repository on ``sys.path``); the
size is read from the ``SCIENCE_SIZE`` environment variable (JSON) because
dispel4py's ``-d`` names PEs by generated ids. The astrophysics lookups are
dispel4py's usual blocking calls (:func:`astro.query_blocking`). Graphs:
``seismic``, ``astro``, ``sentiment``.
"""

import importlib
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "examples", "science")]


def _lib(name):
    """The example module ``name``, imported on first use: a run pays only for its own domain's libraries."""
    return importlib.import_module(name)


from dispel4py.base import IterativePE, ProducerPE  # noqa: E402
from dispel4py.core import GenericPE  # noqa: E402
from dispel4py.workflow_graph import WorkflowGraph  # noqa: E402


def size(defaults):
    return {**defaults, **json.loads(os.environ.get("SCIENCE_SIZE", "{}"))}


class Step(IterativePE):
    def __init__(self, function):
        IterativePE.__init__(self)
        self.function = function

    def _process(self, data):
        return self.function(data)


# -- seismic ----------------------------------------------------------------------------------


class Synthesise(ProducerPE):
    def _process(self, inputs):
        wanted = size(_lib("seismic").DEFAULTS)
        for index in range(int(wanted["stations"])):
            self.write("output", (index, float(wanted["seconds"]), int(wanted["seed"])))


class PairUp(GenericPE):
    def __init__(self):
        GenericPE.__init__(self)
        self._add_input("input", grouping="global")
        self._add_output("output")
        self.seen = {}

    def _process(self, inputs):
        trace = inputs["input"]
        for other in self.seen.values():
            self.write("output", tuple(sorted((other, trace), key=lambda t: t.station)))
        self.seen[trace.station] = trace


def correlate_pair(pair):
    return _lib("seismic").correlate(*pair)


def seismic_graph():
    graph = WorkflowGraph()
    previous = Synthesise()
    for function in (_lib("seismic").record, *_lib("seismic").STEPS):
        step = Step(function)
        graph.connect(previous, "output", step, "input")
        previous = step
    pairs = PairUp()
    graph.connect(previous, "output", pairs, "input")
    graph.connect(pairs, "output", Step(correlate_pair), "input")
    return graph


# -- astrophysics ------------------------------------------------------------------------------


class ReadCatalogue(ProducerPE):
    def _process(self, inputs):
        import io

        from astropy.io.votable import parse_single_table

        astro = _lib("astro")
        wanted = size(astro.DEFAULTS)
        table = parse_single_table(io.BytesIO(astro.catalogue(int(wanted["galaxies"]), int(wanted["seed"])))).array
        for row in table:
            self.write("output", (str(row["name"]), float(row["ra"]), float(row["dec"])))


class QueryBlocking(IterativePE):
    def _process(self, galaxy):
        return _lib("astro").query_blocking(_lib("astro").service_url(), galaxy[0])


def extinction(record):
    name, t, logr25 = record
    return name, t, _lib("astro").internal_extinction(t, logr25)


class StatsPerType(GenericPE):
    def __init__(self):
        GenericPE.__init__(self)
        self._add_input("input", grouping=[1])
        self._add_output("output")
        self.values = {}

    def _process(self, inputs):
        _, t, value = inputs["input"]
        self.values.setdefault(t, []).append(value)

    def _postprocess(self):
        for t in sorted(self.values):
            self.write("output", _lib("astro").summarise(t, self.values[t]))


def astro_graph():
    graph = WorkflowGraph()
    read, query, ext = ReadCatalogue(), QueryBlocking(), Step(extinction)
    graph.connect(read, "output", query, "input")
    graph.connect(query, "output", ext, "input")
    graph.connect(ext, "output", StatsPerType(), "input")
    return graph


# -- sentiment ---------------------------------------------------------------------------------


class Articles(ProducerPE):
    def _process(self, inputs):
        wanted = size(_lib("sentiment").DEFAULTS)
        words = _lib("sentiment").lexicon_words()
        for number in range(int(wanted["articles"])):
            self.write("output", _lib("sentiment").article(number, int(wanted["seed"]), words))


class ScoreAfinn(IterativePE):
    def _preprocess(self):
        from afinn import Afinn

        self.scorer = Afinn()

    def _process(self, item):
        return item[0], item[1], _lib("sentiment").score_afinn(self.scorer, item[3])


class ScoreVader(IterativePE):
    def _preprocess(self):
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self.scorer = SentimentIntensityAnalyzer()

    def _process(self, item):
        return item[0], item[1], _lib("sentiment").score_vader(self.scorer, item[2])


class JoinScores(GenericPE):
    def __init__(self):
        GenericPE.__init__(self)
        self._add_input("afinn", grouping=[0])
        self._add_input("vader", grouping=[0])
        self._add_output("output")
        self.waiting = {}

    def _process(self, inputs):
        port, (article_id, state, score) = next(iter(inputs.items()))
        halves = self.waiting.setdefault(article_id, {})
        halves[port] = score
        if len(halves) == 2:
            del self.waiting[article_id]
            self.write("output", (article_id, state, halves["afinn"], halves["vader"]))


class PerState(GenericPE):
    def __init__(self):
        GenericPE.__init__(self)
        self._add_input("input", grouping=[1])
        self._add_output("output")
        self.scores = {}

    def _process(self, inputs):
        _, state, afinn, vader = inputs["input"]
        lists = self.scores.setdefault(state, ([], []))
        lists[0].append(afinn)
        lists[1].append(vader)

    def _postprocess(self):
        for state in sorted(self.scores):
            self.write("output", _lib("sentiment").state_summary(state, *self.scores[state]))


class TopBottom(GenericPE):
    def __init__(self):
        GenericPE.__init__(self)
        self._add_input("input", grouping="global")
        self._add_output("output")
        self.summaries = []

    def _process(self, inputs):
        self.summaries.append(inputs["input"])

    def _postprocess(self):
        for entry in _lib("sentiment").ranking(self.summaries):
            self.write("output", entry)


def sentiment_graph():
    graph = WorkflowGraph()
    articles, tokens, afinn, vader = Articles(), Step(_lib("sentiment").tokenise), ScoreAfinn(), ScoreVader()
    join, per_state = JoinScores(), PerState()
    graph.connect(articles, "output", tokens, "input")
    graph.connect(tokens, "output", afinn, "input")
    graph.connect(tokens, "output", vader, "input")
    graph.connect(afinn, "output", join, "afinn")
    graph.connect(vader, "output", join, "vader")
    graph.connect(join, "output", per_state, "input")
    graph.connect(per_state, "output", TopBottom(), "input")
    return graph


GRAPHS = {"seismic": seismic_graph, "astro": astro_graph, "sentiment": sentiment_graph}


def __getattr__(name):
    """``-a seismic`` (or astro, sentiment) builds that graph only."""
    if name in GRAPHS:
        return GRAPHS[name]()
    raise AttributeError(name)
