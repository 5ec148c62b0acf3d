"""Where an SQLite store keeps the bodies of telemetry segments: append-only files beside the
database (I/O).

A 500-record batch is one ~45 KB segment (``control_plane/domain/telemetry_segment.py``).
Kept in its SQLite row, those bytes were written twice (into the WAL, then checkpointed into
the database), as a dozen 4 KB pages, with two system calls a page each way: about half the
control plane's cost of storing a batch, on the event loop that bounds the MQTT telemetry path
(docs/mqtt.md). Here a group's segments are appended to one file with one ``write`` and one
``fdatasync``, *before* the transaction that inserts their rows commits; a row then holds only
where its body is (file number, offset, length). So every row that committed points at bytes
that are on disk; a crash between the two leaves bytes no row points at, which nothing reads
and which go when their file does.

Files are ``NNNNNNNN.seg`` in the directory, the highest number the one appended to; a new one
is started past ``MAX_FILE_BYTES``. Retention deletes rows (after rolling them up), and then
``remove_unreferenced`` deletes every earlier file no row points at any more: space comes back
a file at a time. PostgreSQL keeps bodies in their rows (replicas share no file system).
Backups copy the files after the database's snapshot (``snapshot``), so every row of the
snapshot finds its bytes.

Written by hand, not with a library: an append, an ``fdatasync`` and a ``pread`` are the whole of
it, and the point is to make as few system calls as possible.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fleetcore.errors import InvalidInputError
from fleetcore.files import fsync_dir

__all__ = ["MAX_FILE_BYTES", "SegmentFiles", "body_in_row", "segment_dir"]

MAX_FILE_BYTES = 64 * 1024 * 1024
_NAME = re.compile(r"^(\d{8})\.seg$")


def segment_dir(database: Path) -> Path:
    """The directory of an SQLite database's segment files: ``<database>-segments``."""
    return database.with_name(database.name + "-segments")


class SegmentFiles:
    """The segment files of one database. Not thread-safe: the store calls it under its lock."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self._append: int | None = None  # descriptor of the file appended to
        self._number = 0  # its number
        self._size = 0  # its size: where the next body starts
        self._readers: dict[int, int] = {}  # file number -> descriptor open for reading
        self._staged: list[bytes] = []  # bodies placed after _size, not written yet
        self._staged_bytes = 0

    # ------------------------------------------------------------------ writing
    def stage(self, body: bytes) -> tuple[int, int, int]:
        """Where ``body`` will be once ``flush``ed: (file number, offset, length). Staged
        bodies are readable at once (a later batch of the same group looks for repeats). Called
        inside the database's write transaction, so no other writer appends meanwhile."""
        if self._append is not None and not self._staged:  # a new transaction: another store
            self._size = os.fstat(self._append).st_size  # on this database may have appended
        if self._append is None or self._size + self._staged_bytes >= MAX_FILE_BYTES:
            self.flush()  # what is staged goes to the file it was placed in
            self._open_for_append()
        place = (self._number, self._size + self._staged_bytes, len(body))
        self._staged.append(body)
        self._staged_bytes += len(body)
        return place

    def flush(self) -> None:
        """Write what is staged (one write) and make it durable (``fdatasync``), before the
        transaction that references it commits. On failure nothing staged is kept."""
        if not self._staged:
            return
        fd = self._append
        assert fd is not None
        data = self._staged[0] if len(self._staged) == 1 else b"".join(self._staged)
        try:
            written = os.write(fd, data)
            while written < len(data):  # a regular file writes it all, unless the disk is full
                more = os.write(fd, memoryview(data)[written:])
                if not more:
                    raise OSError(f"no space to write telemetry segments in {self.directory}")
                written += more
            os.fdatasync(fd)
        except BaseException:
            self.discard()
            self._size = os.fstat(fd).st_size  # a partial write is not referenced: skip it
            raise
        self._size += len(data)
        self.discard()

    def discard(self) -> None:
        """Forget what is staged (its transaction rolled back)."""
        self._staged.clear()
        self._staged_bytes = 0

    def _open_for_append(self) -> None:
        if self._append is None:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            numbers = self.numbers()
            self._number = numbers[-1] if numbers else 1
        else:  # full: start the next file
            os.close(self._append)
            self._append = None
            self._number += 1
        path = self._path(self._number)
        created = not path.exists()
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        if created:  # the new name must survive a crash too, not only its bytes
            fsync_dir(self.directory)
        self._append, self._size = fd, os.fstat(fd).st_size
        if self._size >= MAX_FILE_BYTES:  # found full (after a restart): the next one
            self._open_for_append()

    # ------------------------------------------------------------------ reading
    def read(self, number: int, offset: int, length: int) -> bytes:
        """The body at (file, offset, length); ``InvalidInputError`` when the file is missing
        or too short (a database restored without its segment files)."""
        if offset < 0 or length < 0:  # a damaged row, not ours
            raise InvalidInputError(f"a telemetry segment's place ({offset}, {length}) cannot "
                                    "be in a segment file")
        if number == self._number and offset >= self._size and self._staged:
            return self._staged_body(offset, length)
        fd = self._readers.get(number)
        if fd is None:
            try:
                fd = os.open(self._path(number), os.O_RDONLY)
            except FileNotFoundError:
                raise InvalidInputError(
                    f"telemetry segment file {self._path(number)} is missing (restore the "
                    "database together with its segment files)") from None
            self._readers[number] = fd
        # Checked against the file before reading: a damaged row's length is not allocated.
        size = os.fstat(fd).st_size
        if offset + length > size:
            raise InvalidInputError(
                f"telemetry segment file {self._path(number)} holds {size} bytes, not the "
                f"{length} at offset {offset}: it was truncated")
        return os.pread(fd, length, offset)

    def _staged_body(self, offset: int, length: int) -> bytes:
        at = self._size
        for body in self._staged:
            if at == offset and len(body) == length:
                return body
            at += len(body)
        raise InvalidInputError(f"no telemetry segment staged at offset {offset}")

    # ------------------------------------------------------------------ housekeeping
    def numbers(self) -> list[int]:
        """The numbers of the files there, ascending."""
        if not self.directory.is_dir():
            return []
        found = (_NAME.match(p.name) for p in self.directory.iterdir())
        return sorted(int(m.group(1)) for m in found if m is not None)

    def remove_unreferenced(self, referenced: Callable[[int], bool]) -> int:
        """Delete the files before the one appended to for which ``referenced`` (does a row
        point at this file number?) is false; how many."""
        numbers = self.numbers()
        current = self._number if self._append is not None else (numbers[-1] if numbers
                                                                  else 0)
        removed = 0
        for number in numbers:
            if number >= current or referenced(number):
                continue
            fd = self._readers.pop(number, None)
            if fd is not None:
                os.close(fd)
            self._path(number).unlink(missing_ok=True)
            removed += 1
        return removed

    def snapshot(self, into: Path) -> None:
        """Copy the files into ``into`` (a backup, taken after the database's snapshot: what it
        references was written before, and files only grow)."""
        into.mkdir(mode=0o700, parents=True, exist_ok=True)
        for number in self.numbers():
            shutil.copyfile(self._path(number), into / self._path(number).name)

    def close(self) -> None:
        self.discard()
        for fd in [*self._readers.values(), *([self._append] if self._append is not None
                                                else [])]:
            os.close(fd)
        self._readers.clear()
        self._append = None

    def _path(self, number: int) -> Path:
        return self.directory / f"{number:08d}.seg"


def body_in_row(values: Sequence[Any], columns: Sequence[str],
                files: SegmentFiles) -> tuple[Any, ...]:
    """A ``telemetry_segments`` row (``columns`` its column names) with its body read into the
    row and no file reference left: how PostgreSQL keeps it (``control-plane migrate``)."""
    row = list(values)
    at = {name: i for i, name in enumerate(columns)}
    number = row[at["body_file"]]
    if number is not None:
        row[at["body"]] = files.read(int(number), int(row[at["body_offset"]]),
                                     int(row[at["body_length"]]))
        for name in ("body_file", "body_offset", "body_length"):
            row[at[name]] = None
    return tuple(row)

