"""Seismic ambient-noise cross-correlation (Filgueira et al., IJHPCA 2017, first use case).

    aiod4p run examples/science/seismic.py -i 1 --mapping multi -n 4
    aiod4p run examples/science/seismic.py -d '{"Synthesise": [{"stations": 24, "seconds": 1800}]}' -m mpi -n 4

Every station records the same ambient noise field, each with its own delay
(the travel time from the noise source), plus local noise, an offset, a
linear trend and a low-frequency hum. The root emits one request per
station and ``Record`` makes its trace, stations in parallel (where a real
workflow reads each station's file). Each trace goes through the usual
preprocessing chain, one PE per step: detrend, demean, band-pass
(Butterworth, zero phase), spectral whitening and decimation. Then every pair
of stations is cross-correlated (windowed, stacked) and the lag of the
correlation peak is the travel-time difference between the two stations: the
result ``(station_i, station_j, lag_seconds, peak)`` recovers the hidden
``delay_j - delay_i`` (see :func:`true_lags`).

The synthetic data is deterministic (seeded per station), so every mapping
gives the same results. Size knobs: ``stations`` and ``seconds``. Each call of
the root adds new stations to the same network (``-i 2``: stations ST000 to
ST015, as ``stations: 16`` once), every pair of them correlated.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.signal

from aiod4p import GenericPE, IterativePE, WorkflowGraph

RATE = 100.0  # samples per second recorded
DECIMATE = 4  # the chain keeps one sample in four: 25 Hz
BAND = (0.5, 5.0)  # Hz, the band-pass
WINDOW = 60.0  # seconds per correlation window (the windows are stacked)
MAX_LAG = 8.0  # seconds searched either side of zero
MAX_DELAY = 3.0  # seconds: the hidden delays lie in [0, MAX_DELAY)
DEFAULTS = {"stations": 8, "seconds": 600, "seed": 2017}
# each setting's kind and least value: a pair of stations, one correlation window
LEAST = {"stations": (int, 2), "seconds": (float, WINDOW), "seed": (int, 0)}


@dataclass
class Trace:
    """One station's samples (float64) at ``rate`` samples per second."""

    station: str
    rate: float
    data: np.ndarray[Any, np.dtype[np.float64]]


# -- the synthetic input ---------------------------------------------------------------


def station_name(index: int) -> str:
    return f"ST{index:03d}"


def delay_of(index: int, seed: int) -> float:
    """The hidden delay of station ``index``, a whole number of decimated samples."""
    step = DECIMATE / RATE
    rng = np.random.default_rng([seed, index, 1])
    return float(rng.integers(0, int(MAX_DELAY / step))) * step


def true_lags(stations: int, seed: int = DEFAULTS["seed"]) -> dict[tuple[str, str], float]:
    """The travel-time difference ``delay_j - delay_i`` of every pair ``i < j``."""
    return {
        (station_name(i), station_name(j)): round(delay_of(j, seed) - delay_of(i, seed), 3)
        for i, j in itertools.combinations(range(stations), 2)
    }


def synthesise(index: int, seconds: float, seed: int) -> Trace:
    """Station ``index``'s record: the common noise field, delayed, plus local noise, offset, trend and hum."""
    samples = int(seconds * RATE)
    spare = int(MAX_DELAY * RATE) + 1
    field = np.random.default_rng([seed, 0]).standard_normal(samples + spare)
    shift = round(delay_of(index, seed) * RATE)
    local = np.random.default_rng([seed, index, 2])
    data = field[spare - shift : spare - shift + samples] + 1.5 * local.standard_normal(samples)
    t = np.arange(samples) / RATE
    data += local.uniform(-50, 50) + local.uniform(-0.05, 0.05) * t + 20 * np.sin(2 * np.pi * 0.03 * t)
    return Trace(station_name(index), RATE, data)


def record(request: tuple[int, float, int]) -> Trace:
    """The record of the station that ``(index, seconds, seed)`` asks for.

    A real workflow reads the station's file (miniSEED) here, one station per
    call, as many at once as there are instances; this one synthesises it.
    """
    index, seconds, seed = request
    return synthesise(index, seconds, seed)


# -- the processing steps (plain functions: dispel4py's version of this workflow uses them too) ----


def detrend(trace: Trace) -> Trace:
    return Trace(trace.station, trace.rate, scipy.signal.detrend(trace.data, type="linear"))


def demean(trace: Trace) -> Trace:
    return Trace(trace.station, trace.rate, trace.data - trace.data.mean())


def bandpass(trace: Trace, low: float = BAND[0], high: float = BAND[1]) -> Trace:
    sos = scipy.signal.butter(4, [low, high], btype="bandpass", fs=trace.rate, output="sos")
    return Trace(trace.station, trace.rate, scipy.signal.sosfiltfilt(sos, trace.data))


def whiten(trace: Trace, smooth_hz: float = 0.2) -> Trace:
    """Spectral whitening: divide the spectrum by its smoothed amplitude inside the band, zero outside."""
    spectrum = np.fft.rfft(trace.data)
    freqs = np.fft.rfftfreq(len(trace.data), 1.0 / trace.rate)
    width = max(1, int(smooth_hz / (freqs[1] - freqs[0])))
    amplitude = np.convolve(np.abs(spectrum), np.ones(width) / width, mode="same")
    inside = (freqs >= BAND[0]) & (freqs <= BAND[1])
    white = np.zeros_like(spectrum)
    white[inside] = spectrum[inside] / np.maximum(amplitude[inside], 1e-12)
    return Trace(trace.station, trace.rate, np.fft.irfft(white, n=len(trace.data)))


def decimate(trace: Trace, factor: int = DECIMATE) -> Trace:
    return Trace(trace.station, trace.rate / factor, scipy.signal.decimate(trace.data, factor, ftype="fir"))


def correlate(first: Trace, second: Trace) -> tuple[str, str, float, float]:
    """Windowed cross-correlation of two traces, stacked: ``(station_i, station_j, lag_s, peak)``.

    The lag is positive when ``second`` records the field later than ``first``.
    """
    window = int(WINDOW * first.rate)
    count = min(len(first.data), len(second.data)) // window
    a = first.data[: count * window].reshape(count, window)
    b = second.data[: count * window].reshape(count, window)
    size = 2 * window
    stacked = np.fft.irfft(np.fft.rfft(b, size) * np.conj(np.fft.rfft(a, size)), size).sum(axis=0)
    stacked /= np.sqrt((a * a).sum() * (b * b).sum())
    reach = int(MAX_LAG * first.rate)
    lags = np.concatenate([np.arange(0, reach + 1), np.arange(-reach, 0)])
    values = np.concatenate([stacked[: reach + 1], stacked[-reach:]])
    best = int(np.argmax(values))
    return first.station, second.station, round(float(lags[best] / first.rate), 3), round(float(values[best]), 4)


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


class Synthesise(GenericPE):
    """Emits one request ``(index, seconds, seed)`` per station, which ``Record`` turns into its raw trace;
    the input (optional) sets ``stations``, ``seconds`` and ``seed``.

    Each call adds new stations to the network: the first call's are numbered from 0, the next call's
    from where the previous one stopped (``-i 2`` makes stations 0 to 15, as ``stations: 16`` once), so
    every station is unique and every pair, across calls too, has its hidden lag (:func:`true_lags`).

    Raises:
        ValueError: a later call gives another ``seed`` than the first: its stations would record
            another noise field, and their pairs with the first call's stations would have no lag to find.
    """

    def __init__(self) -> None:
        super().__init__(inputs=["size"], outputs=["output"])
        self.next_station = 0  # the index of the next call's first station
        self.field_seed: int | None = None  # the seed of the noise field, set by the first call

    def process(self, inputs: dict[str, Any]) -> None:
        size = settings(inputs.get("size", {}))
        seed = int(size["seed"])
        if self.field_seed is not None and seed != self.field_seed:
            raise ValueError(
                f"seed {seed} differs from the first call's {self.field_seed}: every call adds stations to one"
                " network recording one noise field (run another seed as a run of its own)"
            )
        self.field_seed = seed
        first, self.next_station = self.next_station, self.next_station + int(size["stations"])
        self.annotate(**size, first_station=first, rate=RATE, generator="synthetic ambient noise")
        for index in range(first, self.next_station):
            self.write("output", (index, float(size["seconds"]), seed))


class Step(IterativePE):
    """One preprocessing step: applies ``function`` to every trace."""

    def __init__(self, function: Any, name: str) -> None:
        super().__init__(name=name)
        self.function = function

    def preprocess(self) -> None:
        self.annotate(scipy=scipy.__version__, numpy=np.__version__, step=self.function.__name__)

    def process_item(self, trace: Trace) -> Trace:
        result: Trace = self.function(trace)
        return result


class PairUp(GenericPE):
    """Emits every pair of stations as soon as its second trace arrives (one instance sees every trace)."""

    def __init__(self) -> None:
        super().__init__(inputs=[("input", "global")], outputs=["output"])
        self.seen: dict[str, Trace] = {}

    def process(self, inputs: dict[str, Any]) -> None:
        trace: Trace = inputs["input"]
        self.remember(trace.station)  # provenance: a pair derives from both of its traces
        for other in self.seen.values():
            first, second = sorted((other, trace), key=lambda t: t.station)
            self.recall(first.station, second.station)
            self.write("output", (first, second))
        self.seen[trace.station] = trace


class CrossCorrelate(IterativePE):
    """Cross-correlates a pair of traces: ``(station_i, station_j, lag_s, peak)``."""

    def preprocess(self) -> None:
        self.annotate(window_s=WINDOW, max_lag_s=MAX_LAG)

    def process_item(self, pair: tuple[Trace, Trace]) -> tuple[str, str, float, float]:
        return correlate(*pair)


STEPS = (detrend, demean, bandpass, whiten, decimate)


def build(graph: WorkflowGraph | None = None) -> WorkflowGraph:
    """The workflow, added to ``graph`` when given (several workflows can share one run)."""
    graph = graph if graph is not None else WorkflowGraph()
    previous: GenericPE = Synthesise()
    for function in (record, *STEPS):
        step = Step(function, function.__name__.capitalize())
        graph.connect(previous, "output", step, "input")
        previous = step
    pairs, xcorr = PairUp(), CrossCorrelate()
    graph.connect(previous, "output", pairs, "input")
    graph.connect(pairs, "output", xcorr, "input")
    return graph


graph = build()
