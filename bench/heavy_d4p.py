"""The coarse-grained benchmark's workflows in dispel4py 1.2.1's API (bench/heavy.py has them in aiod4p).

    dispel4py multi bench/heavy_d4p.py -a seismic -n 8 -i 1

The same work (bench/heavy_work.py) on the same input; the slow lookup
blocks, as a dispel4py PE does.
"""

import collections
import itertools
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import heavy_work as work
from dispel4py.base import GenericPE, IterativePE, ProducerPE
from dispel4py.workflow_graph import WorkflowGraph


class Stations(ProducerPE):
    def _process(self, inputs):
        for item in work.station_traces():
            self.write("output", item)


class Whiten(IterativePE):
    def _process(self, item):
        name, trace = item
        return name, work.whiten(trace)


class Pairs(GenericPE):
    def __init__(self):
        GenericPE.__init__(self)
        self._add_input("input", grouping="global")
        self._add_output("output")
        self.spectra = {}

    def _process(self, inputs):
        name, spectrum = inputs["input"]
        self.spectra[name] = spectrum

    def _postprocess(self):
        for left, right in itertools.combinations(sorted(self.spectra), 2):
            self.write("output", (left, right, self.spectra[left], self.spectra[right]))


class XCorr(IterativePE):
    def _process(self, item):
        left, right, a, b = item
        return left, right, work.xcorr_peak(a, b)


class Lags(GenericPE):
    def __init__(self):
        GenericPE.__init__(self)
        self._add_input("input", grouping="global")
        self.lags = []

    def _process(self, inputs):
        self.lags.append(tuple(inputs["input"]))

    def _postprocess(self):
        work.write_summary(sorted(self.lags))


class Catalogue(ProducerPE):
    def _process(self, inputs):
        for row in work.galaxies():
            self.write("output", row)


class Lookup(IterativePE):
    def _process(self, row):
        time.sleep(work.LOOKUP_SECONDS)
        return work.extinction(row)


class Classify(IterativePE):
    def _process(self, looked_up):
        return work.classify(looked_up)


class Census(GenericPE):
    def __init__(self):
        GenericPE.__init__(self)
        self._add_input("input", grouping="global")
        self.counts = collections.Counter()

    def _process(self, inputs):
        self.counts[inputs["input"]] += 1

    def _postprocess(self):
        work.write_summary(dict(self.counts))


class Articles(ProducerPE):
    def _process(self, inputs):
        for article in work.articles():
            self.write("output", article)


class Score(IterativePE):
    def _process(self, article):
        return work.score(article)


class TopicTotals(GenericPE):
    def __init__(self):
        GenericPE.__init__(self)
        self._add_input("input", grouping=[0])
        self._add_output("output")
        self.totals = collections.Counter()

    def _process(self, inputs):
        topic, value = inputs["input"]
        self.totals[topic] += value

    def _postprocess(self):
        for topic, total in self.totals.items():
            self.write("output", (topic, total))


class Summary(GenericPE):
    def __init__(self):
        GenericPE.__init__(self)
        self._add_input("input", grouping="global")
        self.totals = {}

    def _process(self, inputs):
        topic, total = inputs["input"]
        self.totals[topic] = total

    def _postprocess(self):
        work.write_summary(self.totals)


def _chain(*pes):
    graph = WorkflowGraph()
    for left, right in itertools.pairwise(pes):
        graph.connect(left, "output", right, "input")
    return graph


seismic = _chain(Stations(), Whiten(), Pairs(), XCorr(), Lags())
galaxies = _chain(Catalogue(), Lookup(), Classify(), Census())
articles = _chain(Articles(), Score(), TopicTotals(), Summary())
