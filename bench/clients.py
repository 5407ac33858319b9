"""The in-run baselines that are other clients: the least a program can do against the same server or model.

`naive` is the users' current approach (ollama.Client, one request at a time), `bare_client` the least a
pipeline can do (ollama.AsyncClient.chat from N asyncio workers, nothing else), `bare_llama` a bare
llama-cpp-python loop. Each runs in a fresh process (`Bench.run_helper`: `python -m bench.benchmark --MODE
SPEC OUT`), as a flow does, so none of them shares an interpreter with the emulator.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from bench.common import MODEL, OPTIONS, TEMPLATE

BARE_ROWS = 5000  # rows the bare-client baseline sends (one chunk's worth)


def client_spec(host: str, texts: list[str]) -> dict[str, Any]:
    return {"host": host, "model": MODEL, "texts": texts, "template": TEMPLATE, "options": OPTIONS}


def bare_client(spec: dict[str, Any]) -> dict[str, Any]:
    """The least a pipeline can do: ollama.AsyncClient.chat from `in_flight` asyncio workers, nothing else."""
    import asyncio

    import httpx
    import ollama

    async def run() -> float:
        client = ollama.AsyncClient(host=spec["host"], timeout=httpx.Timeout(300.0))
        queue: asyncio.Queue[str] = asyncio.Queue()
        for text in spec["texts"]:
            queue.put_nowait(text)

        async def worker() -> None:
            while not queue.empty():
                text = queue.get_nowait()
                await client.chat(
                    model=spec["model"],
                    messages=[{"role": "user", "content": spec["template"].format(text=text)}],
                    options=spec["options"],
                    keep_alive=-1,
                    stream=False,
                )

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(spec["in_flight"])))
        return time.perf_counter() - started

    return {"rows": len(spec["texts"]), "seconds": asyncio.run(run())}


def naive(spec: dict[str, Any]) -> dict[str, Any]:
    """The users' current approach: the ollama client, one request at a time."""
    import httpx
    import ollama

    client = ollama.Client(host=spec["host"], timeout=httpx.Timeout(300.0))
    started = time.perf_counter()
    answers = []
    for text in spec["texts"]:
        resp = client.chat(
            model=spec["model"],
            messages=[{"role": "user", "content": spec["template"].format(text=text)}],
            options=spec["options"],
            keep_alive=-1,
            stream=False,
        )
        answers.append(resp.message.content)
    return {"rows": len(answers), "seconds": time.perf_counter() - started}


def bare_llama(spec: dict[str, Any]) -> dict[str, Any]:
    """A bare llama-cpp-python loop with the embedded backend's constructor arguments."""
    from llama_cpp import Llama

    started = time.perf_counter()
    llm = Llama(
        model_path=spec["model_path"],
        n_ctx=spec["n_ctx"],
        n_threads=os.cpu_count() or 1,
        n_gpu_layers=-1,
        verbose=False,
    )
    if not llm.metadata.get("tokenizer.chat_template") and llm.metadata.get("general.architecture", "").startswith(
        "gemma"
    ):
        llm.chat_format = "gemma"  # as tasks/inference/backends/llamacpp.py does for a GGUF without a template
    load_s = time.perf_counter() - started
    opts = spec["options"]
    tokens, contents = 0, []
    started = time.perf_counter()
    for messages in spec["messages"]:
        out = llm.create_chat_completion(
            messages=messages,
            max_tokens=opts["num_predict"],
            temperature=opts["temperature"],
            seed=opts["seed"],
            top_k=40,
            top_p=0.95,
        )
        tokens += out["usage"]["completion_tokens"]
        contents.append(out["choices"][0]["message"].get("content") or "")
    seconds = time.perf_counter() - started
    llm.close()
    return {"tokens": tokens, "seconds": seconds, "load_s": load_s, "contents": contents}


CLIENTS = {"naive": naive, "bare-client": bare_client, "bare-llama": bare_llama}


def run_client(mode: str, spec_path: Path, out_path: Path) -> None:
    """Run the client `mode` on the JSON spec at `spec_path`; write its JSON answer to `out_path`."""
    out_path.write_text(json.dumps(CLIENTS[mode](json.loads(spec_path.read_text()))))
