"""Sentiment of news articles per US state (Filgueira et al., IJHPCA 2017, third use case).

    aiod4p run examples/science/sentiment.py -i 1 --mapping multi -n 4
    aiod4p run examples/science/sentiment.py -d '{"Articles": [{"articles": 5000}]}' -m mpi -n 4

Articles are tokenised, then scored by two methods that ship their lexicons:
AFINN (word valences, :mod:`afinn`) and VADER (rules and valences,
:mod:`vaderSentiment`). The two scores of an article are joined (both inputs
grouped by article id), aggregated per state (grouped by state), and the
last PE names the top and bottom states.

Results: ``("state", name, articles, mean AFINN, mean VADER)`` per state and
``("top", [...])``, ``("bottom", [...])`` ranked by mean VADER compound.

The synthetic articles are deterministic (seeded): each state has its own
share of positive words (:func:`positivity`), so the ranking is known.
Size knob: ``articles`` (and ``seed``). Each call of the root writes the
articles that follow the previous call's (``-i 2``: A000000 to A000999, as
``articles: 1000`` once), so every article id is unique.
"""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np
from afinn import Afinn
from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

from aiod4p import GenericPE, IterativePE, WorkflowGraph, group_by

DEFAULTS = {"articles": 500, "seed": 2017}
# each setting's kind and least value
LEAST = {"articles": (int, 1), "seed": (int, 0)}
RANKED = 3  # states named at the top and at the bottom
STATES = tuple(
    [
        "Alabama",
        "Alaska",
        "Arizona",
        "Arkansas",
        "California",
        "Colorado",
        "Connecticut",
        "Delaware",
        "Florida",
        "Georgia",
        "Hawaii",
        "Idaho",
        "Illinois",
        "Indiana",
        "Iowa",
        "Kansas",
        "Kentucky",
        "Louisiana",
        "Maine",
        "Maryland",
        "Massachusetts",
        "Michigan",
        "Minnesota",
        "Mississippi",
        "Missouri",
        "Montana",
        "Nebraska",
        "Nevada",
        "New Hampshire",
        "New Jersey",
        "New Mexico",
        "New York",
        "North Carolina",
        "North Dakota",
        "Ohio",
        "Oklahoma",
        "Oregon",
        "Pennsylvania",
        "Rhode Island",
        "South Carolina",
        "South Dakota",
        "Tennessee",
        "Texas",
        "Utah",
        "Vermont",
        "Virginia",
        "Washington",
        "West Virginia",
        "Wisconsin",
        "Wyoming",
    ]
)
FILLER = [
    "the",
    "a",
    "of",
    "to",
    "in",
    "and",
    "on",
    "for",
    "with",
    "council",
    "state",
    "officials",
    "report",
    "week",
    "said",
    "year",
    "city",
    "county",
    "local",
    "people",
    "public",
    "plan",
    "project",
    "school",
    "road",
    "water",
    "market",
    "budget",
    "meeting",
    "vote",
    "bill",
    "court",
    "police",
    "team",
    "game",
    "season",
    "new",
    "after",
    "before",
    "during",
    "about",
    "from",
    "by",
    "at",
    "as",
    "is",
    "was",
    "were",
    "will",
    "has",
    "have",
    "this",
    "that",
    "their",
    "its",
]
WORD = re.compile(r"[a-z']+")

# -- the synthetic input --------------------------------------------------------------------------


def lexicon_words() -> tuple[list[str], list[str]]:
    """Single positive and negative words of AFINN's lexicon, sorted (deterministic)."""
    valences = Afinn()._dict
    positive = sorted(w for w, v in valences.items() if v >= 2 and w.isalpha())
    negative = sorted(w for w, v in valences.items() if v <= -2 and w.isalpha())
    return positive, negative


def positivity(state: str, seed: int) -> float:
    """The share of positive sentiment words in ``state``'s articles."""
    index = STATES.index(state)
    return float(np.random.default_rng([seed, index]).uniform(0.15, 0.85))


def article(number: int, seed: int, words: tuple[list[str], list[str]]) -> dict[str, Any]:
    """Article ``number``: ``{"id", "state", "text"}`` of 60 to 180 words, about 15% of them sentiment words."""
    rng = np.random.default_rng([seed, number, 7])
    state = STATES[int(rng.integers(len(STATES)))]
    share = positivity(state, seed)
    positive, negative = words
    tokens = []
    for _ in range(int(rng.integers(60, 180))):
        draw = rng.random()
        if draw < 0.15 * share:
            tokens.append(positive[int(rng.integers(len(positive)))])
        elif draw < 0.15:
            tokens.append(negative[int(rng.integers(len(negative)))])
        else:
            tokens.append(FILLER[int(rng.integers(len(FILLER)))])
    sentences = [" ".join(tokens[i : i + 12]).capitalize() + "." for i in range(0, len(tokens), 12)]
    return {"id": f"A{number:06d}", "state": state, "text": " ".join(sentences)}


# -- the processing steps (plain functions: dispel4py's version of this workflow uses them too) ----


def tokenise(item: dict[str, Any]) -> tuple[str, str, str, list[str]]:
    return item["id"], item["state"], item["text"], WORD.findall(item["text"].lower())


def score_afinn(scorer: Afinn, tokens: list[str]) -> float:
    return float(scorer.score(" ".join(tokens)))


def score_vader(scorer: SentimentIntensityAnalyzer, text: str) -> float:
    return float(scorer.polarity_scores(text)["compound"])


def state_summary(state: str, afinn: list[float], vader: list[float]) -> tuple[str, str, int, float, float]:
    """Exact sums, so the order of arrival does not matter."""
    count = len(afinn)
    return "state", state, count, round(math.fsum(afinn) / count, 4), round(math.fsum(vader) / count, 4)


def ranking(summaries: list[tuple[str, str, int, float, float]]) -> list[tuple[str, list[str]]]:
    """The ``RANKED`` top and bottom states by mean VADER compound (then AFINN, then name)."""
    ordered = sorted(summaries, key=lambda s: (-s[4], -s[3], s[1]))
    return [("top", [s[1] for s in ordered[:RANKED]]), ("bottom", [s[1] for s in ordered[-RANKED:][::-1]])]


def settings(given: Any) -> dict[str, Any]:
    """:data:`DEFAULTS` updated with ``given``, the root's input: a dict of some of its settings.

    Raises:
        ValueError: ``given`` is not a dict, names a setting :data:`DEFAULTS` lacks, or gives one a value
            that is not a number of :data:`LEAST`'s kind and at least its least value.
    """
    if not isinstance(given, dict):
        raise ValueError(f"the input {given!r} is not a dict of settings ({', '.join(DEFAULTS)})")
    unknown = [name for name in given if name not in DEFAULTS]
    if unknown:
        raise ValueError(f"unknown setting {unknown[0]!r}: the settings are {', '.join([*DEFAULTS])}")
    size = {**DEFAULTS, **given}
    for name, (kind, least) in LEAST.items():
        value = size[name]
        number = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        if not number or value < least or (kind is int and value != int(value)):
            whole = "a whole number" if kind is int else "a number"
            raise ValueError(f"{name} must be {whole} of at least {least:g}, not {value!r}")
        size[name] = kind(value)
    return size


# -- the workflow ----------------------------------------------------------------------------


class Articles(GenericPE):
    """Emits the articles; the input (optional) sets ``articles`` and ``seed``.

    Each call writes the articles numbered after the previous call's (``-i 2``: A000000 to A000999, as
    ``articles: 1000`` once): ``JoinScores`` joins an article's two scores by its id, which must be unique.
    """

    def __init__(self) -> None:
        super().__init__(inputs=["size"], outputs=["output"])
        self.next_article = 0  # the number of the next call's first article

    def process(self, inputs: dict[str, Any]) -> None:
        size = settings(inputs.get("size", {}))
        first, self.next_article = self.next_article, self.next_article + int(size["articles"])
        self.annotate(**size, first_article=first, generator="synthetic news")
        words = lexicon_words()
        for number in range(first, self.next_article):
            self.write("output", article(number, int(size["seed"]), words))


class Tokenise(IterativePE):
    """``{"id", "state", "text"}`` to ``(id, state, text, tokens)``."""

    def process_item(self, item: dict[str, Any]) -> tuple[str, str, str, list[str]]:
        return tokenise(item)


class ScoreAfinn(IterativePE):
    """``(id, state, AFINN score)``."""

    def preprocess(self) -> None:
        self.scorer = Afinn()
        self.annotate(lexicon="AFINN-en-165")

    def process_item(self, item: tuple[str, str, str, list[str]]) -> tuple[str, str, float]:
        return item[0], item[1], score_afinn(self.scorer, item[3])


class ScoreVader(IterativePE):
    """``(id, state, VADER compound score)``."""

    def preprocess(self) -> None:
        self.scorer = SentimentIntensityAnalyzer()
        self.annotate(lexicon="vader_lexicon", vaderSentiment="3.3")

    def process_item(self, item: tuple[str, str, str, list[str]]) -> tuple[str, str, float]:
        return item[0], item[1], score_vader(self.scorer, item[2])


class JoinScores(GenericPE):
    """Joins an article's two scores (both inputs grouped by article id): ``(id, state, afinn, vader)``."""

    def __init__(self) -> None:
        super().__init__(inputs=[("afinn", group_by(0)), ("vader", group_by(0))], outputs=["output"])
        self.waiting: dict[str, dict[str, Any]] = {}

    def process(self, inputs: dict[str, Any]) -> dict[str, Any] | None:
        (port, (article_id, state, score)) = next(iter(inputs.items()))
        halves = self.waiting.setdefault(article_id, {})
        halves[port] = score
        self.remember(article_id)  # provenance: the joined row derives from both scores
        if len(halves) < 2:
            return None
        del self.waiting[article_id]
        self.recall(article_id)
        return {"output": (article_id, state, halves["afinn"], halves["vader"])}


class PerState(GenericPE):
    """Mean scores per state (grouped by state): ``("state", name, articles, mean AFINN, mean VADER)``."""

    def __init__(self) -> None:
        super().__init__(inputs=[("input", group_by(1))], outputs=["output", "summary"])
        self.scores: dict[str, tuple[list[float], list[float]]] = {}

    def process(self, inputs: dict[str, Any]) -> None:
        _, state, afinn, vader = inputs["input"]
        lists = self.scores.setdefault(state, ([], []))
        lists[0].append(afinn)
        lists[1].append(vader)
        self.remember(state)

    def postprocess(self) -> None:
        for state in sorted(self.scores):
            self.recall(state)
            summary = state_summary(state, *self.scores[state])
            self.write("summary", summary)
            self.write("output", summary)


class TopBottom(GenericPE):
    """The top and bottom states (one instance sees every state)."""

    def __init__(self) -> None:
        super().__init__(inputs=[("input", "global")], outputs=["output"])
        self.summaries: list[tuple[str, str, int, float, float]] = []

    def process(self, inputs: dict[str, Any]) -> None:
        self.summaries.append(inputs["input"])

    def postprocess(self) -> None:
        for entry in ranking(self.summaries):
            self.write("output", entry)


def build(graph: WorkflowGraph | None = None) -> WorkflowGraph:
    """The workflow, added to ``graph`` when given (several workflows can share one run)."""
    graph = graph if graph is not None else WorkflowGraph()
    articles, tokens, afinn, vader = Articles(), Tokenise(), ScoreAfinn(), ScoreVader()
    join, per_state, ranked = JoinScores(), PerState(), TopBottom()
    graph.connect(articles, "output", tokens, "input")
    graph.connect(tokens, "output", afinn, "input")
    graph.connect(tokens, "output", vader, "input")
    graph.connect(afinn, "output", join, "afinn")
    graph.connect(vader, "output", join, "vader")
    graph.connect(join, "output", per_state, "input")
    graph.connect(per_state, "output", ranked, "input")
    return graph


graph = build()
