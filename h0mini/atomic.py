"""Files that appear whole or not at all, and the leftovers of writers that died.

Every output is written under a temporary name beside its final one and renamed into place. The
temporary name says who wrote it: ``.NAME.PID-MACHINE-RANDOM.tmp``, where MACHINE is a short digest
of the host name, the pid namespace and the kernel's boot id (two nodes cloned with one host name
still differ, and so does a machine before and after a reboot, whose pids start again). A later run
removes a leftover

- of its own machine (same host, same pid namespace, same boot) when that pid is gone;
- of another machine (another host on a shared file system, another container) only when the file
  has not changed for ``FOREIGN_TEMP_TIMEOUT`` seconds, measured on the file system's own clock: a pid
  of another machine says nothing here, and the clocks of two machines need not agree.

Names without MACHINE (older versions) are judged by their pid, as those versions did.
"""

from __future__ import annotations

import functools
import hashlib
import os
import secrets
import shutil
import socket
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, List, Optional

FOREIGN_TEMP_TIMEOUT = 3600.0
"""Seconds without a change after which another machine's temporary file counts as abandoned (a live
writer changes its file as it writes; an hour is far beyond any pause between two writes)."""


MAX_CLOCK_SKEW = 86400.0
"""Seconds between this machine's clock and a file system's beyond which the file system's stamp is
not a clock (a day: no cluster's clocks drift that far; an unflushed FUSE file's 0 does)."""


def pid_namespace() -> Optional[str]:
    """This process's pid namespace (Linux: ``pid:[4026531836]``), or None where it cannot be told."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


@functools.lru_cache(maxsize=None)
def machine_tag() -> str:
    """Eight hex digits naming this host, pid namespace and boot: the processes whose pids this one can see."""
    namespace = pid_namespace() or ""
    try:  # random per boot (Linux): tells apart hosts that share a name, and the boots of one host
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    return hashlib.sha1(f"{socket.gethostname()}\0{namespace}\0{boot}".encode()).hexdigest()[:8]


def temp_name(name: str) -> str:
    """A temporary name for ``name`` unique to this process and call (see the module's docstring)."""
    return f".{name}.{os.getpid()}-{machine_tag()}-{secrets.token_hex(4)}.tmp"


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path``, renamed onto it only when the block succeeds.

    The file is created with mode 0666 less the umask, like any file the user creates.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / temp_name(path.name)
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextmanager
def atomic_folder(folder: Path) -> Iterator[Path]:
    """A temporary folder beside ``folder``, put in its place only when the block succeeds.

    Readers never see a half-written folder and a failure leaves nothing behind. The folder
    gets mode 0777 less the umask (``mkdtemp``'s 0700 is for the work in progress). A folder
    already at ``folder`` is replaced.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.{os.getpid()}-{machine_tag()}-", suffix=".tmp",
                                dir=folder.parent))
    mask = os.umask(0o022)
    os.umask(mask)
    tmp.chmod(0o777 & ~mask)
    try:
        yield tmp
        if folder.exists():
            old = tmp.with_name(tmp.name + ".old")
            folder.rename(old)
            tmp.rename(folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def remove_stale_temp(path: Path, *, foreign_timeout: float = FOREIGN_TEMP_TIMEOUT) -> List[Path]:
    """Delete the temporary files ``atomic_path`` left beside ``path`` in runs that died.

    A temporary file of a live writer is kept: on this machine, one whose pid is alive; from another
    machine, one changed within ``foreign_timeout`` seconds. One without a process id (older
    versions) counts as stale. Returns the files removed.
    """
    prefix = f".{path.name}."
    try:
        candidates = [p for p in path.parent.iterdir() if p.name.startswith(prefix) and p.name.endswith(".tmp")]
    except OSError:
        return []
    removed: List[Path] = []
    now: Optional[float] = None
    for candidate in candidates:
        middle = candidate.name[len(prefix):-len(".tmp")]
        if "." in middle:  # another file's: ".x.npy.json.PID-....tmp" (x.npy's sidecar) also starts ".x.npy."
            continue
        words = middle.split("-")
        pid = words[0] if len(words) > 1 and words[0].isdigit() else None
        if pid is not None and len(words) == 3 and words[1] != machine_tag():
            now = filesystem_now(path.parent) if now is None else now
            try:
                if now - candidate.stat().st_mtime < foreign_timeout:
                    continue
            except FileNotFoundError:
                continue
        elif pid is not None and pid_alive(int(pid)):
            continue
        try:
            candidate.unlink()
            removed.append(candidate)
        except OSError:
            pass
    return removed


def filesystem_now(directory: Path) -> float:
    """The current time as the file system holding ``directory`` stamps files.

    On a network file system, modification times come from the server's clock; ages computed
    against this process's clock would be off by the skew between the two. A file created here and
    stat'ed at once carries the server's now. Falls back to this machine's clock when the folder
    cannot be written, or when the file system's answer is absurd (more than ``MAX_CLOCK_SKEW`` away:
    some FUSE and object-store mounts stamp a new file 0, or not at all, until it is flushed).
    """
    probe = Path(directory) / temp_name("h0mini-clock")
    try:
        fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
    except OSError:
        return time.time()
    try:
        stamped, here = os.fstat(fd).st_mtime, time.time()
        return stamped if abs(stamped - here) <= MAX_CLOCK_SKEW else here
    finally:
        os.close(fd)
        try:
            os.unlink(probe)
        except OSError:
            pass


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine (this process counts as alive)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True
