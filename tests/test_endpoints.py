"""Several Ollama endpoints in one job (one per GPU), each behind its own Prefect GPU limit."""

from __future__ import annotations

import socket
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from prefect.client.orchestration import get_client

from flows.batch_inference import batch_inference
from harness.ollama_emulator import OllamaEmulator
from tasks.settings.load import load_settings
from tasks.settings.model import Endpoint, SettingsError
from tests.conftest import when

pytestmark = pytest.mark.usefixtures("prefect_server")


@pytest.fixture
def two() -> Iterator[tuple[OllamaEmulator, OllamaEmulator]]:
    # 8 slots each, so a second chunk sent to the same endpoint would show as > 4 requests at once.
    with (
        OllamaEmulator(models=["gemma3:12b"], parallel=8, latency_s=0.01) as fast,
        OllamaEmulator(models=["gemma3:12b"], parallel=8, latency_s=0.04) as slow,
    ):
        yield fast, slow


def _endpoint_job(job: Any, n: int, emus: tuple[OllamaEmulator, ...], **overrides: Any) -> dict[str, Any]:
    settings = job(n, name="endpoints", **overrides)
    del settings["ollama_host"]
    settings["endpoints"] = [{"host": emu.host} for emu in emus]
    return settings


def test_chunks_spread_over_endpoints_each_row_once(job: Any, two: tuple[OllamaEmulator, OllamaEmulator]) -> None:
    # 30 ms a request, not 10: at 10 ms a loaded CI machine answered one request before the chunk's
    # fourth was sent (a peak of 3), and the peak below is what tells one chunk per endpoint.
    two[0].latency_s = 0.03
    settings = _endpoint_job(job, 96, two)  # 12 chunks of 8
    manifest = batch_inference(overrides=settings)
    results = pl.read_parquet(Path(settings["output_dir"]) / "results.parquet")
    assert manifest["complete"] and results["id"].n_unique() == results.height == 96
    assert results["status"].unique().to_list() == ["ok"]
    sent = [Counter(emu.chat_prompts()) for emu in two]
    assert all(sent), "both endpoints took chunks"
    assert sum(sum(c.values()) for c in sent) == 96 and not set(sent[0]) & set(sent[1])  # no row twice
    # One chunk at a time per endpoint: in_flight is 4, so 5+ requests at once would mean two chunks.
    assert [emu.peak_in_flight for emu in two] == [4, 4]
    # Each endpoint held its own limit, named after the machine and port.
    names = {f"gpu-{socket.gethostname()}-{emu.port}" for emu in two}
    with get_client(sync_client=True) as client:
        limits = {gcl.name: gcl for gcl in client.read_global_concurrency_limits(limit=200)}
    assert names <= set(limits) and all(limits[n].limit == 1 and limits[n].active_slots == 0 for n in names)
    report = (Path(settings["output_dir"]) / "report.md").read_text()
    assert all(emu.host in report for emu in two)  # the per-endpoint table


def test_endpoint_killed_mid_run_moves_its_chunks(job: Any, two: tuple[OllamaEmulator, OllamaEmulator]) -> None:
    fast, slow = two
    settings = _endpoint_job(job, 96, two, outage_budget_s=0.5, request_timeout_s=2)

    killer = when(lambda: len(slow.chat_prompts()) >= 6, slow.down)  # inside its first chunk
    manifest = batch_inference(overrides=settings)
    killer.join(timeout_s=5)
    results = pl.read_parquet(Path(settings["output_dir"]) / "results.parquet")
    assert manifest["complete"] and results["id"].n_unique() == results.height == 96
    assert results["status"].unique().to_list() == ["ok"]
    on_slow, on_fast = Counter(slow.chat_prompts()), Counter(fast.chat_prompts())
    # Killed mid-chunk, or just after it if its last requests beat the kill: either way its rows stay.
    assert 6 <= sum(on_slow.values()) < 96 and max(on_fast.values()) == 1
    assert not set(on_slow) & set(on_fast)  # rows the dead endpoint answered were not sent again
    assert sum(on_slow.values()) + sum(on_fast.values()) == 96
    # The dead endpoint's answered rows were sent by this run too: its energy per 1,000 rows divides by all 96.
    assert manifest["rows_sent"] == 96 and 0 < manifest["sending_s"] <= manifest["wall_s"]
    report = (Path(settings["output_dir"]) / "report.md").read_text()
    assert f"{slow.host} failed" in report and "retired for this run" in report


def test_endpoint_down_at_start_is_left_out(job: Any, two: tuple[OllamaEmulator, OllamaEmulator]) -> None:
    fast, slow = two
    slow.down()
    settings = _endpoint_job(job, 24, two)
    manifest = batch_inference(overrides=settings)
    assert manifest["complete"] and manifest["rows_ok"] == 24 and len(fast.chat_prompts()) == 24
    assert (
        f"left out at the start: cannot reach Ollama at {slow.host}"
        in (Path(settings["output_dir"]) / "report.md").read_text()
    )


def test_endpoint_settings_are_checked(job: Any, emulator: OllamaEmulator) -> None:
    base = job(4)
    twice = {**base, "ollama_host": None, "endpoints": [{"host": emulator.host}, {"host": emulator.host + "/"}]}
    with pytest.raises(SettingsError, match="endpoints: host .* is listed twice"):
        load_settings(None, twice)
    with pytest.raises(SettingsError, match="either ollama_host .* or endpoints"):
        load_settings(None, {**base, "endpoints": [{"host": "http://10.0.0.2:11434"}]})
    with pytest.raises(SettingsError, match="endpoints.0.gpu_limit"):
        load_settings(None, {**twice, "endpoints": [{"host": "h:1", "gpu_limit": "no spaces"}]})
    assert Endpoint(host="http://gpu-box-2:11435").limit_name == "gpu-gpu-box-2-11435"
    assert Endpoint(host="http://127.0.0.1:11434", gpu_limit="gpu0").limit_name == "gpu0"
