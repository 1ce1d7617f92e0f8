"""Plots for people who would rather look than read (matplotlib, from ``aiod4p[plot]``)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

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
        raise Aiod4pError("plots need matplotlib: pip install 'aiod4p[plot]'") from None
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
    if not isinstance(document, dict) or not isinstance(document.get("pes"), dict):
        raise Aiod4pError(f"{path} is not a statistics file written by `aiod4p run --stats-json`")
    samples = document.get("samples") or []
    if not samples:  # the end figures alone still give each PE's mean rate
        samples = [
            {
                "t": document.get("elapsed_seconds", 0.0),
                "pes": {pe: [s["items_in"], s["items_out"], s["busy_seconds"]] for pe, s in document["pes"].items()},
            }
        ]
    zero = {"t": 0.0, "pes": {pe: [0, 0, 0.0] for pe in document["pes"]}}
    return document, [zero, *samples]


def plot_stats(path: str | Path, output: str | Path) -> Path:
    """Draw per-PE throughput (items in per second) and busy share over the run to ``output``.

    Rates are taken between successive samples of the file (every 0.25 s
    for one event loop; as often as worker processes report on the others).

    Raises:
        Aiod4pError: as :func:`load_samples`, or the picture cannot be written.
    """
    document, samples = load_samples(path)
    plt = pyplot()
    figure, (rate_axes, busy_axes) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    for pe in document["pes"]:
        times, rates, busy = [], [], []
        for before, after in itertools.pairwise(samples):
            span = after["t"] - before["t"]
            if span <= 0 or pe not in after["pes"]:
                continue
            old = before["pes"].get(pe, [0, 0, 0.0])
            new = after["pes"][pe]
            times.append(after["t"])
            rates.append((new[0] - old[0]) / span)
            busy.append(100.0 * (new[2] - old[2]) / span)
        rate_axes.step(times, rates, where="pre", label=pe)
        busy_axes.step(times, busy, where="pre", label=pe)
    rate_axes.set_ylabel("items in / s")
    busy_axes.set_ylabel("busy (% of one core)")
    busy_axes.set_xlabel("seconds since the start")
    title = f"{document.get('mapping') or ''} -n {document.get('workers')}, {document.get('elapsed_seconds', 0):.2f} s"
    rate_axes.set_title(f"Per-PE throughput and busy time ({title})")
    rate_axes.legend(fontsize="small", loc="best")
    figure.tight_layout()
    output = Path(output)
    try:
        figure.savefig(output)
    except (OSError, ValueError) as exc:
        raise Aiod4pError(f"cannot write plot {output}: {exc}") from exc
    finally:
        plt.close(figure)
    return output
