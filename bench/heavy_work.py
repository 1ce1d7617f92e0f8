"""The work of the coarse-grained benchmark (bench_heavy.py), shared by its aiod4p and dispel4py versions.

Plain functions and data only: no workflow API here, so both versions do the
very same work on the very same input. Sizes: ``HEAVY_QUICK=1`` in the
environment gives the small ones. Sinks write their summary as JSON to the
file named by ``HEAVY_OUT``, so a run's results can be compared with another's.
"""

from __future__ import annotations

import json
import os
import random
import time
from typing import Any

import numpy as np

QUICK = os.environ.get("HEAVY_QUICK") == "1"

# -- seismic cross-correlation: every pair of stations ------------------------------------
STATIONS = 12 if QUICK else 30
SAMPLES = 16_384 if QUICK else 65_536


def station_traces() -> list[tuple[str, np.ndarray]]:
    """Noise records of every station, sharing one delayed source signal."""
    rng = np.random.default_rng(7)
    signal = rng.standard_normal(SAMPLES)
    traces = []
    for index in range(STATIONS):
        delay = index * 17
        trace = np.roll(signal, delay) + 0.5 * rng.standard_normal(SAMPLES)
        traces.append((f"ST{index:02d}", trace))
    return traces


def whiten(trace: np.ndarray) -> np.ndarray:
    """Detrend, normalise and whiten a trace: its spectrum with unit amplitude."""
    x = np.arange(trace.size)
    detrended = trace - np.polyval(np.polyfit(x, trace, 1), x)
    spectrum = np.fft.rfft(detrended / detrended.std(), n=2 * trace.size)
    return spectrum / (np.abs(spectrum) + 1e-9)


def xcorr_peak(left: np.ndarray, right: np.ndarray) -> int:
    """The lag (in samples) of the cross-correlation peak of two whitened spectra."""
    correlation = np.fft.irfft(left * np.conj(right))
    lag = int(np.argmax(correlation))
    return lag if lag < correlation.size // 2 else lag - correlation.size


# -- galaxies: a catalogue row, a slow remote lookup, a classification -------------------
GALAXIES = 400 if QUICK else 2_000
LOOKUP_SECONDS = 0.002  # one remote catalogue query


def galaxies() -> list[tuple[int, float, float, float]]:
    rng = random.Random(11)
    return [(index, rng.uniform(0, 360), rng.uniform(-90, 90), rng.uniform(10, 25)) for index in range(GALAXIES)]


def extinction(row: tuple[int, float, float, float]) -> tuple[int, float, float]:
    """What the (simulated) lookup answers: the row's id, magnitude and extinction."""
    index, ra, dec, mag = row
    return index, mag, round(abs(ra - dec) % 1.0, 6)


def classify(looked_up: tuple[int, float, float]) -> str:
    _, mag, ext = looked_up
    value = mag - ext
    for _ in range(200):  # a little pure-Python model work
        value = (value * 1.000001) % 30
    return "bright" if value < 15 else "faint" if value < 20 else "dim"


# -- articles: text scoring with a lexicon, totals per topic -----------------------------
ARTICLES = 1_000 if QUICK else 6_000
TOPICS = ("science", "sport", "politics", "culture", "economy")
_WORDS = [f"w{index}" for index in range(5_000)]
LEXICON = {word: (index % 11) - 5 for index, word in enumerate(_WORDS) if index % 3 == 0}


def articles() -> list[tuple[int, str, str]]:
    rng = random.Random(5)
    return [
        (index, TOPICS[index % len(TOPICS)], " ".join(rng.choices(_WORDS, k=rng.randint(200, 600))))
        for index in range(ARTICLES)
    ]


def score(article: tuple[int, str, str]) -> tuple[str, int]:
    _, topic, text = article
    total = 0
    for token in text.split():
        total += LEXICON.get(token.lower().strip(".,;"), 0)
    return topic, total


# -- the synthetic sweep: pure-Python work of a given cost -------------------------------
def calibrate() -> float:
    """Loop iterations of :func:`spin` per millisecond on this machine (measured once, in the parent)."""
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        spin(200_000)
        best = min(best, time.perf_counter() - started)
    return 200_000 / (best * 1000)


def spin(iterations: int) -> int:
    value = 0
    for index in range(iterations):
        value += index & 7
    return value


def write_summary(summary: Any) -> None:
    """Write a sink's summary where ``HEAVY_OUT`` says (nothing when it is unset).

    An empty summary is not written: dispel4py's multi mapping runs idle
    instances of a ``global`` sink too, and they must not overwrite the real one.
    """
    path = os.environ.get("HEAVY_OUT")
    if path and summary:
        with open(path, "w") as out:
            json.dump(summary, out, sort_keys=True)
