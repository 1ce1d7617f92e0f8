"""Word count: split lines into words, count each word in parallel by key.

    aiod4p run examples/wordcount.py -i 1 --mapping async -n 4

The counter runs several instances; ``group_by(0)`` sends every occurrence of a
word to the same instance, so each word's count is complete in one place.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

from aiod4p import GenericPE, IterativePE, ProducerPE, WorkflowGraph, group_by

TEXT = """\
the quick brown fox jumps over the lazy dog
the dog barks and the fox runs
a streaming workflow counts the words of a stream
"""


class ReadLines(ProducerPE):
    """Emits every line of the text, once per call."""

    def __init__(self, text: str = TEXT) -> None:
        super().__init__()
        self.text = text

    def produce(self) -> Iterator[str]:
        yield from self.text.splitlines()


class SplitWords(IterativePE):
    """Emits ``(word, 1)`` for every word of a line."""

    def process_item(self, line: str) -> None:
        for word in line.split():
            self.write("output", (word.lower(), 1))


class CountWords(GenericPE):
    """Totals the counts of the words it sees and emits them at the end."""

    def __init__(self) -> None:
        super().__init__(inputs=[("input", group_by(0))], outputs=["output"], parallelism=3)
        self.counts: Counter[str] = Counter()

    def process(self, inputs: dict[str, Any]) -> None:
        word, count = inputs["input"]
        self.counts[word] += count
        self.remember(word)  # provenance: this line's word counts towards `word`

    def postprocess(self) -> None:
        for word, count in sorted(self.counts.items()):
            self.recall(word)  # provenance: the count derives from exactly the lines with `word`
            self.write("output", (word, count))


def build() -> WorkflowGraph:
    graph = WorkflowGraph()
    lines, words, counts = ReadLines(), SplitWords(), CountWords()
    graph.connect(lines, "output", words, "input")
    graph.connect(words, "output", counts, "input")
    return graph


graph = build()
