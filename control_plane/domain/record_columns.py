"""A telemetry batch's records as columns: what the checks and the store work on (pure).

Agents send a batch as byte columns (``TelemetryColumns`` on the wire: seqs, creation times,
kind indexes, payload sizes, the payloads concatenated). The API edge turns those bytes into
numpy arrays without a copy (``from_buffers``, every length checked), and the screening,
the quota, deduplication and the segment the store writes are array operations over the whole
batch: a Python object per record cost the control plane more than everything else on the MQTT
telemetry path. Records are built one by one only for the few kinds whose payload is parsed
(drift windows, arm statistics, samples) and for what is refused.

Older agents send a message per record; ``of`` builds the same columns from those (and from
the records tests write).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from control_plane.domain.records import Derived, ReportRefusal, TelemetryRecord
from fleetcore.errors import InvalidInputError

__all__ = ["MAX_KIND_NAMES", "RecordColumns", "Seqs", "TelemetryWrite", "as_columns", "seq_runs"]

MAX_KIND_NAMES = 255  # a kind index is one byte
MAX_KIND_CHARS = 256  # longer kind names are cut (unknown kinds are refused anyway)
_U64, _F64, _U32 = np.dtype("<u8"), np.dtype("<f8"), np.dtype("<u4")
_LAST_SEQ = np.uint64(2**64 - 1)

# A batch's seqs as the checks hand them on (the acknowledged ones): its column, no list built.
Seqs = npt.NDArray[np.uint64]


@dataclass(frozen=True, eq=False)
class RecordColumns:
    """``n`` records. ``ends[i]`` is where record ``i``'s payload ends in ``payloads`` (it
    starts at ``ends[i] - sizes[i]``)."""

    seqs: npt.NDArray[np.uint64]
    created_at: npt.NDArray[np.float64]
    kind_names: tuple[str, ...]
    kind_index: npt.NDArray[np.uint8]
    sizes: npt.NDArray[np.uint32]
    payloads: bytes

    @classmethod
    def from_buffers(cls, seqs: bytes, created_at: bytes, kind_names: Sequence[str],
                     kind_index: bytes, sizes: bytes, payloads: bytes) -> RecordColumns:
        """Columns of the wire's bytes (little-endian), each checked against the others:
        ``n`` entries in each, an index per record into at most ``MAX_KIND_NAMES`` kinds,
        sizes that add up to the payload bytes. Anything else is ``InvalidInputError``."""
        if len(seqs) % 8:
            raise InvalidInputError(f"telemetry columns: {len(seqs)} bytes of seqs is not a "
                                    "whole number of 8-byte values")
        n = len(seqs) // 8
        for name, column, width in (("created_at", created_at, 8), ("kind_index", kind_index, 1),
                                    ("payload_sizes", sizes, 4)):
            if len(column) != n * width:
                raise InvalidInputError(f"telemetry columns: {name} holds {len(column)} bytes; "
                                        f"{n} records need {n * width}")
        if len(kind_names) > MAX_KIND_NAMES:
            raise InvalidInputError(f"telemetry columns name {len(kind_names)} kinds; at most "
                                    f"{MAX_KIND_NAMES}")
        index = np.frombuffer(kind_index, dtype=np.uint8)
        if n and int(index.max()) >= len(kind_names):
            raise InvalidInputError(f"telemetry columns: kind index {int(index.max())} but "
                                    f"{len(kind_names)} kinds named")
        size = np.frombuffer(sizes, dtype=_U32)
        if int(size.sum(dtype=np.uint64)) != len(payloads):
            raise InvalidInputError("telemetry columns: the payload sizes do not add up to the "
                                    f"{len(payloads)} payload bytes")
        return cls(np.frombuffer(seqs, dtype=_U64), np.frombuffer(created_at, dtype=_F64),
                   tuple(k[:MAX_KIND_CHARS] for k in kind_names), index, size, bytes(payloads))

    @classmethod
    def of(cls, records: Sequence[TelemetryRecord]) -> RecordColumns:
        """Columns of records (an older agent's message per record; tests)."""
        names: dict[str, int] = {}
        index = [names.setdefault(r.kind, len(names)) for r in records]
        if len(names) > MAX_KIND_NAMES:
            raise InvalidInputError(f"a telemetry batch uses {len(names)} kinds; at most "
                                    f"{MAX_KIND_NAMES}")
        payloads = [bytes(r.payload) for r in records]
        for r in records:
            if not 0 <= r.seq < 2**64:
                raise InvalidInputError(f"a telemetry seq is 0 to 2^64-1; got {r.seq}")
        return cls(np.array([r.seq for r in records], dtype=np.uint64),
                   np.array([r.created_at for r in records], dtype=np.float64),
                   tuple(names), np.array(index, dtype=np.uint8),
                   np.array([len(p) for p in payloads], dtype=np.uint32), b"".join(payloads))

    @classmethod
    def concat(cls, parts: Sequence[RecordColumns]) -> RecordColumns:
        if len(parts) == 1:
            return parts[0]
        names: dict[str, int] = {}
        index = []
        for part in parts:
            remap = np.array([names.setdefault(k, len(names)) for k in part.kind_names] or [0],
                             dtype=np.int64)
            index.append(remap[part.kind_index.astype(np.int64)])
        if len(names) > MAX_KIND_NAMES:
            raise InvalidInputError(f"a telemetry batch uses {len(names)} kinds; at most "
                                    f"{MAX_KIND_NAMES}")
        return cls(np.concatenate([p.seqs for p in parts]).astype(np.uint64),
                   np.concatenate([p.created_at for p in parts]).astype(np.float64),
                   tuple(names), np.concatenate(index).astype(np.uint8),
                   np.concatenate([p.sizes for p in parts]).astype(np.uint32),
                   b"".join(p.payloads for p in parts))

    def __len__(self) -> int:
        return len(self.seqs)

    def __iter__(self) -> Iterator[TelemetryRecord]:
        return iter(self.records())

    @property
    def ends(self) -> npt.NDArray[np.int64]:
        return np.cumsum(self.sizes, dtype=np.int64)

    def kinds(self) -> list[str]:
        """Each record's kind."""
        names = self.kind_names
        return [names[i] for i in self.kind_index.tolist()]

    def kind_mask(self, kinds: frozenset[str] | set[str]) -> npt.NDArray[np.bool_]:
        """Which records are of one of ``kinds``."""
        hits = [k in kinds for k in self.kind_names]
        if not any(hits) or all(hits):  # the usual batch: one kind (no lookup per record)
            return np.full(len(self), bool(hits) and hits[0], dtype=np.bool_)
        return np.array(hits, dtype=np.bool_)[self.kind_index]

    def seq_list(self) -> list[int]:
        return self.seqs.tolist()

    def records(self, where: npt.NDArray[np.bool_] | None = None) -> list[TelemetryRecord]:
        """The records (those ``where`` is true), one object each: for the few that need it."""
        rows = range(len(self)) if where is None else np.flatnonzero(where).tolist()
        if not rows:
            return []
        ends = self.ends
        seqs, at, index = self.seqs, self.created_at, self.kind_index
        sizes, names, body = self.sizes, self.kind_names, self.payloads
        out = []
        for i in rows:
            end = int(ends[i])
            out.append(TelemetryRecord(int(seqs[i]), names[index[i]], float(at[i]),
                                       body[end - int(sizes[i]):end]))
        return out

    def select(self, where: npt.NDArray[np.bool_]) -> RecordColumns:
        """The records ``where`` is true, in order (all of them: this same object)."""
        if bool(where.all()):
            return self
        ends = self.ends
        keep = np.flatnonzero(where).tolist()
        body = self.payloads
        payloads = b"".join(body[int(ends[i]) - int(self.sizes[i]):int(ends[i])] for i in keep)
        return RecordColumns(self.seqs[where], self.created_at[where], self.kind_names,
                             self.kind_index[where], self.sizes[where], payloads)

    def head(self, n: int) -> RecordColumns:
        """The first ``n`` records."""
        if n >= len(self):
            return self
        return RecordColumns(self.seqs[:n], self.created_at[:n], self.kind_names,
                             self.kind_index[:n], self.sizes[:n],
                             self.payloads[:int(self.sizes[:n].sum(dtype=np.int64))])

    def replace_payloads(self, new: dict[int, bytes]) -> RecordColumns:
        """The same records with the payloads of the seqs in ``new`` replaced."""
        if not new:
            return self
        records = [r._replace(payload=new[r.seq]) if r.seq in new else r
                   for r in self.records()]
        return RecordColumns.of(records)


def seq_runs(seqs: Sequence[int] | Seqs) -> list[int]:
    """``seqs`` in their order as flattened (first, last) pairs of consecutive runs: one pair
    for a whole batch (a few array operations, no Python work per seq)."""
    column = np.asarray(seqs, dtype=np.uint64)
    n = len(column)
    if not n:
        return []
    head = column[:-1]
    breaks = np.flatnonzero((column[1:] != head + np.uint64(1)) | (head == _LAST_SEQ))
    if not len(breaks):  # the usual batch
        return [int(column[0]), int(column[-1])]
    bounds = np.empty(2 * len(breaks) + 2, dtype=np.uint64)
    bounds[0::2] = column[np.concatenate(([0], breaks + 1))]
    bounds[1::2] = column[np.concatenate((breaks, [n - 1]))]
    return bounds.tolist()


def as_columns(records: Sequence[TelemetryRecord] | RecordColumns) -> RecordColumns:
    return records if isinstance(records, RecordColumns) else RecordColumns.of(records)


@dataclass(frozen=True)
class TelemetryWrite:
    """One vetted telemetry batch, as ``Store.ingest_telemetry`` takes it (for writing several
    in one transaction: ``Store.ingest_telemetry_many``)."""

    device_id: str
    records: Sequence[TelemetryRecord] | RecordColumns
    derived: dict[int, Derived]
    now: float
    dropped: int
    depth: int
    refused: Sequence[ReportRefusal] = ()
