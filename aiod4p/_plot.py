"""Plots for people who would rather look than read (matplotlib, from ``aiod4p[plot]``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ._install import install_hint
from .errors import Aiod4pError

__all__ = ["plot_stats", "pyplot"]


def pyplot() -> Any:
    """matplotlib's pyplot on a non-interactive back end.

    Raises:
        Aiod4pError: matplotlib is not installed (the message names the extra).
    """
    try:
        import matplotlib
    except ImportError:
        raise Aiod4pError(f"plots need matplotlib: {install_hint('plot')}") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def load_samples(path: str | Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The ``--stats-json`` document at ``path`` and its samples, starting with an all-zero one at t=0.

    Raises:
        Aiod4pError: the file is missing, not JSON, or not a statistics file.
    """
    try:
        document = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise Aiod4pError(f"cannot read statistics file {path}: {exc.strerror or exc}") from exc
    except ValueError as exc:
        raise Aiod4pError(f"{path} is not JSON: {exc}") from exc
    not_stats = f"{path} is not a statistics file written by `aiod4p run --stats-json`"
    if not isinstance(document, dict) or not isinstance(document.get("pes"), dict):
        raise Aiod4pError(not_stats)
    samples = document.get("samples") or []
    if not samples:  # the end figures alone still give each PE's mean rate
        try:
            figures = {pe: [s["items_in"], s["items_out"], s["busy_seconds"]] for pe, s in document["pes"].items()}
        except (KeyError, TypeError) as exc:
            raise Aiod4pError(f"{not_stats}: its PEs' figures are not all there") from exc
        samples = [{"t": document.get("elapsed_seconds", 0.0), "pes": figures}]
    if not isinstance(samples, list):
        raise Aiod4pError(f"{not_stats}: its samples are not a list")
    for number, sample in enumerate(samples):
        if not _is_sample(sample):
            raise Aiod4pError(f"{not_stats}: sample {number} is not {{'t': seconds, 'pes': {{pe: [in, out, busy]}}}}")
    zero = {"t": 0.0, "pes": {pe: [0, 0, 0.0] for pe in document["pes"]}}
    return document, [zero, *samples]


def _is_sample(sample: Any) -> bool:
    """Whether ``sample`` is ``{"t": seconds, "pes": {pe: [items_in, items_out, busy_seconds]}}``."""

    def number(value: Any) -> bool:
        return isinstance(value, int | float) and not isinstance(value, bool)

    return (
        isinstance(sample, dict)
        and number(sample.get("t"))
        and isinstance(sample.get("pes"), dict)
        and all(isinstance(row, list) and len(row) == 3 and all(map(number, row)) for row in sample["pes"].values())
    )


def plot_stats(path: str | Path, output: str | Path) -> Path:
    """Draw per-PE throughput (items in per second) and busy time over the run to ``output``.

    The counters grow a batch at a time, so rates are averaged over a sliding
    window (a 25th of the run, at least 4 sampling intervals) of the
    cumulative figures, linearly interpolated between samples. Busy time is in
    percent of one core, summed over a PE's instances (so it may exceed 100).
    The title names the mapping, the workers, the run's length and, for a run
    that failed or was aborted (``"finished": false``), that it did not finish.

    Raises:
        Aiod4pError: as :func:`load_samples`, or the picture cannot be written.
    """
    plt = pyplot()
    import numpy as np  # matplotlib's own dependency

    document, samples = load_samples(path)
    times = np.array([sample["t"] for sample in samples], dtype=float)
    end = float(times[-1]) if len(times) else 0.0
    spacing = float(np.median(np.diff(times))) if len(times) > 2 else end
    window = max(end / 25, 4 * spacing) or 1.0
    grid = np.linspace(0.0, end, 200)
    figure, (rate_axes, busy_axes) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    for pe in document["pes"]:
        values = np.array([sample["pes"].get(pe, [0, 0, 0.0]) for sample in samples], dtype=float)
        for column, axes, scale in ((0, rate_axes, 1.0), (2, busy_axes, 100.0)):
            cumulative = np.interp(grid, times, values[:, column])
            earlier = np.interp(np.maximum(grid - window, 0.0), times, values[:, column])
            span = np.maximum(np.minimum(grid, window), 1e-9)
            axes.plot(grid, scale * (cumulative - earlier) / span, label=pe)
    rate_axes.set_ylabel("items in / s")
    busy_axes.set_ylabel("busy, % of one core")
    busy_axes.set_xlabel(f"seconds since the start (averaged over {window:.2f} s)")
    workers = document.get("workers")
    title = f"{document.get('mapping') or ''}, {workers} worker{'s' if workers != 1 else ''}, {end:.2f} s"
    if document.get("finished") is False:  # failed or aborted: the figures stop there
        title += ", did not finish"
    rate_axes.set_title(f"Per-PE throughput and busy time ({title})")
    rate_axes.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    figure.tight_layout()
    output = Path(output)
    try:
        figure.savefig(output)
    except (OSError, ValueError) as exc:
        raise Aiod4pError(f"cannot write plot {output}: {exc}") from exc
    finally:
        plt.close(figure)
    return output
