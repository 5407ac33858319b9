"""One chunk's run: the loop (`runner`), the retry policy (`policy`) and the in-flight search (`calibrate`)."""

from tasks.chunk.runner import ChunkAborted, ChunkInterrupted, ProgressCallback, finished_chunk_stats, run_chunk

__all__ = ["ChunkAborted", "ChunkInterrupted", "ProgressCallback", "finished_chunk_stats", "run_chunk"]
