"""The GPU slot: one job on a GPU at a time, whoever starts it, and a hand-over that does not idle it.

A chunk holds two things while it sends rows:

1. **The machine lock of its endpoint**: a file per GPU (keyed by the backend's server URL, a
   loopback address standing for this machine, or `embedded` for the in-process model) in a
   directory every process of the machine sees, $GPU_BATCH_LOCK_DIR or /tmp/gpu-batch-inference-gpu-locks,
   `flock`ed for as long as the chunk (or its run, see 3.) holds the GPU. It does not depend on
   Prefect: two CLI jobs with their own PREFECT_HOME (each its own temporary server), or a CLI
   job and a worker's deployment run, take turns. The kernel frees the lock of a dead process.
   A waiting process leaves a record beside it (`<key>.waiting/`, also flocked) and says once a
   minute whom it waits for (pid, chunk, output directory, since when, from `<key>.holder.json`).
2. **A slot of the Prefect global concurrency limit** (`gpu` by default), taken as a lease: the
   only guard between machines, which share nothing but a Prefect server.

3. **The slot is kept across chunks of one run** (`keep_slots()`, around the flow's chunk loop):
   a chunk that ends hands lease and lock to the run's next chunk unless someone waits, that is,
   a live waiting record on this machine, or a refusal of the Prefect slot since the run took it,
   seen at a lease renewal (the server writes the limit's `updated` stamp for each: a run on
   another machine asking for it; so it gets its turn within a renewal period and a chunk).
   Then it gives both up, and its own next chunk lets the waiter take them first. A kept slot that
   no chunk takes within KEEP_IDLE_S (a retry delay, the end of the run) is given back.

What happens when things die. Every holder also leaves a record under
$PREFECT_HOME/gpu-slots/ (one folder per Prefect API) with its lease id, pid, chunk, when it last
renewed the lease and the limit's `updated` stamp right after it took the slot, `flock`ed for as
long as the process lives. A slot is freed by someone else only when its holder is provably dead
and the slot provably still counted:
  - the holder ran on this machine and its record's lock is free (the process is gone), and
  - the server still knows its lease (released by the lease), or the server forgot the lease
    (a restart with the default in-memory lease storage) while the slot is provably still
    counted: the limit was not written since the holder took it (`updated` unchanged: no
    expiry, release or reset happened), or the holder renewed the lease less than a lease
    ago (it cannot have expired). Then one slot is given back by count;
  - or the server is a temporary one (no PREFECT_API_URL): only this machine's runs use its
    database, so every slot beyond the live holders is a dead run's.
A holder on another machine is never judged from here: its slot comes back when its lease runs
out, or is freed by the next run on its own machine. A live run whose lease the server forgot
(renewal answers 410) frees its own slot by the same proof and takes it again, or, if another
run took it meanwhile, goes on under the machine lock and says so; it never waits on itself.
A server that stops answering is named once ("the Prefect server at URL is not answering
(since HH:MM:SS)"), and again when it is back.

Reach: one GPU, one job, on one machine (the lock files). Across machines only through one shared
Prefect server and its limit; two machines that send to one GPU with separate Prefect servers
are not kept apart.
"""

from __future__ import annotations

import contextvars
import fcntl
import json
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlparse
from uuid import UUID

import httpx
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.client.schemas.responses import GlobalConcurrencyLimitResponse
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
from prefect.settings import PREFECT_CLIENT_MAX_RETRIES, get_current_settings, temporary_settings

from tasks import stopping

# A live holder renews its lease every third of it; Prefect's shortest lease is 60 s.
LEASE_S = 60.0
POLL_S = 1.0  # a local API call per second while waiting for the Prefect slot
LOCK_POLL_S = 0.05  # a syscall per poll while waiting for the machine lock: a freed GPU is taken at once
SAY_EVERY_S = 60.0  # how often a waiting run repeats what it waits for
KEEP_IDLE_S = 5.0  # a kept slot that no chunk of the run takes within this is given back
HANDOVER_S = 3.0  # after giving the GPU up for a waiter, this process lets it take the GPU first
LOCK_DIR_ENV = "GPU_BATCH_LOCK_DIR"
DEFAULT_LOCK_DIR = "/tmp/gpu-batch-inference-gpu-locks"
LOOPBACK = ("localhost", "127.0.0.1", "::1", "0.0.0.0")

Say = Callable[[str], None]


class GpuSlotTimeout(TimeoutError):
    """No GPU slot came free in time; the message names who holds it."""


def ensure_gpu_limit(name: str, limit: int = 1) -> GlobalConcurrencyLimitResponse | None:
    """Create the limit if missing: Prefect 3.9 silently skips limits that do not exist.

    Returns the limit that was there already, None when it had to be created.
    """
    with get_client(sync_client=True) as client:
        try:
            return client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            # Another run may create it between our read and create.
            with suppress(ObjectAlreadyExists):
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=limit))
            return None


def registry_dir() -> Path:
    """Where this machine's holders of one Prefect API leave their records (under PREFECT_HOME,
    beside a temporary server's database); one folder per API, as slots are per server."""
    url = get_current_settings().api.url
    server = re.sub(r"[^A-Za-z0-9_.-]+", "-", url) if url else "temporary-server"
    return Path(get_current_settings().home) / "gpu-slots" / server


def temporary_server() -> bool:
    """True when no API URL is set: each run starts its own server on the database in PREFECT_HOME."""
    return get_current_settings().api.url is None


def _clock(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%H:%M:%S UTC")


def _who(info: dict[str, Any]) -> str:
    """pid, host, flow run, chunk and output directory of a holder or waiter, as far as known."""
    parts = [f"pid {info.get('pid')} on {info.get('host')}"]
    if info.get("flow_run"):
        parts.append(f"flow run {info['flow_run']}")
    if info.get("chunk") and info.get("output_dir"):
        parts.append(f"{info['chunk']} of {info['output_dir']}")
    elif info.get("chunk") or info.get("output_dir"):
        parts.append(str(info.get("chunk") or info.get("output_dir")))
    return ", ".join(parts)


# ----------------------------------------------------------------------------- the machine lock
def lock_dir() -> Path:
    """The machine's lock directory: the same for every process (not under PREFECT_HOME)."""
    return Path(os.environ.get(LOCK_DIR_ENV) or DEFAULT_LOCK_DIR)


def machine_key(endpoint: str) -> str:
    """The GPU an endpoint stands for, as a file name. A loopback address or this machine's name is
    one server whatever it is called; the URL's path (/v1) names no other server. The embedded model
    is one lock per machine: CUDA_VISIBLE_DEVICES unset, `0` or a GPU's UUID can all name the same
    card (and unset, llama.cpp spreads the model over every GPU), so it cannot tell two GPUs apart."""
    if "://" not in endpoint and "." not in endpoint and ":" not in endpoint:  # 'embedded'
        return endpoint
    url = urlparse(endpoint if "://" in endpoint else f"http://{endpoint}")
    host = (url.hostname or "localhost").lower()
    if host in LOOPBACK or host.startswith("127.") or host == socket.gethostname().lower():
        host = "localhost"
    port = url.port or {"https": 443}.get(url.scheme, 80)
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{host}-{port}")


def _open_shared(path: Path) -> int:
    """Open (create) a lock file every user of the machine may lock too."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o1777)
    with suppress(OSError):  # only its creator may; a directory someone else made stays as it is
        if path.parent.stat().st_uid == os.getuid():
            path.parent.chmod(0o1777)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    with suppress(OSError):
        os.fchmod(fd, 0o666)
    return fd


def _write_json(path: Path, info: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(json.dumps(info))
    os.replace(tmp, path)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text() or "{}")
    except (FileNotFoundError, ValueError):
        return None
    return data if isinstance(data, dict) else None


class MachineLock:
    """The GPU of one endpoint on this machine: `<key>.lock`, flocked by its holder, who describes
    itself in `<key>.holder.json`; waiters leave flocked records in `<key>.waiting/`."""

    def __init__(self, key: str) -> None:
        folder = lock_dir()
        self.key = key
        self.path = folder / f"{key}.lock"
        self.holder_path = folder / f"{key}.holder.json"
        self.waiting_dir = folder / f"{key}.waiting"
        self.fd: int | None = None

    def try_take(self, info: dict[str, Any]) -> bool:
        fd = _open_shared(self.path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self.fd = fd
        self.describe(info)
        return True

    def describe(self, info: dict[str, Any]) -> None:
        """Say who holds the GPU (rewritten at each chunk of a kept slot)."""
        with suppress(OSError):  # a lock directory we may lock but not write in: the lock still holds
            _write_json(self.holder_path, info)

    def release(self) -> None:
        if self.fd is None:
            return
        # The description goes first: whoever takes the lock next writes its own.
        with suppress(OSError):
            self.holder_path.unlink(missing_ok=True)
        os.close(self.fd)  # drops the flock
        self.fd = None

    def holder(self) -> dict[str, Any] | None:
        return _read_json(self.holder_path)

    def waiters(self) -> list[dict[str, Any]]:
        """The live waiting records (a dead waiter's is removed)."""
        live = []
        for path in sorted(self.waiting_dir.glob("*.json")):
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                continue
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    live.append(_read_json(path) or {})
                    continue
                with suppress(OSError):
                    path.unlink()  # its process is gone
            finally:
                os.close(fd)
        return live

    @contextmanager
    def waiting(self, info: dict[str, Any]) -> Iterator[None]:
        """A record that says we wait, locked while we live: the holder gives the GPU up at its chunk's end."""
        path = self.waiting_dir / f"{socket.gethostname()}-{os.getpid()}-{threading.get_ident()}.json"
        fd = _open_shared(path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps(info).encode())
            yield
        finally:
            with suppress(OSError):
                path.unlink()
            os.close(fd)

    def held_by(self) -> str:
        info = self.holder()
        if not info:
            return "a process that has not said who it is yet"
        return f"{_who(info)}, since {_clock(info.get('since', 0))}"


# ----------------------------------------------------------------------------- holder records
@dataclass
class Holder:
    """A holder record read back; `alive` is False once its process is gone (its flock is free)."""

    path: Path
    info: dict[str, Any]
    alive: bool

    def describe(self) -> str:
        i = self.info
        since = datetime.fromtimestamp(i.get("since", 0), UTC).strftime("%H:%M:%S UTC")
        where = " ".join(str(x) for x in (i.get("chunk"), "of", i.get("output_dir")) if x) if i.get("chunk") else ""
        run = f"flow run {i['flow_run']} " if i.get("flow_run") else ""
        state = "running" if self.alive else "dead"
        return f"{run}pid {i.get('pid')} on {i.get('host')} ({state}), {where}, since {since}".replace(" , ", " ")


def _read_holders(limit: str) -> list[Holder]:
    holders = []
    for path in sorted((registry_dir() / limit).glob("*.json")):
        try:
            handle = path.open("r+")
        except FileNotFoundError:  # its holder just released
            continue
        with handle:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                alive = False
            except BlockingIOError:
                alive = True
            try:
                info = json.loads(handle.read() or "{}")
            except ValueError:  # killed while writing it: no lease id, nothing to free by
                info = {}
        holders.append(Holder(path, info, alive))
    return holders


@contextmanager
def _registry_mutex(limit: str) -> Iterator[None]:
    """Serialises "take a slot and record it" against "count the live holders", on this machine,
    so a holder between the two is never mistaken for a missing one."""
    path = registry_dir() / limit / ".mutex"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        yield


def _lease_known(client: SyncPrefectClient, lease_id: UUID) -> bool:
    """Whether the server still has the lease (410 Gone: expired and returned, or lost in a restart).
    Asking renews it; only leases about to be released are asked about."""
    try:
        client.renew_concurrency_lease(lease_id, LEASE_S)
    except httpx.HTTPStatusError as exc:
        if exc.response.status_code in (404, 410):
            return False
        raise
    return True


def _still_counted(limit: GlobalConcurrencyLimitResponse, info: dict[str, Any]) -> bool:
    """Whether the slot of a holder whose lease the server forgot still counts in `active_slots`:
    nothing wrote the limit since the holder took it (an expiry, a release or a reset would have),
    or the holder renewed its lease less than a lease ago, so it cannot have expired."""
    unchanged = info.get("limit_updated") is not None and info["limit_updated"] == str(limit.updated)
    renewed = info["renewed_at"] if "renewed_at" in info else info.get("since", 0)
    return unchanged or time.time() - renewed < LEASE_S - 5  # 5 s: the server's clock may run ahead


def _give_back(
    client: SyncPrefectClient, limit: str, lease: UUID, info: dict[str, Any], by_count: bool = True
) -> str | None:
    """Return a dead (or leaving) holder's slot; says how, or None when it provably needs nothing
    (the lease expired and the server took the slot back) or cannot be proven to."""
    if _lease_known(client, lease):
        client.release_concurrency_slots_with_lease(lease)
        return "by its lease"
    if not by_count:
        return None
    gcl = client.read_global_concurrency_limit_by_name(limit)
    if gcl.active_slots > 0 and _still_counted(gcl, info):
        client.release_concurrency_slots([limit], 1, occupancy_seconds=1.0)  # must be > 0
        return "by count: the Prefect server forgot its lease (restarted?) but still counted the slot"
    return None


def free_dead_holders(client: SyncPrefectClient, limit: str, say: Say) -> int:
    """Give back the slots of holders on this machine whose process is gone; returns how many."""
    freed = 0
    holders = _read_holders(limit)
    for holder in [h for h in holders if not h.alive]:
        lease = holder.info.get("lease_id")
        if lease:
            # On a temporary server the count below frees what the dead took, all at once.
            how = _give_back(client, limit, UUID(lease), holder.info, by_count=not temporary_server())
            if how:
                freed += 1
                say(f"GPU slot '{limit}': freed the slot of a killed run, {holder.describe()} (lease {lease}), {how}")
            # Otherwise the lease is gone and so is its slot: a started server took it back at
            # the lease's expiry (or it cannot be proven otherwise; a temporary server is counted below).
        holder.path.unlink(missing_ok=True)
    if temporary_server():
        # Only this machine's runs use this database, and each holder here has a live record:
        # any slot beyond them belongs to a run that died with its temporary server.
        live = sum(h.alive and bool(h.info.get("lease_id")) for h in holders)  # waiters hold no slot
        taken = client.read_global_concurrency_limit_by_name(limit).active_slots
        if (orphans := taken - live) > 0:
            client.release_concurrency_slots([limit], orphans, occupancy_seconds=1.0)  # must be > 0
            freed += orphans
            say(
                f"GPU slot '{limit}': freed {orphans} slot(s) left taken by a run killed with its temporary "
                f"Prefect server ({taken} taken, {live} held by live runs on this machine)"
            )
    return freed


def _waiting_for(client: SyncPrefectClient, limit: str) -> str:
    gcl = client.read_global_concurrency_limit_by_name(limit)
    live = [h for h in _read_holders(limit) if h.alive and h.info.get("lease_id")]
    held = "; ".join(h.describe() for h in live)
    unknown = gcl.active_slots - len(live)
    if unknown > 0:
        others = f"{unknown} by a run this machine has no record of (another host, or an older version)"
        held = f"{held}; {others}" if held else others
        held += f"; a dead holder's slot comes back when its {LEASE_S:.0f} s lease runs out"
    return f"{gcl.active_slots} of {gcl.limit} slot(s) taken: {held}"


# ----------------------------------------------------------------------------- a held slot
def _take(client: SyncPrefectClient, limit: str, record: Path, info: dict[str, Any]) -> UUID | None:
    """One attempt: a slot and its record, or None when all slots are taken."""
    with _registry_mutex(limit):
        try:
            response = client.increment_concurrency_slots_with_lease([limit], 1, "concurrency", LEASE_S)
        except httpx.HTTPStatusError as exc:
            if exc.response.status_code == 423:  # Locked: every slot is taken
                return None
            raise
        lease_id = UUID(response.json()["lease_id"])
        # The limit's `updated` right after the take: while it stays so, this slot provably counts.
        info.update(lease_id=str(lease_id), renewed_at=time.time())
        info["limit_updated"] = str(client.read_global_concurrency_limit_by_name(limit).updated)
        record.write_text(json.dumps(info))
        return lease_id


def _server_url(client: SyncPrefectClient) -> str:
    return str(client.api_url).rstrip("/")


@dataclass
class _Wait:
    """One wait for the GPU (the machine lock, or the Prefect slot): it fails at slot_timeout_s, says who
    holds it every SAY_EVERY_S, and a stop (Ctrl-C, SIGTERM) ends it at once instead of waiting it out."""

    what: str  # "the GPU of http://host:11434", "GPU slot 'gpu'"
    started: float
    timeout_s: float
    say: Say
    hint: str = ""  # what to do when the timeout is reached
    said: float = -SAY_EVERY_S

    def round(self, holder: Callable[[], str], poll_s: float) -> None:
        """One poll that did not get it; `holder()` (who has it) is asked only when it is told."""
        waited = time.monotonic() - self.started
        if waited >= self.timeout_s:
            raise GpuSlotTimeout(f"{self.what} not free after {self.timeout_s:.0f}s: {holder()}. {self.hint}".rstrip())
        if waited - self.said >= SAY_EVERY_S:
            self.say(
                f"waiting for {self.what} ({waited:.0f}s so far, up to slot_timeout_s={self.timeout_s:.0f}): {holder()}"
            )
            self.said = waited
        if stopping.sleep(poll_s):
            stopping.check(f"while waiting for {self.what}")


@dataclass
class _Slot:
    """What a chunk holds: the machine lock (if it named its endpoint), a Prefect lease renewed by a
    thread, and the holder record that says so. Kept across chunks by a run's keeper."""

    name: str
    key: str | None
    endpoint: str | None
    say: Say
    info: dict[str, Any]
    lock: MachineLock | None
    record: Path
    handle: Any  # the record's open file, flocked while we live
    record_len: int = 0  # bytes of the longest record written: a shorter one is padded to it
    lease_id: UUID | None = None
    server: str = ""
    down_since: float | None = None
    asked: str | None = None  # a run elsewhere asked for the Prefect slot (seen at a renewal)
    guard: threading.Lock = field(default_factory=threading.Lock)
    stop: threading.Event = field(default_factory=threading.Event)
    renewal: threading.Thread | None = None

    # -- taking it
    @classmethod
    def acquire(
        cls,
        client: SyncPrefectClient,
        name: str,
        endpoint: str | None,
        timeout_s: float,
        say: Say,
        about: dict[str, Any] | None,
    ) -> _Slot:
        started = time.monotonic()
        key = machine_key(endpoint) if endpoint else None
        info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(), **(about or {})}
        lock = MachineLock(key) if key else None
        if lock is not None:
            _let_waiter_take(lock)
            if not lock.try_take(info):
                wait = _Wait(f"the GPU of {endpoint}", started, timeout_s, say)
                with lock.waiting(info):
                    while not lock.try_take(info):
                        wait.round(lambda: f"held on this machine by {lock.held_by()} (lock {lock.path})", LOCK_POLL_S)
            info["since"] = time.time()
            lock.describe(info)
        folder = registry_dir() / name
        folder.mkdir(parents=True, exist_ok=True)
        record = folder / f"{socket.gethostname()}-{os.getpid()}-{threading.get_ident()}.json"
        # Flocked at once: while we live, no waiter takes us for dead. Not O_APPEND: records are rewritten in place.
        handle = os.fdopen(os.open(record, os.O_RDWR | os.O_CREAT, 0o644), "r+")
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        slot = cls(name, key, endpoint, say, info, lock, record, handle, server=_server_url(client))
        try:
            slot.lease_id = slot._wait_for_lease(client, started, timeout_s)
        except BaseException:
            slot._drop_record()
            if lock is not None:
                lock.release()
            raise
        slot._start_renewal()
        return slot

    def _wait_for_lease(self, client: SyncPrefectClient, started: float, timeout_s: float) -> UUID:
        name = self.name
        _let_remote_waiter_take(client, name)
        wait = _Wait(
            f"GPU slot '{name}'",
            started,
            timeout_s,
            self.say,
            hint=f"If that run is gone and its slot stays taken: `prefect gcl update {name} --active-slots 0`.",
        )
        while (lease_id := _take(client, name, self.record, self.info)) is None:
            with _registry_mutex(name):
                freed = free_dead_holders(client, name, self.say)
            if not freed:
                wait.round(lambda: _waiting_for(client, name), POLL_S)
        return lease_id

    # -- holding it
    def _write_record(self) -> None:
        # Overwritten in place by one write, padded to the last record's length: a kill or a reader never
        # meets an empty or half-written record. (Truncating first left the file empty for a moment: a run
        # killed then at a chunk hand-over lost the lease id its rerun frees the slot by.)
        with self.guard:
            data = json.dumps(self.info).encode().ljust(self.record_len)
            os.pwrite(self.handle.fileno(), data, 0)
            self.record_len = len(data)

    def retell(self, say: Say, about: dict[str, Any] | None) -> None:
        """The next chunk of the run takes the kept slot over: records say which chunk holds it now."""
        self.say = say
        self.info.update(about or {})
        self._write_record()
        if self.lock is not None:
            self.lock.describe(self.info)

    def _start_renewal(self) -> None:
        # In a copy of the caller's context: its Prefect settings (API URL, test harness) hold there too.
        run = contextvars.copy_context().run
        self.renewal = threading.Thread(target=run, args=(self._renew_loop,), name="gpu-slot-lease", daemon=True)
        self.renewal.start()

    def _renew_loop(self) -> None:
        # No client retries: a server that is down is said within one renewal period, not minutes later.
        with temporary_settings({PREFECT_CLIENT_MAX_RETRIES: 0}), get_client(sync_client=True) as client:
            while not self.stop.wait(LEASE_S / 3):
                self.renew(client)

    def renew(self, client: SyncPrefectClient) -> None:
        """Renew the lease; a failure is said, not fatal (the chunk goes on under the machine lock)."""
        if self.lease_id is None:
            return
        try:
            client.renew_concurrency_lease(self.lease_id, LEASE_S)
        except httpx.HTTPStatusError as exc:
            self._answering()
            if exc.response.status_code not in (404, 410):
                self.say(f"GPU slot '{self.name}': lease renewal failed (retrying): {exc}")
                return
            try:
                self._lease_lost()
            except Exception as lost:  # noqa: BLE001 - the next renewal tries again
                self.say(
                    f"GPU slot '{self.name}': the server forgot this run's lease; taking the slot again failed: {lost}"
                )
        except (httpx.TransportError, OSError) as exc:
            self._not_answering(exc)
        except Exception as exc:  # noqa: BLE001 - a network blip must not kill the chunk
            self.say(f"GPU slot '{self.name}': lease renewal failed (retrying): {exc}")
        else:
            self._answering()
            self.info["renewed_at"] = time.time()
            self._write_record()
            with suppress(Exception):  # only a hint for the next hand-over
                self._asked_for(client)

    def _not_answering(self, exc: BaseException) -> None:
        if self.down_since is None:
            self.down_since = time.time()
            guard = f"the machine lock of {self.endpoint}" if self.lock else "nothing but this process"
            self.say(
                f"the Prefect server at {self.server} is not answering (since {_clock(self.down_since)}): "
                f"{type(exc).__name__}: {exc}. Meanwhile the GPU is guarded by {guard} alone"
            )

    def _answering(self) -> None:
        if self.down_since is not None:
            self.say(
                f"the Prefect server at {self.server} answers again (it did not for {time.time() - self.down_since:.0f}s)"
            )
            self.down_since = None

    def _lease_lost(self) -> None:
        """The server forgot our lease (a restart with in-memory lease storage, or it expired while
        the server was away). Our slot is ours to free when provably still counted; then take it again."""
        # With the client's usual retries: a just restarted SQLite server may answer 503 "database is locked".
        with temporary_settings({PREFECT_CLIENT_MAX_RETRIES: 5}), get_client(sync_client=True) as client:
            gcl = client.read_global_concurrency_limit_by_name(self.name)
            if gcl.active_slots > 0 and _still_counted(gcl, self.info):
                client.release_concurrency_slots([self.name], 1, occupancy_seconds=1.0)
                self.info.update(limit_updated=None, renewed_at=0.0)  # freed: never counted twice
            lease = _take(client, self.name, self.record, self.info)
            if lease is not None:
                self.lease_id = lease
                self.say(
                    f"GPU slot '{self.name}': the Prefect server at {self.server} had forgotten this run's lease "
                    f"(restarted?); took the slot again (lease {lease})"
                )
                return
            self.lease_id = None
            guard = f"the machine lock of {self.endpoint}" if self.lock else "nothing"
            self.say(
                f"GPU slot '{self.name}': the Prefect server at {self.server} had forgotten this run's lease and "
                f"the slot is taken now ({_waiting_for(client, self.name)}); this chunk goes on under {guard}, "
                "the next one waits for the slot"
            )

    def _asked_for(self, client: SyncPrefectClient) -> None:
        """Whether a run elsewhere asked for the Prefect slot since we took it; checked with each renewal,
        so a chunk's end costs no API call. Prefect records a refusal by writing the limit
        (`denied_slots`, not in its API; `updated` is): with every slot taken, a write since we took
        ours is someone asking for one."""
        gcl = client.read_global_concurrency_limit_by_name(self.name)
        if gcl.active_slots >= gcl.limit and str(gcl.updated) != self.info.get("limit_updated"):
            self.asked = f"GPU slot '{self.name}' was asked for at {gcl.updated:%H:%M:%S} (a run elsewhere)"

    def someone_waits(self) -> tuple[str, str] | None:
        """Who should get the GPU before our next chunk, and where to hand it over (the machine lock's
        key, or the limit): a waiter on this machine, or a run elsewhere that asked for the Prefect slot."""
        if self.lock is not None and (waiters := self.lock.waiters()):
            return f"{len(waiters)} run(s) on this machine wait for the GPU ({_who(waiters[0])})", self.lock.key
        if self.asked:
            return self.asked, f"limit:{self.name}"
        return None

    # -- giving it back
    def _drop_record(self) -> None:
        self.record.unlink(missing_ok=True)
        self.handle.close()

    def release(self, client: SyncPrefectClient) -> None:
        self.stop.set()
        if self.renewal is not None:
            self.renewal.join()
        try:
            if self.lease_id is not None:
                # The lease may be gone (a server restart since the last renewal): then the slot is
                # freed by count when provably still ours, never left counted.
                _give_back(client, self.name, self.lease_id, self.info)
        except (httpx.TransportError, OSError) as exc:
            # The server is away: the record stays, unlocked, and the next taker on this machine frees the slot.
            self._not_answering(exc)
            self.handle.close()
        else:
            self._drop_record()
        finally:
            if self.lock is not None:
                self.lock.release()


# ----------------------------------------------------------------------------- turn-taking
_handed_over: dict[str, float] = {}  # key or limit -> monotonic time until which this process lets a waiter go first
_handed_over_guard = threading.Lock()


def _hand_over(what: str) -> None:
    with _handed_over_guard:
        _handed_over[what] = time.monotonic() + HANDOVER_S


def _handover_pending(what: str) -> bool:
    with _handed_over_guard:
        until = _handed_over.get(what, 0.0)
    return time.monotonic() < until


def _let_waiter_take(lock: MachineLock) -> None:
    """Right after this process gave the GPU up for a waiter, wait until that waiter holds it: the
    waiter polls, and our next chunk would otherwise take it back first."""
    while _handover_pending(lock.key) and lock.holder() is None and lock.waiters():
        time.sleep(LOCK_POLL_S)


def _let_remote_waiter_take(client: SyncPrefectClient, name: str) -> None:
    """The same for a waiter on another machine, which polls the Prefect slot once a second."""
    while _handover_pending(f"limit:{name}"):
        gcl = client.read_global_concurrency_limit_by_name(name)
        if gcl.active_slots >= gcl.limit:
            return
        time.sleep(0.1)


class _Keeper:
    """The slots a run keeps between its chunks; one each per limit and endpoint."""

    def __init__(self) -> None:
        self.kept: dict[tuple[str, str | None], tuple[_Slot, threading.Timer]] = {}
        self.guard = threading.Lock()

    def take(self, name: str, endpoint: str | None) -> _Slot | None:
        with self.guard:
            entry = self.kept.pop((name, endpoint), None)
        if entry is None:
            return None
        entry[1].cancel()
        return entry[0]

    def keep(self, slot: _Slot) -> None:
        run = contextvars.copy_context().run
        timer = threading.Timer(KEEP_IDLE_S, run, args=(self._expire, slot))
        timer.daemon = True
        with self.guard:
            self.kept[(slot.name, slot.endpoint)] = (slot, timer)
        timer.start()

    def _expire(self, slot: _Slot) -> None:
        with self.guard:
            entry = self.kept.get((slot.name, slot.endpoint))
            if entry is None or entry[0] is not slot:
                return  # a chunk took it meanwhile
            del self.kept[(slot.name, slot.endpoint)]
        with get_client(sync_client=True) as client:
            slot.release(client)

    def close(self) -> None:
        with self.guard:
            entries, self.kept = list(self.kept.values()), {}
        if not entries:
            return
        with get_client(sync_client=True) as client:
            for slot, timer in entries:
                timer.cancel()
                slot.release(client)


_KEEPER: contextvars.ContextVar[_Keeper | None] = contextvars.ContextVar("gpu_slot_keeper", default=None)


@contextmanager
def keep_slots() -> Iterator[None]:
    """Inside this block (one run's chunks), a chunk's slot passes to the next chunk unless someone
    waits for it; all are given back at the end."""
    keeper = _Keeper()
    token = _KEEPER.set(keeper)
    try:
        yield
    finally:
        _KEEPER.reset(token)
        keeper.close()


@contextmanager
def gpu_slot(
    name: str,
    timeout_s: float,
    say: Say,
    about: dict[str, Any] | None = None,
    endpoint: str | None = None,
) -> Iterator[None]:
    """Hold one slot of `name` (and, given `endpoint`, that GPU's machine lock) for the block,
    saying what it waits for while either is taken.

    `about` (chunk, output_dir, flow_run) goes into the holder records, so a waiting run can name us.
    Inside `keep_slots()` the slot may come from the run's previous chunk and pass to its next.
    """
    keeper = _KEEPER.get()
    slot = keeper.take(name, endpoint) if keeper is not None else None
    if slot is not None:
        slot.retell(say, about)  # no API call: the hand-over costs nothing but the task boundary
    else:
        with get_client(sync_client=True) as client:
            try:
                client.read_global_concurrency_limit_by_name(name)
            except ObjectNotFound:
                raise RuntimeError(
                    f"GPU limit '{name}' does not exist (create it: prefect gcl create {name} --limit 1)"
                ) from None
            slot = _Slot.acquire(client, name, endpoint, timeout_s, say, about)
    done = False
    try:
        yield
        done = True
    finally:
        waits = None
        # A slot the server forgot and another run took (lease_id None) is not kept: the next
        # chunk waits for it like anyone else.
        keep = done and keeper is not None and slot.lease_id is not None
        if keep:
            try:
                waits = slot.someone_waits()
            except Exception as exc:  # noqa: BLE001 - cannot tell: give the GPU up, as without a keeper
                slot.say(f"GPU slot '{name}': given up after this chunk, could not tell who waits: {exc}")
                keep = False
        if keep and waits is None:
            assert keeper is not None
            keeper.keep(slot)
        else:
            if waits is not None:
                slot.say(f"GPU slot '{name}': given up after this chunk, {waits[0]}")
                _hand_over(waits[1])
            with get_client(sync_client=True) as client:
                slot.release(client)
