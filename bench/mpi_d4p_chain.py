"""The benchmark chain written for dispel4py 1.2.1: producer -> 3 trivial iterative PEs -> consumer.

The same PEs as bench/chain.py, in dispel4py's API, for dispel4py's own mappings
(``mpiexec -n 5 dispel4py mpi bench/mpi_d4p_chain.py -i N``) in bench/bench_mpi.py.
"""

from dispel4py.base import ConsumerPE, IterativePE, ProducerPE
from dispel4py.workflow_graph import WorkflowGraph


class Numbers(ProducerPE):
    def __init__(self):
        ProducerPE.__init__(self)
        self.next = 0

    def _process(self, inputs):
        self.next += 1
        return self.next


class Increment(IterativePE):
    def _process(self, data):
        return data + 1


class Total(ConsumerPE):
    def __init__(self):
        ConsumerPE.__init__(self)
        self.total = 0

    def _process(self, data):
        self.total += data


graph = WorkflowGraph()
_previous = Numbers()
for _stage in (Increment(), Increment(), Increment()):
    graph.connect(_previous, "output", _stage, "input")
    _previous = _stage
graph.connect(_previous, "output", Total(), "input")
