"""The whole flow under a real (temporary) Prefect API with the Ollama emulator as the backend."""

from __future__ import annotations

import json
import re
import threading
import time
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

from flows.batch_inference import batch_inference
from harness.ollama_emulator import Fault, OllamaEmulator, answer_for
from tasks.plan.dataset import InputError
from tasks.storage.outdir import OutputDirError
from tests.conftest import make_rows, when, write_input

pytestmark = pytest.mark.usefixtures("prefect_server")

CONTENT = [
    "row_index",
    "id",
    "chunk",
    "status",
    "error_kind",
    "attempts",
    "response",
    "prompt_tokens",
    "completion_tokens",
]


def artifacts_of(state: Any) -> dict[str, Any]:
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id]))
        )
    return {a.key: a for a in found}


def test_every_row_once_with_artifacts(job: Any, emulator: OllamaEmulator) -> None:
    settings = job(20, name="flowtest")
    state = batch_inference(overrides=settings, return_state=True)
    manifest = state.result()
    results = pl.read_parquet(Path(settings["output_dir"]) / "results.parquet")
    assert results["row_index"].to_list() == list(range(20)) and results["id"].n_unique() == 20
    expected = [
        answer_for([{"role": "user", "content": f"Role: data engineer\nCandidate: candidate {i} writes Python"}])
        for i in range(20)
    ]
    assert results["response"].to_list() == expected
    assert manifest["complete"] and (manifest["rows_ok"], manifest["rows_error"]) == (20, 0)
    on_disk = json.loads((Path(settings["output_dir"]) / "manifest.json").read_text())
    assert on_disk["fingerprint"] == manifest["fingerprint"] and on_disk["versions"]["prefect"]
    artifacts = artifacts_of(state)
    assert set(artifacts) >= {"flowtest-progress", "flowtest-chunks", "flowtest-report"}
    assert artifacts["flowtest-progress"].data == 100.0
    table = json.loads(artifacts["flowtest-chunks"].data)
    assert [row["chunk"] for row in table] == [0, 1, 2] and [row["rows"] for row in table] == [8, 8, 4]
    report = artifacts["flowtest-report"].data
    assert "### Bottleneck:" in report and "ETA for the 170,000-row production job" in report
    assert "data:image/png;base64," in report  # the timeline chart travels inside the artifact
    # No GPU here: the energy figures are null in the manifest and the report says why.
    assert (on_disk["energy_wh"], on_disk["wh_per_1000_rows"]) == (None, None)
    assert "| GPU energy (this run, all GPUs NVML sees) | no GPU power reading |" in report
    assert (Path(settings["output_dir"]) / "report.md").read_text().startswith("# Run report: flowtest")
    assert (Path(settings["output_dir"]) / "telemetry" / "samples.parquet").exists()


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        ({"frame": make_rows(5).drop("text")}, InputError, "prompt_template uses 'text' which is not a column"),
        ({"frame": make_rows(5).with_columns(id=pl.lit("same"))}, InputError, "duplicate ids in 'id'"),
        ({"overrides": {"output_schema": "no_such_module:Model"}}, ValueError, "cannot be imported"),
    ],
)
def test_bad_input_fails_before_any_request(
    job: Any, emulator: OllamaEmulator, change: dict, error: type, message: str
) -> None:
    settings = job(frame=change.get("frame"), **change.get("overrides", {}))
    with pytest.raises(error, match=message):
        batch_inference(overrides=settings)
    assert emulator.requests == []


def test_gpu_limit_is_created_and_no_two_chunks_overlap(job: Any, emulator: OllamaEmulator, tmp_path: Path) -> None:
    """Two jobs at once on a limit that did not exist: their chunks must take turns on the GPU."""
    emulator.latency_s = 0.03
    limit = f"gpu-{tmp_path.name[-20:].lower().replace('_', '-')}"
    with get_client(sync_client=True) as client:
        assert limit not in [gcl.name for gcl in client.read_global_concurrency_limits()]
    jobs = []
    for label in ("A", "B"):
        data = write_input(tmp_path / f"{label}.parquet", make_rows(16).with_columns(role=pl.lit(f"job {label}")))
        jobs.append(
            job(
                input_path=str(data),
                output_dir=str(tmp_path / f"out-{label}"),
                gpu_limit=limit,
                name=f"job-{label.lower()}",
            )
        )
    errors: list[BaseException] = []
    ran: dict[str, tuple[float, float]] = {}

    def run(settings: dict[str, Any]) -> None:
        started = time.monotonic()
        try:
            batch_inference(overrides=settings)
        except BaseException as exc:  # surfaced by the assertion below
            errors.append(exc)
        ran[settings["name"]] = (started, time.monotonic())

    threads = [threading.Thread(target=run, args=(s,)) for s in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors
    spans: dict[tuple[str, int], list[float]] = {}
    for r in emulator.requests:
        if r.path == "/api/chat":
            label = r.prompt.split("Role: job ")[1][0]
            index = int(r.prompt.split("candidate ")[1].split()[0])
            span = spans.setdefault((label, index // 8), [r.t_start, r.t_end])
            span[0], span[1] = min(span[0], r.t_start), max(span[1], r.t_end)
    assert {label for label, _ in spans} == {"A", "B"} and len(spans) == 4
    (a_start, a_end), (b_start, b_end) = ran.values()
    assert a_start < b_end and b_start < a_end, "the two flow runs were not live at the same time"
    with get_client(sync_client=True) as client:
        assert client.read_global_concurrency_limit_by_name(limit).limit == 1
    ordered = sorted(spans.values())
    assert all(a[1] <= b[0] for a, b in zip(ordered, ordered[1:], strict=False)), f"chunks overlapped: {spans}"


def test_resume_after_a_failed_run_matches_an_uninterrupted_run(
    job: Any, emulator: OllamaEmulator, tmp_path: Path
) -> None:
    emulator.latency_s = 0.02
    reference = job(30, output_dir=str(tmp_path / "reference"), in_flight=2)
    batch_inference(overrides=reference)
    emulator.reset_stats()
    settings = job(30, output_dir=str(tmp_path / "resumed"), in_flight=2, outage_budget_s=0.3)

    # Down once the second chunk has begun: by progress, not by the clock (a busy machine starts slower).
    outage = when(lambda: len(emulator.chat_prompts()) >= 10, emulator.down)
    with pytest.raises(Exception, match="cannot reach Ollama"):
        batch_inference(overrides=settings)
    outage.join()
    manifest = json.loads((tmp_path / "resumed" / "manifest.json").read_text())
    assert manifest["complete"] is False and not (tmp_path / "resumed" / "results.parquet").exists()
    assert 8 <= manifest["rows_ok"] < 30  # the first chunk finished before the outage
    emulator.up()
    batch_inference(overrides=settings)
    ours = pl.read_parquet(tmp_path / "resumed" / "results.parquet").select(CONTENT)
    theirs = pl.read_parquet(tmp_path / "reference" / "results.parquet").select(CONTENT)
    assert ours.equals(theirs)
    answered = Counter(r.prompt for r in emulator.requests if r.path == "/api/chat" and r.status == 200)
    assert len(answered) == 30 and set(answered.values()) == {1}  # no finished row sent twice


def test_dated_output_dir_for_nightly_runs(job: Any, emulator: OllamaEmulator, tmp_path: Path) -> None:
    manifest = batch_inference(overrides=job(3, output_dir=str(tmp_path / "nightly" / "{date}")))
    (day,) = [p.name for p in (tmp_path / "nightly").iterdir()]
    assert manifest["results"] == str(tmp_path / "nightly" / day / "results.parquet")
    assert day == datetime.now().astimezone().date().isoformat()  # the run's scheduled (local) date


def test_changed_settings_cannot_reuse_an_output_dir(job: Any, emulator: OllamaEmulator) -> None:
    settings = job(4)
    batch_inference(overrides=settings)
    with pytest.raises(OutputDirError, match=r"answer-changing settings \(options.num_predict: 64 -> 65\)"):
        batch_inference(overrides={**settings, "options": {"num_ctx": 2048, "num_predict": 65}})
    batch_inference(overrides={**settings, "in_flight": 1})  # plumbing changes are fine: nothing resent
    assert len([r for r in emulator.requests if r.path == "/api/chat"]) == 4
    # Another input is refused too, and its copy (pinned while planning) does not stay in the directory.
    pinned = list(Path(settings["output_dir"]).glob("input-*.parquet"))
    with pytest.raises(OutputDirError, match=r"contents of the input file"):
        batch_inference(overrides=job(5))
    assert list(Path(settings["output_dir"]).glob("input-*.parquet")) == pinned and len(pinned) == 1


def test_report_shows_an_out_of_memory_recovery(job: Any, emulator: OllamaEmulator) -> None:
    emulator.inject(Fault.oom(), times=2, match="candidate 3 writes")
    settings = job(8, name="oomtest", in_flight=4, oom_backoff_s=0.05)
    state = batch_inference(overrides=settings, return_state=True)
    report = artifacts_of(state)["oomtest-report"].data
    assert "### Recoveries and back-offs" in report
    # One line per kind, with its count and its first and last event; every event in the manifest.
    (line,) = [row for row in report.splitlines() if row.startswith("| out of memory, in-flight lowered to N")]
    assert "| 2 |" in line and "in-flight lowered to 2" in line and "in-flight lowered to 1" in line
    manifest = json.loads((Path(settings["output_dir"]) / "manifest.json").read_text())
    assert sum("out of memory, in-flight lowered" in e for e in manifest["recoveries"]) == 2


def test_lowered_num_ctx_carries_over_to_later_chunks(job: Any) -> None:
    with OllamaEmulator(models=["gemma3:12b"], parallel=4, vram_bytes=12 * 10**9) as emu:  # 4 x 8k does not fit
        settings = job(16, name="ctxtest", ollama_host=emu.host, oom_backoff_s=0.01, oom_num_ctx_floor=2048)
        settings["options"] = {"num_ctx": 8192, "num_predict": 64}
        state = batch_inference(overrides=settings, return_state=True)
        chunk1 = re.compile(r"candidate (8|9|1[0-5]) writes")
        second = [r.body["options"]["num_ctx"] for r in emu.requests if r.prompt and chunk1.search(r.prompt)]
    assert state.result()["rows_ok"] == 16
    assert second == [4096] * 8  # chunk 1 (rows 8-15) started at 4096: no out-of-memory round again
    artifacts = artifacts_of(state)
    assert [r["num_ctx"] for r in json.loads(artifacts["ctxtest-chunks"].data)] == [4096, 4096]
    assert "num_ctx 8192 -> 4096 (the model reloads" in artifacts["ctxtest-report"].data


def test_auto_in_flight_lives_across_chunks_is_remembered_and_reported(
    job: Any, emulator: OllamaEmulator, tmp_path: Path
) -> None:
    emulator.per_token_s = 0.002
    state = batch_inference(overrides=job(600, name="autotest", chunk_size=300, in_flight="auto"), return_state=True)
    first, second = state.result()["chunk_stats"]
    assert second["auto"]["rows"] == first["auto"]["rows"] + 300  # chunk 1 carried on with chunk 0's controller
    assert second["auto"]["settled"] and second["in_flight"] == second["auto"]["level"]
    artifacts = artifacts_of(state)
    report = artifacts["autotest-report"].data
    assert "### In-flight calibration (auto)" in report and "(chosen by auto)" in report
    assert "auto in-flight: " in report  # the level changes are in the report's events
    # The next run of the job (a nightly one writes a new dated directory) starts at the level kept.
    memory = json.loads((tmp_path / "in-flight-auto.json").read_text())
    assert [entry["level"] for entry in memory.values()] == [second["in_flight"]]
    again = batch_inference(
        overrides=job(40, name="autotest", chunk_size=40, in_flight="auto", output_dir=str(tmp_path / "out2"))
    )
    (only,) = again["chunk_stats"]
    assert only["auto"]["settled"] and only["auto"]["search_rows"] is None  # watching at once, no search
    # It measured fewer levels than the first run's search: the others keep the first run's readings.
    searched = {str(n) for n in second["calibration"]}
    (entry,) = json.loads((tmp_path / "in-flight-auto.json").read_text()).values()
    assert searched <= set(entry["curve"]) and len(searched) > len(only["calibration"] or {})
    assert only["auto"]["ceiling"] >= second["in_flight"]
