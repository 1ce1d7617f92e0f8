"""dispel4py 2.0's seismology helpers (``dispel4py.seismo.seismo``) on aiod4p.

:class:`SeismoPE` is a :class:`~aiod4p.compat.provenance.ProvenanceType` PE
whose items are obspy ``Stream``/``Trace`` objects (or tuples and lists
holding one): the metadata of each trace it writes (its ``stats``: network,
station, channel, start and end time, sampling rate, ...) is recorded as
provenance. obspy (the ``seismo`` extra) is imported when a
``SeismoPE`` first extracts metadata, not when this module is imported.
"""

from __future__ import annotations

from typing import Any

from .._install import install_hint
from ..errors import Aiod4pError
from .base import SimpleFunctionPE
from .provenance import ProvenanceType

__all__ = ["SeismoPE", "SeismoSimpleFunctionPE", "stream_metadata"]

SEIS_NAMESPACE = ("seis", "http://seis-prov.eu/ns/#")


def _obspy() -> Any:
    try:
        import obspy
    except ImportError as exc:
        raise Aiod4pError(f"dispel4py.seismo needs obspy, which is not installed: {install_hint('seismo')}") from exc
    return obspy


def _traces(data: Any) -> list[Any]:
    """The obspy traces in ``data``: a Trace, a Stream, or a tuple/list holding them."""
    obspy = _obspy()
    if isinstance(data, obspy.Trace):
        return [data]
    if isinstance(data, obspy.Stream):
        return list(data)
    if isinstance(data, (tuple, list)):
        return [trace for part in data if isinstance(part, (obspy.Trace, obspy.Stream)) for trace in _traces(part)]
    return []


def _plain(value: Any) -> Any:
    """A stats value as recorded: numbers and strings as they are, anything else (UTCDateTime, ...) as text."""
    return value if isinstance(value, (int, float, str)) else str(value)


def stream_metadata(data: Any) -> list[dict[str, Any]]:
    """One metadata dict per trace in ``data`` (``prov:type`` ``waveform`` and the trace's stats)."""
    return [
        {"prov:type": "waveform", **{k: _plain(v) for k, v in trace.stats.items() if not isinstance(v, dict)}}
        for trace in _traces(data)
    ]


class SeismoPE(ProvenanceType):
    """dispel4py's ``SeismoPE``: a provenance-aware PE over obspy streams.

    Subclass it (with a PE base such as ``IterativePE``, or declaring ports
    with ``_add_input``/``_add_output``) and write obspy ``Stream``s: each
    write records its traces' metadata (:func:`stream_metadata`).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.addNamespacePrefix(*SEIS_NAMESPACE)

    def extractItemMetadata(self, data: Any, port: str) -> Any:
        """The metadata of the traces in ``data`` (none when it holds no obspy trace)."""
        return stream_metadata(data)


class SeismoSimpleFunctionPE(SeismoPE, SimpleFunctionPE):
    """dispel4py's ``SeismoSimpleFunctionPE``: ``compute_fn(stream, **params)`` per item, with its metadata."""
