"""The GPU slot: a Prefect global concurrency limit that must exist before anyone acquires it.

A slot is a lease on the Prefect server. A run killed while it holds one (SIGKILL, a lost
machine) stops renewing it; a started server frees it when the lease runs out, but a temporary
server dies with the killed process and takes the lease with it, leaving the slot counted as
taken in the database forever. So every holder on this machine also leaves a record: a file
under $PREFECT_HOME/gpu-slots/ with its lease id, pid and chunk, `flock`ed for as long as the
process lives. A waiting run reads these records, says who it waits for, and frees the slot of
a holder whose lock the kernel has released (the process is gone): by its lease id, or, on a
temporary server (whose database only this machine's runs use), by the count of slots no live
holder accounts for.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from uuid import UUID

import httpx
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.client.schemas.responses import GlobalConcurrencyLimitResponse
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
from prefect.settings import get_current_settings

from tasks import stopping

# A live holder renews its lease every third of it; Prefect's shortest lease is 60 s.
LEASE_S = 60.0
POLL_S = 1.0  # a local API call per second while waiting: a freed slot is taken at once
SAY_EVERY_S = 60.0  # how often a waiting run repeats what it waits for

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


def free_dead_holders(client: SyncPrefectClient, limit: str, say: Say) -> int:
    """Give back the slots of holders on this machine whose process is gone; returns how many."""
    freed = 0
    holders = _read_holders(limit)
    for holder in [h for h in holders if not h.alive]:
        lease = holder.info.get("lease_id")
        if lease:
            try:
                client.release_concurrency_slots_with_lease(UUID(lease))
                freed += 1
                say(f"GPU slot '{limit}': freed the slot of a killed run, {holder.describe()} (lease {lease})")
            except httpx.HTTPStatusError as exc:
                if exc.response.status_code != 404:
                    raise
                # The lease is gone: a started server already took the slot back at its expiry, or
                # a temporary server lost it when it died (counted below).
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


class _Renewal(threading.Thread):
    """Renews the lease while the block runs; a failed renewal is said, not fatal (the next may work)."""

    def __init__(self, lease_id: UUID, say: Say) -> None:
        super().__init__(name="gpu-slot-lease", daemon=True)
        self.lease_id, self.say, self.stop = lease_id, say, threading.Event()

    def run(self) -> None:
        with get_client(sync_client=True) as client:
            while not self.stop.wait(LEASE_S / 3):
                try:
                    client.renew_concurrency_lease(self.lease_id, LEASE_S)
                except Exception as exc:  # noqa: BLE001 - a network blip must not kill the chunk
                    self.say(f"GPU slot lease renewal failed (retrying): {exc}")


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
        record.write_text(json.dumps({**info, "lease_id": str(lease_id)}))
        return lease_id


@contextmanager
def gpu_slot(name: str, timeout_s: float, say: Say, about: dict[str, Any] | None = None) -> Iterator[None]:
    """Hold one slot of `name` for the block, saying what it waits for while the slot is taken.

    `about` (chunk, output_dir, flow_run) goes into the holder record, so a waiting run can name us.
    """
    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            raise RuntimeError(
                f"GPU limit '{name}' does not exist (create it: prefect gcl create {name} --limit 1)"
            ) from None
        folder = registry_dir() / name
        folder.mkdir(parents=True, exist_ok=True)
        record = folder / f"{socket.gethostname()}-{os.getpid()}-{threading.get_ident()}.json"
        handle = record.open("a+")  # flocked at once: while we live, no waiter takes us for dead
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(), **(about or {})}
        try:
            started = time.monotonic()
            said = -SAY_EVERY_S
            while (lease_id := _take(client, name, record, info)) is None:
                with _registry_mutex(name):
                    freed = free_dead_holders(client, name, say)
                if freed:
                    continue
                waited = time.monotonic() - started
                if waited >= timeout_s:
                    raise GpuSlotTimeout(
                        f"GPU slot '{name}' not free after {timeout_s:.0f}s: {_waiting_for(client, name)}. "
                        f"If that run is gone and its slot stays taken: `prefect gcl update {name} --active-slots 0`."
                    )
                if waited - said >= SAY_EVERY_S:
                    say(
                        f"waiting for GPU slot '{name}' ({waited:.0f}s so far, up to slot_timeout_s={timeout_s:.0f}): "
                        f"{_waiting_for(client, name)}"
                    )
                    said = waited
                if stopping.sleep(POLL_S):  # Ctrl-C while another run holds the slot: no waiting it out
                    stopping.check(f"while waiting for GPU slot '{name}'")
            renewal = _Renewal(lease_id, say)
            renewal.start()
            try:
                yield
            finally:
                renewal.stop.set()
                renewal.join()
                client.release_concurrency_slots_with_lease(lease_id)
        finally:
            record.unlink(missing_ok=True)
            handle.close()
