"""The Parquet ledger: checkpoints, chunk files, consolidation, the output-directory claim."""

from __future__ import annotations

import json
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from tasks.plan.dataset import ChunkSpec
from tasks.schema import ResultRow
from tasks.storage.files import file_fingerprint
from tasks.storage.journal import (
    ChunkWriter,
    check_chunk_files,
    chunk_path,
    clean_finished_parts,
    finished_rows,
    journal_paths,
    part_paths,
)
from tasks.storage.outdir import OutputDirError, claim_output_dir, join_output_dir
from tasks.storage.results import consolidate, counts, error_kinds


def row(i: int, chunk: int = 0, status: str = "ok") -> ResultRow:
    return ResultRow(
        row_index=i,
        id=f"r{i}",
        chunk=chunk,
        status=status,
        attempts=1,
        response=f"answer {i}",
        model="m",
        finished_at=datetime.now(UTC),
        error_kind=None if status == "ok" else "bad_request",
        completion_tokens=10 + i if status == "ok" else None,
    )


# The first writer is dropped unclosed on purpose (a killed run): its journal's ResourceWarning is expected.
@pytest.mark.filterwarnings("ignore::ResourceWarning", "ignore::pytest.PytestUnraisableExceptionWarning")
def test_checkpoints_then_chunk_file(tmp_path: Path) -> None:
    chunk = ChunkSpec(index=0, offset=0, length=5)
    writer = ChunkWriter(tmp_path, chunk, {}, checkpoint_rows=2, checkpoint_every_s=3600)
    assert writer.add(row(3)) is False
    assert writer.add(row(1)) is True  # two rows buffered: a checkpoint is due
    writer.write_part(*writer.take())
    assert finished_rows(tmp_path, chunk) == {1, 3}
    # A new writer (a resumed run) continues the part numbering instead of overwriting.
    writer = ChunkWriter(tmp_path, chunk, {}, checkpoint_rows=2, checkpoint_every_s=3600)
    for i in (0, 2, 4):
        writer.add(row(i))
    frame = writer.finish()
    assert frame["row_index"].to_list() == [0, 1, 2, 3, 4]
    assert part_paths(tmp_path, chunk) == [] and chunk_path(tmp_path, chunk).exists()
    assert finished_rows(tmp_path, chunk) == {0, 1, 2, 3, 4}
    assert not list(tmp_path.rglob("*.tmp"))  # atomic writes leave no temporary files


def test_journal_sync_runs_beside_checkpoints(tmp_path: Path) -> None:
    """sync() (fdatasync, in a thread) while checkpoints close and rotate journal segments: no error, no row lost."""
    chunk = ChunkSpec(index=0, offset=0, length=400)
    writer = ChunkWriter(tmp_path, chunk, {}, checkpoint_rows=7, checkpoint_every_s=3600)
    stop = threading.Event()
    errors: list[BaseException] = []

    def sync_forever() -> None:
        while not stop.is_set():
            try:
                writer.sync()
            except BaseException as exc:  # what an unguarded fdatasync on a closed segment would raise
                errors.append(exc)

    syncer = threading.Thread(target=sync_forever)
    syncer.start()
    for i in range(400):
        if writer.add(row(i)):
            writer.write_part(*writer.take())
    stop.set()
    syncer.join()
    writer.sync()
    assert errors == [] and writer.finish()["row_index"].to_list() == list(range(400))
    writer.sync()  # after close: nothing to sync, no error


def test_finish_refuses_missing_or_duplicated_rows(tmp_path: Path) -> None:
    chunk = ChunkSpec(index=1, offset=3, length=3)
    writer = ChunkWriter(tmp_path, chunk, {}, checkpoint_rows=100, checkpoint_every_s=3600)
    for i in (3, 4, 4):
        writer.add(row(i, chunk=1))
    with pytest.raises(RuntimeError, match=r"missing \[5\], duplicated \[4\]"):
        writer.finish()
    assert not chunk_path(tmp_path, chunk).exists()


def test_leftover_parts_after_a_crash_are_cleaned(tmp_path: Path) -> None:
    chunk = ChunkSpec(index=0, offset=0, length=1)
    writer = ChunkWriter(tmp_path, chunk, {}, checkpoint_rows=1, checkpoint_every_s=3600)
    writer.add(row(0))
    writer.finish()
    # Simulate a crash between writing the chunk file and deleting its parts.
    writer._write_rows([row(0)], 7)
    clean_finished_parts(tmp_path, chunk)
    assert part_paths(tmp_path, chunk) == []


def test_consolidate_in_input_order_and_complete(tmp_path: Path) -> None:
    chunks = [ChunkSpec(index=0, offset=0, length=2), ChunkSpec(index=1, offset=2, length=2)]
    for chunk in reversed(chunks):
        writer = ChunkWriter(tmp_path, chunk, {}, checkpoint_rows=100, checkpoint_every_s=3600)
        for i in reversed(range(chunk.offset, chunk.offset + chunk.length)):
            writer.add(row(i, chunk.index))
        writer.finish()
    results = pl.read_parquet(consolidate(tmp_path, chunks, 4))
    assert results["row_index"].to_list() == [0, 1, 2, 3]
    with pytest.raises(RuntimeError, match="has 4 rows"):
        consolidate(tmp_path, chunks, 5)
    chunk_path(tmp_path, chunks[1]).unlink()
    with pytest.raises(RuntimeError, match="1 chunk file"):
        consolidate(tmp_path, chunks, 4)


def test_claim_refuses_a_second_run_and_another_configuration(tmp_path: Path) -> None:
    with (
        claim_output_dir(tmp_path, "fp-1", {}),
        pytest.raises(OutputDirError, match="in use by another run"),
        claim_output_dir(tmp_path, "fp-1", {}),
    ):
        pass
    first = {"settings": {"model": "a", "options": {"num_predict": 64}, "in_flight": 1}}
    with claim_output_dir(tmp_path, "fp-1", first):  # released: same configuration may resume
        pass
    # No row on disk yet: the directory holds nothing to mix with, so another configuration may take it.
    second = {"settings": {"model": "a", "options": {"num_predict": 32}, "in_flight": 2}}
    with claim_output_dir(tmp_path, "fp-2", second):
        pass
    assert json.loads((tmp_path / "job.json").read_text())["fingerprint"] == "fp-2"
    (tmp_path / "chunks").mkdir()
    pl.DataFrame({"row_index": [0]}).write_parquet(tmp_path / "chunks" / "chunk-00000.part-00000.parquet")
    # Rows on disk: refused, naming the answer-changing setting that differs (not in_flight).
    with pytest.raises(OutputDirError) as refused, claim_output_dir(tmp_path, "fp-1", first):
        pass
    assert "(options.num_predict: 32 -> 64)" in str(refused.value)
    # A shard of another configuration: the one setting named, and no advice to delete every host's rows.
    with pytest.raises(OutputDirError) as shard, join_output_dir(tmp_path, "fp-1", first):
        pass
    said = str(shard.value)
    assert "(options.num_predict: 32 -> 64)" in said and "model" not in said and "delete" not in said, said
    assert said.endswith("start the job again from the parent")


# The first writer is dropped unclosed on purpose (a killed run): its journal's ResourceWarning is expected.
@pytest.mark.filterwarnings("ignore::ResourceWarning", "ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_killed_writer_loses_no_finished_row(tmp_path: Path) -> None:
    """Rows journaled but not checkpointed survive a kill; a line cut mid-write is redone."""
    chunk = ChunkSpec(index=2, offset=10, length=4)
    writer = ChunkWriter(tmp_path, chunk, {}, checkpoint_rows=1000, checkpoint_every_s=3600)
    writer.add(row(10, 2))
    writer.write_part(*writer.take())  # part 0
    writer.add(row(11, 2))
    writer.add(row(12, 2))  # journal segment 1 only: no checkpoint yet
    journal = next((tmp_path / "chunks").glob("*.journal-*.jsonl"))
    with journal.open("a") as handle:
        handle.write('{"row_index": 13, "id": "r1')  # the kill cut this line short
    del writer  # the process dies: no close, no finish
    assert finished_rows(tmp_path, chunk) == {10, 11, 12}
    resumed = ChunkWriter(tmp_path, chunk, {}, checkpoint_rows=1000, checkpoint_every_s=3600)
    assert [p.name for p in part_paths(tmp_path, chunk)] == [
        "chunk-00002.part-00000.parquet",
        "chunk-00002.part-00001.parquet",
    ]
    resumed.add(row(13, 2))
    frame = resumed.finish()
    assert frame["row_index"].to_list() == [10, 11, 12, 13]
    assert sorted(p.name for p in (tmp_path / "chunks").iterdir()) == ["chunk-00002.parquet", "finished.jsonl"]


@pytest.mark.filterwarnings("ignore::ResourceWarning", "ignore::pytest.PytestUnraisableExceptionWarning")
def test_error_rows_by_kind_count_journaled_rows_as_the_row_counts_do(tmp_path: Path) -> None:
    """A stopped chunk's error rows, in a checkpoint part and in its journal: the report's "errors by kind"
    adds up to the manifest's rows_error (the journal's were left out)."""
    chunk = ChunkSpec(index=0, offset=0, length=6)
    writer = ChunkWriter(tmp_path, chunk, {}, checkpoint_rows=1000, checkpoint_every_s=3600)
    writer.add(row(0, status="error"))
    writer.add(row(1))
    writer.write_part(*writer.take())
    writer.add(row(2, status="error"))  # journaled only: the run stopped before the next checkpoint
    writer.add(row(3))
    del writer
    assert counts(tmp_path, [chunk]) == {"ok": 2, "error": 2, "tokens": 11 + 13}  # a part's row, a journal's
    assert error_kinds(tmp_path, [chunk]) == {"bad_request": 2}


def _owned(out: Path, fingerprint: str = "fp-1") -> Path:
    out.mkdir(parents=True, exist_ok=True)
    (out / "job.json").write_text(json.dumps({"fingerprint": fingerprint}))
    return out


def _finished_chunk(out: Path, chunk: ChunkSpec) -> None:
    writer = ChunkWriter(out, chunk, {}, checkpoint_rows=100, checkpoint_every_s=3600)
    for i in range(chunk.offset, chunk.offset + chunk.length):
        writer.add(row(i, chunk.index))
    writer.finish()


def test_a_journal_line_cut_inside_a_utf8_character_is_skipped_and_counted(tmp_path: Path) -> None:
    out = _owned(tmp_path)
    chunk = ChunkSpec(index=0, offset=0, length=3)
    writer = ChunkWriter(out, chunk, {}, checkpoint_rows=1000, checkpoint_every_s=3600)
    writer.add(row(0))
    writer.close()
    journal = journal_paths(out, chunk)[0]
    cut = row(1).model_copy(update={"response": "café ✓"}).model_dump_json().encode()
    with journal.open("ab") as handle:
        handle.write(cut[: cut.index("✓".encode()) + 1])  # the kill landed inside the 3-byte character
    assert finished_rows(out, chunk) == {0}
    assert check_chunk_files(out, [chunk]) == [
        "chunk-00000.journal-00000.jsonl: 1 torn or unreadable line(s) skipped, 1 row(s) kept; "
        "the skipped rows are sent again"
    ]
    resumed = ChunkWriter(out, chunk, {}, checkpoint_rows=1000, checkpoint_every_s=3600)
    resumed.add(row(1))
    resumed.add(row(2))
    assert resumed.finish()["row_index"].to_list() == [0, 1, 2]


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_a_damaged_chunk_or_part_file_is_named_and_set_aside(tmp_path: Path, damage: str) -> None:
    out = _owned(tmp_path)
    chunks = [ChunkSpec(index=0, offset=0, length=2), ChunkSpec(index=1, offset=2, length=2)]
    _finished_chunk(out, chunks[0])
    writer = ChunkWriter(out, chunks[1], {}, checkpoint_rows=1, checkpoint_every_s=3600)
    writer.add(row(2, 1))
    writer.write_part(*writer.take())
    writer.close()
    for path in (chunk_path(out, chunks[0]), part_paths(out, chunks[1])[0]):
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"x" * len(data))
    said = check_chunk_files(out, chunks)
    assert said[0].startswith("chunk-00000.parquet cannot be read (")
    assert said[0].endswith("moved to set-aside/chunk-00000.parquet; its 2 rows are sent again")
    assert said[1].startswith("chunk-00001.part-00000.parquet cannot be read (")
    assert not chunk_path(out, chunks[0]).exists() and (out / "set-aside" / "chunk-00000.parquet").exists()
    assert finished_rows(out, chunks[0]) == set() and finished_rows(out, chunks[1]) == set()
    assert check_chunk_files(out, chunks) == []  # set aside once, not reported again


def test_a_deleted_chunk_file_is_named(tmp_path: Path) -> None:
    out = _owned(tmp_path)
    chunk = ChunkSpec(index=0, offset=0, length=2)
    _finished_chunk(out, chunk)
    assert check_chunk_files(out, [chunk]) == []
    chunk_path(out, chunk).unlink()
    assert check_chunk_files(out, [chunk]) == [
        "chunk-00000.parquet was written by an earlier run but is gone: its 2 rows are sent again"
    ]


def test_a_chunk_of_another_configuration_is_never_published(tmp_path: Path) -> None:
    out = _owned(tmp_path, "fp-old")
    chunks = [ChunkSpec(index=0, offset=0, length=2)]
    _finished_chunk(out, chunks[0])
    assert file_fingerprint(chunk_path(out, chunks[0])) == "fp-old"
    _owned(out, "fp-new")  # job.json deleted, another job claimed the directory
    with pytest.raises(RuntimeError, match="chunk-00000.parquet made under another configuration"):
        consolidate(out, chunks, 2)
    said = check_chunk_files(out, chunks)
    assert said == [
        "chunk-00000.parquet was made under another configuration (fingerprint fp-old, this job fp-new): "
        "moved to set-aside/chunk-00000.parquet; its 2 rows are sent again"
    ]


def test_refusal_says_when_only_the_input_changed(tmp_path: Path) -> None:
    settings = {"prompt_template": "{text}", "model": "m", "input_path": "in.csv"}
    with claim_output_dir(tmp_path, "fp-1", {"settings": settings, "input_digest": "aaaa"}):
        (tmp_path / "chunks").mkdir()
        (tmp_path / "chunks" / "chunk-00000.parquet").write_bytes(b"")  # a row on disk: the dir is owned
    with (
        pytest.raises(OutputDirError, match=r"other answer-changing settings \(contents of the input file in.csv\)"),
        claim_output_dir(tmp_path, "fp-2", {"settings": settings, "input_digest": "bbbb"}),
    ):
        pass
    with (
        pytest.raises(OutputDirError, match=r"other answer-changing settings \(model: 'm' -> 'n'\)"),
        claim_output_dir(tmp_path, "fp-3", {"settings": {**settings, "model": "n"}, "input_digest": "aaaa"}),
    ):
        pass


def test_a_scale_out_parent_adds_up_every_attempt_of_its_shard_runs() -> None:
    """A host that retried its batch wrote both attempts into one shard manifest: both count, and attempts
    of an earlier parent run do not. Energy adds up only when every attempt read the power."""
    from flows.scale_out import add_up_shards
    from tasks.storage.manifest import Attempt, Manifest

    def attempt(start: float, rows: int, wh: float | None) -> Attempt:
        return Attempt(
            started_at=start, finished_at=start + 1, wall_s=1, rows_sent=rows, complete=True, error=None, energy_wh=wh
        )

    retried = Manifest.model_construct(attempts=[attempt(5.0, 3, 1.0), attempt(50.0, 5, 2.0)])
    resumed = Manifest.model_construct(attempts=[attempt(1.0, 99, 9.0), attempt(10.0, 8, 1.0)])  # 1.0: an earlier run
    parent = Manifest.model_construct()
    add_up_shards(parent, [retried, resumed], since=2.0)
    assert (parent.rows_sent, parent.energy_wh, parent.wh_per_1000_rows) == (16, 4.0, 250.0)
    add_up_shards(parent, [retried, Manifest.model_construct(attempts=[attempt(10.0, 8, None)])], since=2.0)
    assert (parent.rows_sent, parent.energy_wh, parent.wh_per_1000_rows) == (16, None, None)


def test_the_scale_out_report_rates_each_host_on_its_shard_runs_last_attempt(offline_job: Any) -> None:
    """A shard run that retried keeps the last attempt's rows, tokens and sending time: a host's rates are
    theirs, not a rate over every attempt multiplied by the last one's seconds."""
    from tasks.analysis.report import render_scale_out_report
    from tasks.settings.model import JobSettings
    from tasks.storage.manifest import Manifest

    def shard(host: str, rows: int, tokens: int, secs: float, tokens_per_s: float) -> Manifest:
        return Manifest.model_construct(
            host=host, rows_sent=rows, tokens_sent=tokens, sending_s=secs, tokens_per_s=tokens_per_s, telemetry={}
        )

    settings = JobSettings.model_validate(offline_job(8))
    parent = Manifest.model_construct(
        complete=True, rows_ok=300, rows_error=0, rows_total=300, chunks=3, hosts=["a", "b"], wall_s=60.0
    )
    # b's run: a first attempt of 10 s at 100 tokens/s, then this one, 200 rows and 4,000 tokens in 20 s.
    shards = [shard("a", 100, 1_000, 10.0, 100.0), shard("b", 200, 4_000, 20.0, 166.7)]
    report = render_scale_out_report(settings, parent, shards, [])
    assert "| a | 1 | 100 | 10.00 | 100.0 |" in report
    assert "| b | 1 | 200 | 10.00 | 200.0 |" in report  # not 166.7
    assert "All hosts together: 20.00 requests/s" in report
