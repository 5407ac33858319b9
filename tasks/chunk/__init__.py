"""One chunk's run: the loop (`runner`), the retry policy (`policy`) and the in-flight search (`calibrate`)."""

from tasks.chunk.runner import ChunkAborted, ProgressCallback, finished_chunk_stats, run_chunk

__all__ = ["ChunkAborted", "ProgressCallback", "finished_chunk_stats", "run_chunk"]
