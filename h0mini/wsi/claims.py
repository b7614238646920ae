"""Which process embeds which slide: one claim file per slide, taken by atomic creation.

Any number of processes, on any number of machines, may share one output folder. Before it
embeds a slide, a process creates ``OUTPUT_DIR/.claims/<slide>.<generation>`` with ``O_EXCL``
(atomic on local disks and on NFS v3+); the claim with the highest generation is the slide's
owner. The file records the owner's host, pid, process start time and when it started; the
owner's heartbeat thread touches it every ``HEARTBEAT`` seconds.

A dead owner's claim is taken over by creating the *next* generation, again with ``O_EXCL``, so
exactly one process wins a takeover however many try. An owner counts as dead

- on the same host and in the same pid namespace, when its pid is gone, or now belongs to a process
  started at another time (this process's own pid included: a restarted container reuses pids);
- on another host, or in another container that shares the host name (host networking), when its
  heartbeat is older than ``timeout`` (default ``CLAIM_TIMEOUT``). The heartbeat's age is measured
  on the file system's clock (a file created in ``.claims`` carries it), so clocks that disagree
  between machines do not make a live owner look dead.

Correctness never rests on claims alone: an output is only written when every tile of the
slide is in hand, and part files have names unique to their writer, so even two owners (a
heartbeat stalled past the timeout) write the same complete file, never fewer rows.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from ..atomic import filesystem_now, pid_alive, pid_namespace

HEARTBEAT = 30.0  # seconds between touches of a held claim
CLAIM_TIMEOUT = 600.0  # seconds without a heartbeat after which another host's claim counts as dead
FOLDER = ".claims"
CLOCK_EVERY = 60.0  # seconds between two readings of the file system's clock


@dataclass(frozen=True)
class Owner:
    """Who holds a claim, as written in the claim file."""

    host: str
    pid: int
    process_start: Optional[float]  # the pid's start time (so a reused pid is not mistaken for the owner)
    started: float  # when the claim was taken (Unix time)
    pid_namespace: Optional[str] = None  # containers sharing a host name but not their pids tell apart by it

    def describe(self) -> str:
        if self is UNKNOWN:
            return "another process (its claim was being taken while this one looked)"
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        return f"{self.host} pid {self.pid} since {since}"


UNKNOWN = Owner("", 0, None, 0.0)
"""The owner of a claim contended past every retry: someone else, not known who."""


def this_process() -> Owner:
    return Owner(socket.gethostname(), os.getpid(), process_start_time(os.getpid()), time.time(), pid_namespace())


def process_start_time(pid: int) -> Optional[float]:
    """The start time of ``pid`` in clock ticks since boot (Linux), or None where /proc is absent."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode(errors="replace")
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2:].split()
    try:
        return float(fields[19])  # field 22 of proc(5), counted after the command name
    except (IndexError, ValueError):
        return None


class Claims:
    """The claims of one output folder, for this process."""

    def __init__(self, output_dir: Path, *, timeout: float = CLAIM_TIMEOUT, heartbeat: float = HEARTBEAT):
        self.folder = Path(output_dir) / FOLDER
        self.timeout = float(timeout)
        self.heartbeat = float(heartbeat)
        self.me = this_process()
        self._held: Dict[str, Path] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._beat: Optional[threading.Thread] = None
        self._clock: Optional[Tuple[float, float]] = None  # (file system's now, monotonic clock) at one reading
        self._closed = False  # after release_all: a planner still running takes nothing more

    # -- reading -----------------------------------------------------------------------------

    def _generations(self, name: str) -> List[Tuple[int, Path]]:
        prefix = f"{name}."
        found = []
        try:
            entries = list(os.scandir(self.folder))
        except FileNotFoundError:
            return []
        for entry in entries:
            if entry.name.startswith(prefix) and entry.name[len(prefix):].isdigit():
                found.append((int(entry.name[len(prefix):]), Path(entry.path)))
        return sorted(found)

    def owner(self, name: str) -> Optional[Owner]:
        """The live owner of ``name``'s claim, or None when nobody (alive) holds it."""
        generations = self._generations(name)
        if not generations:
            return None
        owner = _read(generations[-1][1])
        return owner if owner is not None and not self._dead(owner, generations[-1][1]) else None

    def _now(self) -> float:
        """The file system's now, read at most every ``CLOCK_EVERY`` seconds (each reading creates a
        file: round trips on NFS) and carried forward by the monotonic clock, which no clock step moves."""
        clock = self._clock
        if clock is None or time.monotonic() - clock[1] > CLOCK_EVERY:
            clock = self._clock = (filesystem_now(self.folder), time.monotonic())
        return clock[0] + time.monotonic() - clock[1]

    def _dead(self, owner: Owner, path: Path) -> bool:
        same_pids = owner.pid_namespace is None or self.me.pid_namespace is None or \
            owner.pid_namespace == self.me.pid_namespace  # host networking: one host name, other pids
        if owner.host == self.me.host and same_pids:
            if owner.pid == self.me.pid:  # this process, or an earlier one given the same pid (a restarted
                # container: same host name, same pid), whose claims nobody else would ever take over
                return (owner.process_start is not None and self.me.process_start is not None
                        and owner.process_start != self.me.process_start)
            if not pid_alive(owner.pid):
                return True
            start = process_start_time(owner.pid)
            return owner.process_start is not None and start is not None and start != owner.process_start
        try:
            age = self._now() - path.stat().st_mtime  # the file server's clock, not ours
        except FileNotFoundError:
            return True
        return age > self.timeout

    # -- taking and giving back ----------------------------------------------------------------

    def acquire(self, name: str) -> Optional[Owner]:
        """Claim ``name``. Returns None when this process now holds it, else the live owner.

        After ``release_all`` nothing more is claimed (``UNKNOWN`` is returned): a planner thread the
        shut-down did not wait out would otherwise take a claim nobody gives back, its heartbeat
        started again."""
        if self._closed:
            return UNKNOWN
        self.folder.mkdir(parents=True, exist_ok=True)
        for _ in range(20):  # each round either wins, meets a live owner, or sees a newer generation
            generations = self._generations(name)
            if generations:
                number, path = generations[-1]
                owner = _read(path)
                if owner is None:  # being written this instant, or emptied by a crash mid-write
                    try:
                        fresh = self._now() - path.stat().st_mtime < 5.0
                    except FileNotFoundError:
                        continue
                    if fresh:
                        time.sleep(0.05)
                        continue
                elif not self._dead(owner, path):
                    return owner
                target = self.folder / f"{name}.{number + 1}"
            else:
                target = self.folder / f"{name}.1"
            if self._create(target):
                with self._lock:
                    self._held[name] = target
                if self._closed:  # release_all ran meanwhile: give it back at once
                    self.release(name)
                    return UNKNOWN
                for _, old in generations:  # older generations are history now
                    _unlink(old)
                self._start_heartbeat()
                return None
        return self.owner(name) or UNKNOWN  # contended for 20 rounds: leave it to the others

    def still_mine(self, name: str) -> bool:
        """Whether this process's claim on ``name`` is still the newest (not taken over)."""
        with self._lock:
            mine = self._held.get(name)
        if mine is None:
            return False
        generations = self._generations(name)
        return bool(generations) and generations[-1][1] == mine

    def release(self, name: str) -> None:
        with self._lock:
            mine = self._held.get(name)
        if mine is not None:
            _unlink(mine)  # first, then forgotten: a signal between the two leaves it to release_all
            with self._lock:
                if self._held.get(name) == mine:
                    del self._held[name]

    def release_all(self) -> None:
        self._closed = True
        with self._lock:
            names = list(self._held)
        for name in names:
            self.release(name)
        self._stop.set()

    def _create(self, target: Path) -> bool:
        payload = json.dumps(dict(self.me.__dict__, started=time.time())).encode()  # when this claim was taken
        try:
            fd = os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            return False
        try:
            os.write(fd, payload)
        finally:
            os.close(fd)
        return True

    def _start_heartbeat(self) -> None:
        if self._beat is not None and self._beat.is_alive():
            return
        self._stop.clear()
        self._beat = threading.Thread(target=self._beat_loop, name="h0mini-claims", daemon=True)
        self._beat.start()

    def _beat_loop(self) -> None:
        while not self._stop.wait(self.heartbeat):
            with self._lock:
                held = list(self._held.values())
            for path in held:
                try:
                    os.utime(path)
                except OSError:
                    pass  # taken over: still_mine() tells the owner


def _read(path: Path) -> Optional[Owner]:
    try:
        data = json.loads(path.read_bytes())
        return Owner(str(data["host"]), int(data["pid"]), data.get("process_start"), float(data["started"]),
                     data.get("pid_namespace"))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
