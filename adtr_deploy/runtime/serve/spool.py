"""A sink's spool: the messages not yet acknowledged by the receiver, one file each, kept across outages and restarts.

Layout: `FOLDER/000000000042.json` holds one message exactly as it is sent (strict JSON with its `event_id`); names
sort in arrival order, so the oldest message is sent first. A message is written to a hidden temporary file, flushed
to disk and renamed into place (`fileio.atomic_write`), so a crash leaves a whole message or none; leftover temporary
files are removed at the next start. A file that does not hold a JSON object with an `event_id` (damaged by something
else) is renamed to `.corrupt`, logged and skipped: it never blocks the messages behind it. A message's file is removed
only once the receiver acknowledged it. `FOLDER/.lock` (an flock, released by the kernel when a process dies) keeps two
processes from sending from one spool.

`Spool(None)` keeps the messages in memory only (bounded the same way): for library use without a folder.
"""

from __future__ import annotations

import json
import os
import threading
from collections import OrderedDict, deque
from collections.abc import Callable
from pathlib import Path

from adtr_deploy.errors import UserError
from adtr_deploy.fileio import atomic_write

try:
    import fcntl
except ImportError:  # not POSIX: no cross-process lock (the run's own --out lock still applies)
    fcntl = None

MAX_MESSAGES = 20_000
MAX_BYTES = 100 * 1024 * 1024
SUFFIX = ".json"


class Spool:
    """Bounded FIFO of encoded messages on disk. `put` is called by one thread, `head` / `remove` by another."""

    def __init__(
        self,
        folder: Path | str | None,
        *,
        max_messages: int = MAX_MESSAGES,
        max_bytes: int = MAX_BYTES,
        log: Callable[[str], None] = print,
        label: str = "",
    ):
        self.folder = None if folder is None else Path(folder)
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.log = log
        self.label = label  # the sink's (redacted) name, written beside the messages for whoever looks in the folder
        self._lock = threading.Lock()
        self._order: deque[int] = deque()
        self._sizes: dict[int, int] = {}
        self._memory: OrderedDict[int, bytes] = OrderedDict()
        self._next = 1
        self.bytes = 0
        self.corrupt = 0
        self._lock_fd: int | None = None

    # -- lifecycle ---------------------------------------------------------------------------------------------------
    def open(self) -> int:
        """Create the folder, take its lock, drop leftover temporary files and index what an earlier run left; returns
        the number of messages found."""
        if self.folder is None:
            return 0
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(
                f"cannot create the sink spool {self.folder} ({exc.strerror}); pass --sink-spool DIR"
            ) from None
        self._take_lock()
        if self.label:
            (self.folder / "sink.txt").write_text(self.label + "\n", encoding="utf-8")
        for path in self.folder.iterdir():
            name = path.name
            if name.startswith(".") and ".tmp-" in name:
                path.unlink(missing_ok=True)  # a write cut short by a crash: never renamed, never acknowledged
            elif name.endswith(SUFFIX) and name[: -len(SUFFIX)].isdigit():
                seq = int(name[: -len(SUFFIX)])
                self._sizes[seq] = path.stat().st_size
        self._order = deque(sorted(self._sizes))
        self.bytes = sum(self._sizes.values())
        self._next = (self._order[-1] + 1) if self._order else 1
        return len(self._order)

    def _take_lock(self) -> None:
        if fcntl is None:
            return
        fd = os.open(self.folder / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise UserError(
                f"the sink spool {self.folder} is in use by another adtr-run (or the same --sink is given twice); "
                "give each run its own --out or --sink-spool"
            ) from None
        self._lock_fd = fd

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    # -- queue -------------------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._order)

    def has_room(self, size: int) -> bool:
        return len(self._order) < self.max_messages and self.bytes + size <= self.max_bytes

    def put(self, body: bytes) -> bool:
        """Append one encoded message; False when the spool is full (nothing written)."""
        with self._lock:
            if not self.has_room(len(body)):
                return False
            seq = self._next
            self._next += 1
        if self.folder is None:
            self._memory[seq] = body
        else:
            # fsync before the rename: after a power cut the message is there whole, or was never acknowledged to
            # anyone. This runs on the sink's spool thread, never on the inference thread.
            atomic_write(self._path(seq), lambda fh: fh.write(body), fsync=True)
        with self._lock:
            self._order.append(seq)
            self._sizes[seq] = len(body)
            self.bytes += len(body)
        return True

    def head(self) -> tuple[int, bytes, str] | None:
        """The oldest message as (key, body, event_id), or None when empty. Damaged files are set aside and skipped."""
        while True:
            with self._lock:
                if not self._order:
                    return None
                seq = self._order[0]
            if self.folder is None:
                body = self._memory[seq]
            else:
                try:
                    body = self._path(seq).read_bytes()
                except OSError as exc:
                    self._set_aside(seq, f"cannot be read ({exc.strerror})")
                    continue
            try:
                message = json.loads(body)
                event_id = message["event_id"]
                if not isinstance(event_id, str):
                    raise TypeError
            except (ValueError, KeyError, TypeError):
                self._set_aside(seq, "is not a JSON message with an event_id")
                continue
            return seq, body, event_id

    def remove(self, seq: int) -> None:
        """Forget a message the receiver acknowledged (or refused for good)."""
        with self._lock:
            if self._order and self._order[0] == seq:
                self._order.popleft()
            else:
                self._order.remove(seq)
            self.bytes -= self._sizes.pop(seq, 0)
        if self.folder is None:
            self._memory.pop(seq, None)
        else:
            self._path(seq).unlink(missing_ok=True)

    def _set_aside(self, seq: int, why: str) -> None:
        path = self._path(seq) if self.folder is not None else None
        with self._lock:
            self._order.remove(seq)
            self.bytes -= self._sizes.pop(seq, 0)
        self.corrupt += 1
        if path is not None:
            try:
                path.rename(path.with_suffix(".corrupt"))
            except OSError:
                path.unlink(missing_ok=True)
            self.log(f"{self.label}: spool file {path} {why}; skipped (kept as {path.with_suffix('.corrupt').name})")
        else:
            self._memory.pop(seq, None)

    def _path(self, seq: int) -> Path:
        return self.folder / f"{seq:012d}{SUFFIX}"
