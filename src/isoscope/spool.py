"""Durable batches on disk: one framed, checksummed, atomically renamed file per batch.

:class:`DiskSpool` is the storage under two things that must survive a crash:
the export queue (batches accepted but not yet delivered) and the daemon's
write-ahead log of received requests. It is a leaf module (standard library
only) so both can use it without depending on each other.

A frame is ``magic, item count, payload length`` (little endian), the payload,
then a CRC32 over the header fields and payload: a truncated or damaged file can
never validate, and such files are quarantined rather than retried.

Each batch carries a *signal* tag (``traces``, ``metrics``, ``logs``: what the
payload is a serialized request of). A trace batch is written in the original
``ISQ1`` frame, which has no tag, so files written before tags existed read as
traces and trace files stay readable by older versions; any other signal uses
the ``ISQ2`` frame, whose header adds the tag (length-prefixed ASCII) and whose
CRC covers it too.
"""

from __future__ import annotations

import logging
import os
import re
import struct
import threading
import time
import zlib
from typing import Callable, NamedTuple

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_SIGNAL", "DiskSpool", "QUARANTINE_DIR", "SpoolCorrupt", "SpoolEntry", "decode_frame",
           "decode_tagged_frame", "encode_frame"]

_MAGIC = b"ISQ1"
# magic, span_count, payload length; the CRC32 trailer follows the payload so a
# truncated file (crash mid-copy, full disk) can never validate.
_HEADER = struct.Struct("<4sIQ")
# The tagged frame: magic, item count, payload length, tag length; the tag follows.
_MAGIC_TAGGED = b"ISQ2"
_HEADER_TAGGED = struct.Struct("<4sIQB")
_TRAILER = struct.Struct("<I")
DEFAULT_SIGNAL = "traces"
"""The signal of an untagged (``ISQ1``) frame."""
_SUFFIX = ".batch"
_NAME_RE = re.compile(r"^(\d{16})\.batch$")
QUARANTINE_DIR = "quarantine"


class SpoolEntry(NamedTuple):
    """One batch read back from a :class:`DiskSpool`.

    Attributes:
        key: the file name, for :meth:`DiskSpool.remove`.
        payload: the serialized request.
        span_count: items in it (spans, data points or log records).
        signal: what the payload is (``traces`` for frames written without a tag).
    """

    key: str
    payload: bytes
    span_count: int
    signal: str = DEFAULT_SIGNAL


class SpoolCorrupt(ValueError):
    """A spool file failed validation (bad magic, length or checksum)."""


def encode_frame(payload: bytes, span_count: int, signal: str = DEFAULT_SIGNAL) -> bytes:
    """The on-disk bytes of one batch: header, payload, CRC32 of header fields + payload.

    Args:
        payload: the serialized request.
        span_count: items in it.
        signal: the payload's signal; ``traces`` writes the untagged frame.

    Raises:
        ValueError: the tag is not 1-255 ASCII characters.
    """
    if signal == DEFAULT_SIGNAL:
        header = _HEADER.pack(_MAGIC, span_count, len(payload))
    else:
        tag = signal.encode("ascii")
        if not 0 < len(tag) < 256:
            raise ValueError(f"signal tag {signal!r} must be 1-255 ASCII characters")
        header = _HEADER_TAGGED.pack(_MAGIC_TAGGED, span_count, len(payload), len(tag)) + tag
    crc = zlib.crc32(payload, zlib.crc32(header))
    return header + payload + _TRAILER.pack(crc)


def decode_tagged_frame(data: bytes) -> tuple[bytes, int, str]:
    """Validate and split one file's bytes into ``(payload, span_count, signal)``.

    Raises:
        SpoolCorrupt: the bytes are not exactly one intact frame.
    """
    if len(data) < _HEADER.size + _TRAILER.size:
        raise SpoolCorrupt(f"truncated: {len(data)} bytes is shorter than the frame overhead")
    magic = data[:4]
    if magic == _MAGIC:
        _, span_count, length = _HEADER.unpack_from(data)
        header_size = _HEADER.size
        signal = DEFAULT_SIGNAL
    elif magic == _MAGIC_TAGGED:
        if len(data) < _HEADER_TAGGED.size + _TRAILER.size:
            raise SpoolCorrupt(f"truncated: {len(data)} bytes is shorter than the frame overhead")
        _, span_count, length, tag_len = _HEADER_TAGGED.unpack_from(data)
        header_size = _HEADER_TAGGED.size + tag_len
        if tag_len == 0 or len(data) < header_size:
            raise SpoolCorrupt(f"bad signal tag length {tag_len}")
        try:
            signal = data[_HEADER_TAGGED.size:header_size].decode("ascii")
        except UnicodeDecodeError:
            raise SpoolCorrupt("signal tag is not ASCII") from None
    else:
        raise SpoolCorrupt(f"bad magic {magic!r}")
    expected = header_size + length + _TRAILER.size
    if len(data) != expected:
        raise SpoolCorrupt(f"length mismatch: header says {expected} bytes, file has {len(data)}")
    payload = data[header_size:header_size + length]
    (crc,) = _TRAILER.unpack_from(data, header_size + length)
    actual = zlib.crc32(payload, zlib.crc32(data[:header_size]))
    if crc != actual:
        raise SpoolCorrupt(f"checksum mismatch: stored {crc:#010x}, computed {actual:#010x}")
    return payload, span_count, signal


def decode_frame(data: bytes) -> tuple[bytes, int]:
    """Validate and split one file's bytes into ``(payload, span_count)`` (the signal is not returned).

    Raises:
        SpoolCorrupt: the bytes are not exactly one intact frame.
    """
    payload, span_count, _ = decode_tagged_frame(data)
    return payload, span_count


class DiskSpool:
    """A directory of durable batches, one file per batch, replayed in write order.

    Each :meth:`put` writes ``<seq>.batch.tmp``, fsyncs it, renames it to
    ``<seq>.batch`` and fsyncs the directory, so once ``put`` returns the batch
    survives a crash or power loss, and a half-written batch is never visible
    under its final name. Files that fail validation on :meth:`load` are moved
    to ``<dir>/quarantine/`` (never deleted, never retried).

    Thread-safe. One directory must be used by one spool (one process) at a time.

    Args:
        directory: where the batch files live; created if missing.
        fsync: flush file and directory to stable storage on every put (turn off
            only where durability does not matter).
        on_quarantine: called with ``(file_name, reason)`` for every quarantined file.
    """

    def __init__(self, directory: str | os.PathLike[str], *, fsync: bool = True,
                 on_quarantine: Callable[[str, str], None] | None = None) -> None:
        self.directory = os.fspath(directory)
        self.quarantine_dir = os.path.join(self.directory, QUARANTINE_DIR)
        self._fsync = fsync
        self._on_quarantine = on_quarantine
        self._lock = threading.Lock()
        self.quarantined = 0
        os.makedirs(self.directory, exist_ok=True)
        self._next_seq = 1
        for name in os.listdir(self.directory):
            if name.endswith(".tmp"):
                # A temp file was never renamed, so its put() never returned:
                # nobody was told it is safe, and it may be partial.
                self._unlink(os.path.join(self.directory, name))
                continue
            m = _NAME_RE.match(name)
            if m:
                self._next_seq = max(self._next_seq, int(m.group(1)) + 1)

    def put(self, payload: bytes, span_count: int, signal: str = DEFAULT_SIGNAL) -> str:
        """Durably store one batch of ``signal`` (see :func:`encode_frame`).

        Returns:
            The key to pass to :meth:`remove` once the batch is dealt with.

        Raises:
            OSError: the batch could not be written (it is then not stored).
        """
        with self._lock:
            seq = self._next_seq
            self._next_seq += 1
        key = f"{seq:016d}{_SUFFIX}"
        final = os.path.join(self.directory, key)
        tmp = final + ".tmp"
        frame = encode_frame(payload, span_count, signal)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                view = memoryview(frame)
                while view:
                    written = os.write(fd, view)
                    view = view[written:]
                if self._fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, final)
        except OSError:
            self._unlink(tmp)
            raise
        if self._fsync:
            self._fsync_dir()
        return key

    def remove(self, key: str) -> None:
        """Delete a batch that was delivered or whose loss was counted."""
        self._unlink(os.path.join(self.directory, key))

    def keys(self) -> list[str]:
        """Keys of the batch files currently stored, in write order (no validation)."""
        names = [n for n in os.listdir(self.directory) if _NAME_RE.match(n)]
        return sorted(names)

    def load(self) -> list[SpoolEntry]:
        """Read and validate every stored batch, oldest first.

        Corrupted or truncated files are moved to the quarantine directory and
        counted in :attr:`quarantined`; they are not returned.
        """
        entries: list[SpoolEntry] = []
        for key in self.keys():
            path = os.path.join(self.directory, key)
            try:
                with open(path, "rb") as f:
                    data = f.read()
            except FileNotFoundError:
                continue
            except OSError as exc:
                self._quarantine(key, f"unreadable: {exc}")
                continue
            try:
                payload, span_count, signal = decode_tagged_frame(data)
            except SpoolCorrupt as exc:
                self._quarantine(key, str(exc))
                continue
            entries.append(SpoolEntry(key, payload, span_count, signal))
        return entries

    def _quarantine(self, key: str, reason: str) -> None:
        logger.warning("spool %s: quarantining %s: %s", self.directory, key, reason)
        os.makedirs(self.quarantine_dir, exist_ok=True)
        target = os.path.join(self.quarantine_dir, key)
        if os.path.exists(target):
            target = f"{target}.{time.time_ns()}"
        try:
            os.replace(os.path.join(self.directory, key), target)
        except OSError as exc:
            # Still counted and skipped: a file we cannot move must not make
            # every restart fail on it.
            logger.error("spool %s: cannot move %s to quarantine: %s", self.directory, key, exc)
        with self._lock:
            self.quarantined += 1
        if self._on_quarantine is not None:
            self._on_quarantine(key, reason)

    def _fsync_dir(self) -> None:
        fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    @staticmethod
    def _unlink(path: str) -> None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
