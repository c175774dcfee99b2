"""Refuse new spans, retryably, before the daemon's memory limit is reached.

When the backend is down the queues fill; without a guard the daemon would
keep acknowledging until the kernel's OOM killer ends it and everything held
in memory is lost. The guard compares the daemon's resident anonymous memory
with its limit (configured, or read from its own cgroup) and makes the
receivers answer "retry later" above a high-water mark.

Resident memory only shows what has already been allocated; a request that is
about to be decoded, parsed, enriched and exported will need several times
its size *later*. So receivers also :meth:`MemoryGuard.reserve` an estimate of
that cost for the request's lifetime: reservations share a cap
(``max_inflight_bytes``), and one that would push the daemon past its
high-water mark is refused, retryably, before any of the work is done.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import threading
import time

logger = logging.getLogger(__name__)

_UNLIMITED = 1 << 60  # cgroup v1 writes a page-rounded LONG_MAX for "no limit"
DEFAULT_INFLIGHT_BYTES = 256 * 1024 * 1024
"""In-flight cap when no memory limit is known."""
INFLIGHT_SHARE = 0.4
"""Share of the memory limit that in-flight requests may reserve, when no cap is configured."""


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def cgroup_memory_limit(proc_root: str = "/proc", cgroup_root: str = "/sys/fs/cgroup") -> int | None:
    """This process's cgroup memory limit in bytes (v2 ``memory.max`` or v1 ``memory.limit_in_bytes``), or None."""
    limits = []
    for line in _read(f"{proc_root}/self/cgroup").splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        rel = path.lstrip("/")
        if controllers == "":
            for root in (cgroup_root, os.path.join(cgroup_root, "unified")):
                v = _read(os.path.join(root, rel, "memory.max"))
                if v and v != "max" and v.isdigit():
                    limits.append(int(v))
                    break
        elif "memory" in controllers.split(","):
            v = _read(os.path.join(cgroup_root, "memory", rel, "memory.limit_in_bytes"))
            if v.isdigit() and int(v) < _UNLIMITED:
                limits.append(int(v))
    return min(limits) if limits else None


def resident_anon_bytes(proc_root: str = "/proc") -> int:
    """Resident anonymous memory of this process (what a queue backlog grows)."""
    for line in _read(f"{proc_root}/self/status").splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0


def _load_malloc_trim() -> object | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        fn = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return fn


_malloc_trim = _load_malloc_trim()


def release_free_memory() -> None:
    """Give memory freed by a large request back to the kernel (glibc ``malloc_trim``).

    After a burst, glibc keeps freed heap pages (its mmap threshold grows
    after large frees), so resident memory, and with it the guard, would stay
    high long after the data is gone.
    """
    if _malloc_trim is not None:
        _malloc_trim(0)  # type: ignore[operator]


class MemoryExhausted(Exception):
    """A reservation was refused; the request should be retried later.

    Attributes:
        retry_after_s: suggested delay before the retry.
    """

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Reservation:
    """Bytes held in a :class:`MemoryGuard` for one request; release it (or use ``with``) when done."""

    __slots__ = ("_guard", "nbytes", "_share")

    def __init__(self, guard: "MemoryGuard", nbytes: int, share: float = 1.0) -> None:
        self._guard = guard
        self.nbytes = nbytes
        self._share = share

    def grow(self, nbytes: int) -> None:
        """Reserve ``nbytes`` more for the same request.

        Raises:
            MemoryExhausted: refused; what was reserved before stays reserved.
        """
        self.nbytes += self._guard._take(nbytes, self.nbytes, self._share)

    def split(self, nbytes: int) -> "Reservation":
        """Move up to ``nbytes`` of this reservation into a new one (nothing is reserved anew).

        A receiver keeps what a request costs while it is parsed and hands the rest,
        with the parsed batch, to the pipeline, which releases it once the batch has
        gone to the exporters.
        """
        moved = max(0, min(int(nbytes), self.nbytes))
        self.nbytes -= moved
        return Reservation(self._guard, moved, self._share)

    def release(self) -> None:
        """Return everything reserved (idempotent)."""
        n, self.nbytes = self.nbytes, 0
        if n:
            self._guard._give(n)

    def __del__(self) -> None:
        # A reservation whose owner forgot it (a batch dropped on an unexpected path) is
        # returned when it is freed, so a lost release can never shrink the budget for good.
        try:
            self.release()
        except Exception:  # interpreter shutdown
            pass

    def __enter__(self) -> "Reservation":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class MemoryGuard:
    """Says when the daemon is too close to its memory limit to accept more.

    Args:
        limit_bytes: the limit; None disables the resident-memory check.
        high_fraction: refuse above this share of the limit.
        check_interval_s: how long a reading is reused (the check is on the receive path).
        max_inflight_bytes: cap on the sum of live reservations; None derives
            it from the limit (``INFLIGHT_SHARE`` of it) or uses
            ``DEFAULT_INFLIGHT_BYTES`` when there is no limit.
        proc_root: procfs to read this process's memory from.
    """

    def __init__(self, limit_bytes: int | None, high_fraction: float = 0.8, check_interval_s: float = 0.1,
                 proc_root: str = "/proc", *, max_inflight_bytes: int | None = None) -> None:
        self.limit_bytes = limit_bytes
        self.high_bytes = int(limit_bytes * high_fraction) if limit_bytes else None
        if max_inflight_bytes is None:
            max_inflight_bytes = int(limit_bytes * INFLIGHT_SHARE) if limit_bytes else DEFAULT_INFLIGHT_BYTES
        self.max_inflight_bytes = max_inflight_bytes
        self._interval = check_interval_s
        self._proc_root = proc_root
        self._checked = 0.0
        self._rss = 0
        self._over = False
        self._trimmed = 0.0
        self._lock = threading.Lock()
        self._reserved = 0
        self._peak_reserved = 0

    def _sample(self) -> int:
        now = time.monotonic()
        if now - self._checked >= self._interval:
            self._checked = now
            self._rss = resident_anon_bytes(self._proc_root)
            if self.high_bytes is not None and self._rss > self.high_bytes and now - self._trimmed >= 1.0:
                # Freed-but-kept heap pages count as resident: hand them back
                # before deciding that the daemon is full.
                self._trimmed = now
                release_free_memory()
                self._rss = resident_anon_bytes(self._proc_root)
        return self._rss

    def over(self) -> bool:
        """True while resident memory is above the high-water mark."""
        if self.high_bytes is None:
            return False
        was = self._over
        self._over = self._sample() > self.high_bytes
        if self._over and not was:
            logger.warning("memory above %d MiB of a %d MiB limit: refusing new spans until it drains",
                           self.high_bytes >> 20, self.limit_bytes >> 20)  # type: ignore[operator]
        return self._over

    def reserve(self, nbytes: int, share: float = 1.0) -> Reservation:
        """Reserve ``nbytes`` for one request's decoding, parsing and processing.

        A reservation alone (nothing else reserved) is granted up to its share
        of the cap, so the largest request the size limits allow can always
        get in eventually; it is clipped to that for this.

        Args:
            nbytes: estimated peak memory of the request.
            share: fraction of the cap this reservation may fill (with the
                others); large requests get less than 1 so that they can
                never take the room small ones need.

        Raises:
            MemoryExhausted: the in-flight cap or the memory high-water mark
                would be passed; retry later.
        """
        return Reservation(self, self._take(max(0, int(nbytes)), 0, share), share)

    def _take(self, nbytes: int, already: int, share: float) -> int:
        """Reserve ``nbytes`` more for a reservation holding ``already``; returns what was taken."""
        cap = int(self.max_inflight_bytes * share)
        with self._lock:
            others = self._reserved - already
            if others <= 0:
                # Alone: clipped to the cap rather than refused, or the largest
                # request allowed by the size limits could never be accepted.
                nbytes = min(nbytes, max(0, cap - already))
            elif self._reserved + nbytes > cap:
                raise MemoryExhausted(
                    f"too much request data in flight ({self._reserved >> 20} MiB of "
                    f"{cap >> 20} MiB); retry later", 1.0)
            if self.high_bytes is not None and self._sample() + nbytes > self.high_bytes:
                raise MemoryExhausted(
                    f"isoscope is near its memory limit ({self._rss >> 20} MiB resident, "
                    f"{self.high_bytes >> 20} MiB high-water mark); retry later", 2.0)
            self._reserved += nbytes
            if self._reserved > self._peak_reserved:
                self._peak_reserved = self._reserved
            return nbytes

    def _give(self, nbytes: int) -> None:
        with self._lock:
            self._reserved = max(0, self._reserved - nbytes)

    @property
    def reserved_bytes(self) -> int:
        """Bytes currently reserved by requests in flight."""
        return self._reserved

    @property
    def peak_reserved_bytes(self) -> int:
        """Largest ``reserved_bytes`` seen."""
        return self._peak_reserved


_default: MemoryGuard | None = None
_default_lock = threading.Lock()


def process_guard() -> MemoryGuard:
    """A guard shared by every receiver of this process that was given none.

    Its limit is read from the process's cgroup. The daemon passes its own
    guard (built from ``memory.*``); this default keeps receivers built
    elsewhere (tests, embedding) bounded all the same.
    """
    global _default
    with _default_lock:
        if _default is None:
            _default = MemoryGuard(cgroup_memory_limit())
        return _default
