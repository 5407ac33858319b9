"""The GPU slot: a Prefect global concurrency limit that must exist before anyone acquires it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress

from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

# A live holder renews its lease in the background; a killed one (SIGKILL, lost machine) stops
# renewing and its slot comes back when the lease runs out. Prefect's shortest lease is 60 s.
LEASE_S = 60.0


class GpuSlotTimeout(TimeoutError):
    """No GPU slot came free in time (a killed run may still hold it)."""


def ensure_gpu_limit(name: str, limit: int = 1) -> None:
    """Create the limit if missing: Prefect 3.9 silently skips limits that do not exist."""
    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            # Another run may create it between our read and create.
            with suppress(ObjectAlreadyExists):
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=limit))


@contextmanager
def gpu_slot(name: str, timeout_s: float) -> Iterator[None]:
    """Hold one slot of `name` for the block; strict so a missing limit is an error, not a free pass."""
    with ExitStack() as stack:
        try:
            stack.enter_context(
                concurrency(name, occupy=1, strict=True, timeout_seconds=timeout_s, lease_duration=LEASE_S)
            )
        except TimeoutError as exc:  # only the acquisition: the body's own timeouts pass through untouched
            raise GpuSlotTimeout(
                f"GPU slot '{name}' not free after {timeout_s:.0f}s. If no other run is using the GPU, a killed "
                f"run may still hold it: `prefect gcl inspect {name}`, then "
                f"`prefect gcl update {name} --active-slots 0`."
            ) from exc
        yield
