"""A real-HTTP Ollama emulator for the test-suite and benchmarks.

It speaks the part of Ollama's REST API the pipeline uses, with Ollama's JSON shapes and
error texts, so the real `ollama` client runs end to end: its error
mapping, timeouts and connection pooling are part of what the tests exercise.

Semantics a test can rely on:
- Answers are pure functions of the prompt: `answer_for` / `completion_for`.
- Capacity: `parallel` slots; at most `parallel + max_queue` requests admitted, the next
  one gets Ollama's 503 "server busy". Service time in a slot =
  load (first use, num_ctx change, after expiry) + latency_s + eval_count * per_token_s.
- A client that disconnects (e.g. timed out) frees its slot or queue place, as in Ollama.
- `stream: true` is answered as NDJSON (word chunks, then the done line) in one body.
- Faults apply to /api/chat and /api/generate only, load requests (no prompt) included,
  as Ollama can run out of memory while loading; use `match=` to target rows. They are
  taken on arrival, before queueing (a hung request holds no slot); `invalid_json` and
  `lone_surrogate` are served normally, with broken content. The malformed answers
  (`empty_body`, `html`, `error_200`, `no_message`, `wrong_types`) are a 200 whose body is no answer, as a
  proxy in front of Ollama or a broken server sends one, on /v1 in its OpenAI shape.
- `vram_bytes`: a request whose model load would need more (weights + KV cache for num_ctx x
  `parallel` slots, as Ollama allocates it) fails with Ollama's out-of-memory 500.
- `think: true` -> 400 "... does not support thinking" (emulated models are gemma3-like).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import random
import re
import select
import socket
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

VERSION = "0.12.6"
DEFAULT_NUM_CTX = 4096
MODEL_SIZE = 8_149_190_253  # gemma3:12b Q4_K_M as /api/tags lists it
KV_BYTES_PER_TOKEN = 196_608  # ~0.75 GiB of KV cache per 4k-token slot
BUSY = "server busy, please try again.  maximum pending requests exceeded"
OOM = "llama runner process has terminated: cudaMalloc failed: out of memory"
CRASH = (
    "model runner has unexpectedly stopped, this may be due to resource limitations or an "
    "internal error, check ollama server logs for details"
)
INFER_PATHS = ("/api/chat", "/api/generate")
PROXY_PAGE = "<html><head><title>502 Bad Gateway</title></head><body><center><h1>502 Bad Gateway</h1></center><hr><center>nginx</center></body></html>\n"
METRICS = (
    "total_duration",
    "load_duration",
    "prompt_eval_count",
    "prompt_eval_duration",
    "eval_count",
    "eval_duration",
)
Prompt = str | Sequence[Mapping[str, Any]]
Format = str | Mapping[str, Any] | None


# ---------------------------------------------------------------- deterministic answers
def prompt_text(messages_or_prompt: Prompt) -> str:
    """The text a request is keyed on: a generate prompt, or 'role: content' lines."""
    if isinstance(messages_or_prompt, str):
        return messages_or_prompt
    return "\n".join(f"{m.get('role', '')}: {m.get('content') or ''}" for m in messages_or_prompt)


def count_tokens(text: str) -> int:
    return len(text) // 4 + 1


def _hash(*parts: str) -> int:
    return int.from_bytes(hashlib.sha256("\x00".join(parts).encode()).digest()[:8], "big")


def _value(schema: Mapping[str, Any], root: Mapping[str, Any], seed: str, path: str) -> Any:
    """A hash-derived value that conforms to `schema` (the subset pydantic emits)."""
    if "$ref" in schema:  # pydantic puts nested models under $defs
        schema = root.get("$defs", root.get("definitions", {}))[schema["$ref"].rsplit("/", 1)[-1]]
    n = _hash(seed, path)
    if "enum" in schema:
        return schema["enum"][n % len(schema["enum"])]
    if "const" in schema:
        return schema["const"]
    for key in ("anyOf", "oneOf", "allOf"):
        if schema.get(key):  # Optional[X] is anyOf [X, null]: X comes first
            return _value(schema[key][0], root, seed, path)
    typ = schema.get("type", "object" if "properties" in schema else "string")
    if isinstance(typ, list):
        typ = next((t for t in typ if t != "null"), "null")
    if typ == "object":
        props = schema.get("properties", {})
        return {k: _value(v, root, seed, f"{path}.{k}") for k, v in props.items()}
    if typ == "array":
        count = min(max(schema.get("minItems", 1), 1), schema.get("maxItems", 1 << 30))
        return [_value(schema.get("items", {}), root, seed, f"{path}[{i}]") for i in range(count)]
    if typ == "integer":
        lo = (
            math.ceil(schema["minimum"])
            if "minimum" in schema
            else (math.floor(schema["exclusiveMinimum"]) + 1 if "exclusiveMinimum" in schema else 0)
        )
        hi = (
            math.floor(schema["maximum"])
            if "maximum" in schema
            else (math.ceil(schema["exclusiveMaximum"]) - 1 if "exclusiveMaximum" in schema else lo + 100)
        )
        return lo + n % (max(hi, lo) - lo + 1)
    if typ == "number":
        lo = schema.get("minimum", schema.get("exclusiveMinimum", 0.0))
        hi = schema.get("maximum", schema.get("exclusiveMaximum", lo + 100.0))
        return lo + (hi - lo) * ((n % 9999) + 1) / 10000  # strictly inside (lo, hi)
    if typ == "boolean":
        return n % 2 == 0
    if typ == "null":
        return None
    text = f"v{n % 16**8:08x}".ljust(schema.get("minLength", 0), "x")
    return text[: schema.get("maxLength", len(text))]


def answer_for(messages_or_prompt: Prompt, fmt: Format = None) -> str:
    """The full (uncut) answer the emulator gives for this prompt and `format`."""
    text = prompt_text(messages_or_prompt)
    digest = hashlib.sha256(text.encode()).hexdigest()
    if isinstance(fmt, Mapping):
        return json.dumps(_value(fmt, fmt, digest, "$"))
    if fmt == "json":
        return json.dumps({"answer": digest[:8]})
    if isinstance(messages_or_prompt, str):
        last = messages_or_prompt
    else:
        users = [m.get("content") or "" for m in messages_or_prompt if m.get("role") == "user"]
        last = users[-1] if users else ""
    return f"echo {digest[:8]}: {last[:40]}"


@dataclass(frozen=True)
class Completion:
    content: str
    prompt_eval_count: int
    eval_count: int
    done_reason: str  # "stop" | "length"
    truncated: bool  # prompt > num_ctx: Ollama front-truncates it silently, still 200


def completion_for(
    messages_or_prompt: Prompt, fmt: Format = None, options: Mapping[str, Any] | None = None
) -> Completion:
    """What a successful request returns: answer_for() cut to num_predict, and the counts."""
    options = options or {}
    num_ctx = int(options.get("num_ctx") or DEFAULT_NUM_CTX)
    prompt_tokens = count_tokens(prompt_text(messages_or_prompt))
    answer = answer_for(messages_or_prompt, fmt)
    eval_count, reason = count_tokens(answer), "stop"
    num_predict = options.get("num_predict")
    if num_predict is not None and 0 <= int(num_predict) < eval_count:  # negative: unlimited
        answer, eval_count, reason = answer[: int(num_predict) * 4], int(num_predict), "length"
    return Completion(answer, min(prompt_tokens, num_ctx), eval_count, reason, prompt_tokens > num_ctx)


def _native_request(body: dict[str, Any]) -> dict[str, Any]:
    """Ollama's OpenAI compatibility (/v1/chat/completions): the request as /api/chat sees it."""
    options = {
        k: body[o]
        for o, k in (("max_tokens", "num_predict"), ("temperature", "temperature"), ("seed", "seed"))
        if body.get(o) is not None
    }
    fmt = body.get("response_format") or {}
    schema = (fmt.get("json_schema") or {}).get("schema") if fmt.get("type") == "json_schema" else None
    return {
        "model": body.get("model"),
        "messages": body.get("messages") or [],
        "format": schema or ("json" if fmt.get("type") == "json_object" else None),
        "options": options,
        "stream": False,
    }


def _openai_shape(status: int, obj: Any) -> Any:
    """A native /api/chat answer or error in the shape Ollama's /v1 sends."""
    if status >= 400:
        return {"error": {"message": obj.get("error", ""), "type": "api_error", "param": None, "code": None}}
    prompt, completion = obj.get("prompt_eval_count", 0), obj.get("eval_count", 0)
    return {
        "id": f"chatcmpl-{_hash(json.dumps(obj)) % 10**6}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": obj["model"],
        "choices": [{"index": 0, "message": obj["message"], "finish_reason": obj.get("done_reason", "stop")}],
        "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion},
    }


# ---------------------------------------------------------------- faults and records
@dataclass(frozen=True)
class Fault:
    name: str  # recorded in RequestRecord.fault; "drop" / "hang" / "invalid_json" are special
    status: int = 0  # > 0: answer with this HTTP status and {"error": error}
    error: str = ""

    @staticmethod
    def http(status: int, error: str, name: str = "http") -> Fault:
        return Fault(name, status, error)

    @staticmethod
    def oom() -> Fault:
        return Fault("oom", 500, OOM)

    @staticmethod
    def runner_crash() -> Fault:
        return Fault("runner_crash", 500, CRASH)

    @staticmethod
    def busy() -> Fault:
        return Fault("busy", 503, BUSY)

    @staticmethod
    def bad_request(error: str = "invalid request") -> Fault:
        return Fault("bad_request", 400, error)

    @staticmethod
    def not_found(model: str) -> Fault:
        return Fault("not_found", 404, f"model '{model}' not found")

    @staticmethod
    def drop() -> Fault:  # the client sees httpx.RemoteProtocolError
        return Fault("drop")

    @staticmethod
    def hang() -> Fault:  # no answer until release_hangs()/stop(); then the connection drops
        return Fault("hang")

    @staticmethod
    def invalid_json() -> Fault:  # 200, content is truncated JSON with a wrong-typed value
        return Fault("invalid_json")

    @staticmethod
    def empty_body() -> Fault:  # 200 with no body at all
        return Fault("empty_body")

    @staticmethod
    def html() -> Fault:  # 200 with a proxy's HTML error page (PROXY_PAGE)
        return Fault("html")

    @staticmethod
    def error_200(error: str = "upstream model runner failed") -> Fault:  # 200 with an error object
        return Fault("error_200", error=error)

    @staticmethod
    def no_message() -> Fault:  # 200, a done answer without its message (on /v1: a choice without one)
        return Fault("no_message")

    @staticmethod
    def wrong_types() -> Fault:  # 200, an answer whose fields have the wrong types (a finish reason of 1)
        return Fault("wrong_types")

    @staticmethod
    def lone_surrogate() -> Fault:  # 200, the answer ends in half an emoji: the JSON escape "\ud83d" alone
        return Fault("lone_surrogate")


MALFORMED = (
    "empty_body",
    "html",
    "error_200",
    "no_message",
    "wrong_types",
)  # faults answered at once with a 200 that is no answer


@dataclass
class RequestRecord:
    method: str
    path: str
    t_start: float  # time.monotonic()
    body: Any = None
    prompt: str | None = None  # prompt_text() of /api/chat and /api/generate requests
    t_end: float | None = None
    status: int | None = None  # None: no answer (drop, hang, cut by down()/stop())
    fault: str | None = None


def _now_iso(delta_s: float = 0.0) -> str:
    return (datetime.now(UTC) + timedelta(seconds=delta_s)).isoformat().replace("+00:00", "Z")


def _ns(seconds: float) -> int:
    return max(int(seconds * 1e9), 1000)  # Ollama omits zero metrics; keep rates computable


def _keep_alive_s(value: Any) -> float | None:
    """Seconds to stay loaded; None = forever. Numbers are seconds, strings Go durations."""
    if value is None:
        return 300.0
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        units = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, "": 1.0}
        parts = re.findall(r"(-?[\d.]+)(ns|us|µs|ms|s|m|h|)", str(value))
        seconds = sum(float(n) * units[u] for n, u in parts) if parts else 300.0
    return None if seconds < 0 else seconds


def _norm(model: str) -> str:
    return model if ":" in model else f"{model}:latest"


# ---------------------------------------------------------------- HTTP plumbing
class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024  # the default backlog of 5 stalls benchmarks with many clients
    emu: OllamaEmulator


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as httpx pools connections
    disable_nagle_algorithm = True  # headers and body go out in two writes: avoid 40 ms stalls
    server: _Server

    def setup(self) -> None:
        super().setup()
        self.server.emu._track(self.connection, add=True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.emu._track(self.connection, add=False)

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self.server.emu._handle(self)

    do_POST = do_HEAD = do_DELETE = do_GET

    def send(self, status: int, body: bytes, ctype: str = "application/json; charset=utf-8") -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def client_gone(self) -> bool:
        """True once the client closed its end (e.g. it timed out), as Ollama notices."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True


# ---------------------------------------------------------------- the emulator
class OllamaEmulator:
    def __init__(
        self,
        models: Sequence[str] = ("gemma3:12b",),
        *,
        parallel: int = 1,
        max_queue: int = 512,
        latency_s: float = 0.0,
        per_token_s: float = 0.0,
        load_s: float = 0.0,
        spill_fraction: float = 0.0,
        vram_bytes: int | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.models = [_norm(m) for m in models]
        self.parallel, self.max_queue = parallel, max_queue
        self.latency_s, self.per_token_s, self.load_s = latency_s, per_token_s, load_s
        self.spill_fraction = spill_fraction  # share of the model in CPU RAM, seen in /api/ps
        self.vram_bytes = vram_bytes
        self.bind_host, self.port = host, port
        self.in_flight = self.pending = self.peak_in_flight = self.peak_pending = 0
        self._lock = threading.Lock()
        self._slots = threading.Semaphore(parallel)
        self._records: list[RequestRecord] = []
        self._faults: list[list[Any]] = []  # [fault, times left or None, match]
        self._rng: random.Random | None = None
        self._random_rate, self._random_kinds = 0.0, [Fault.oom()]
        self._loaded: dict[str, tuple[int, float | None]] = {}  # model -> num_ctx, expiry
        self._conns: set[socket.socket] = set()
        self._active = 0  # handler calls running, so stop() can wait for them
        self._server: _Server | None = None
        self._cut = threading.Event()  # set by down()/stop(); captured per request
        self._release = threading.Event()  # set by release_hangs(); captured per hang
        # /api/show's answer, the backend check: Fault.hang() (a wedged server, until release_hangs() or the
        # client goes), a malformed one, or an HTTP error.
        self.show_fault: Fault | None = None

    # -- lifecycle
    @property
    def host(self) -> str:
        return f"http://{self.bind_host}:{self.port}"

    def start(self) -> OllamaEmulator:
        server = _Server((self.bind_host, self.port), _Handler)
        server.emu = self
        self.port = server.server_address[1]  # keep it: up() must come back on the same port
        self._server, self._cut = server, threading.Event()
        threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, name=f"ollama-emu:{self.port}", daemon=True
        ).start()
        return self

    def stop(self) -> None:
        """Stop listening, cut every connection and wake hung requests; returns in ~1 s max."""
        server, self._server = self._server, None
        self._cut.set()
        self._release.set()
        if server is not None:
            server.shutdown()
            server.server_close()
        with self._lock:
            conns = list(self._conns)
        for conn in conns:  # idle keep-alive and in-flight connections alike, like a crash
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        deadline = time.monotonic() + 1.0
        while self._active and time.monotonic() < deadline:
            time.sleep(0.01)
        self._release = threading.Event()

    def down(self) -> None:
        """Simulate Ollama dying: in-flight requests are cut, new ones are refused."""
        self.stop()
        with self._lock:
            self._loaded.clear()

    def up(self) -> None:
        """Simulate Ollama coming back on the same port (models must load again)."""
        self.start()

    def __enter__(self) -> OllamaEmulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- scripting
    def inject(self, fault: Fault, times: int | None = 1, match: str | None = None) -> None:
        """Give the next `times` (None: all) requests whose prompt contains `match` this fault.
        The first matching entry in injection order wins."""
        with self._lock:
            self._faults.append([fault, times, match])

    def random_faults(self, rate: float, seed: int = 0, kinds: Sequence[Fault] | None = None) -> None:
        """Unscripted requests get a fault with probability `rate` (0 turns this off)."""
        with self._lock:
            self._rng = random.Random(seed) if rate > 0 else None
            self._random_rate = rate
            self._random_kinds = list(
                kinds or [Fault.oom(), Fault.runner_crash(), Fault.busy(), Fault.drop(), Fault.invalid_json()]
            )

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()
            self._rng = None

    def release_hangs(self) -> None:
        release, self._release = self._release, threading.Event()
        release.set()

    # -- recording
    @property
    def requests(self) -> list[RequestRecord]:
        with self._lock:
            return list(self._records)

    def chat_prompts(self) -> list[str]:
        """Prompts of /api/chat and /api/generate calls answered 200 (loads excluded)."""
        return [r.prompt for r in self.requests if r.path in INFER_PATHS and r.status == 200 and r.prompt]

    def reset_stats(self) -> None:
        with self._lock:
            self._records.clear()
            self.peak_in_flight, self.peak_pending = self.in_flight, self.pending

    # -- internals
    def _track(self, conn: socket.socket, add: bool) -> None:
        with self._lock:
            (self._conns.add if add else self._conns.discard)(conn)

    def _take_fault(self, prompt: str) -> Fault | None:
        with self._lock:
            for entry in self._faults:
                fault, left, match = entry
                if match is None or match in prompt:
                    if left is not None:
                        entry[1] -= 1
                        if entry[1] <= 0:
                            self._faults.remove(entry)
                    return fault
            if self._rng is not None and self._rng.random() < self._random_rate:
                return self._rng.choice(self._random_kinds)
        return None

    def _wait(self, h: _Handler, cut: threading.Event, seconds: float) -> bool:
        """Sleep `seconds`; False if the server went down or the client left meanwhile."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            if cut.wait(min(left, 0.05)) or h.client_gone():
                return False
        return not cut.is_set()

    def _model_entry(self, name: str) -> dict[str, Any]:
        family, tag = name.split(":", 1)
        return {
            "name": name,
            "model": name,
            "modified_at": "2025-10-01T12:00:00Z",
            "size": MODEL_SIZE,
            "digest": hashlib.sha256(name.encode()).hexdigest(),
            "details": {
                "parent_model": "",
                "format": "gguf",
                "family": family,
                "families": [family],
                "quantization_level": "Q4_K_M",
                "parameter_size": tag.split("-")[0].upper() if tag[:1].isdigit() else "unknown",
            },
        }

    def _ps(self) -> dict[str, Any]:
        now, models = time.time(), []
        with self._lock:
            for name, (num_ctx, expiry) in self._loaded.items():
                if expiry is not None and expiry <= now:
                    continue
                entry = self._model_entry(name)
                del entry["modified_at"]
                size = MODEL_SIZE + KV_BYTES_PER_TOKEN * num_ctx * self.parallel
                models.append(
                    {
                        **entry,
                        "size": size,
                        "size_vram": int(size * (1 - self.spill_fraction)),
                        "expires_at": _now_iso(3.15e9 if expiry is None else expiry - now),
                        "context_length": num_ctx,
                    }
                )
        return {"models": models}

    def _load(self, model: str, num_ctx: int, keep_alive: float | None) -> bool:
        """Mark loaded; True when that is a (re)load: first use, expired, num_ctx changed."""
        now = time.time()
        with self._lock:
            old = self._loaded.get(model)
            self._loaded[model] = (num_ctx, None if keep_alive is None else now + keep_alive)
        return old is None or old[0] != num_ctx or (old[1] is not None and old[1] <= now)

    def _handle(self, h: _Handler) -> None:
        rec = RequestRecord(h.command, h.path.split("?", 1)[0], time.monotonic())
        with self._lock:
            self._records.append(rec)
            self._active += 1
        try:
            raw = h.rfile.read(int(h.headers.get("Content-Length") or 0))
            self._route(h, rec, raw)
        except OSError:  # the client or down() closed the socket mid-answer
            h.close_connection = True
        finally:
            rec.t_end = time.monotonic()
            with self._lock:
                self._active -= 1

    def _reply(self, h: _Handler, rec: RequestRecord, status: int, obj: Any) -> None:
        rec.status = status
        if rec.path == "/v1/chat/completions":
            obj = _openai_shape(status, obj)
        h.send(status, json.dumps(obj).encode())

    def _malformed(self, h: _Handler, rec: RequestRecord, fault: Fault, model: str) -> None:
        """A 200 whose body is no answer: what the client gets from a proxy or a broken server."""
        rec.status = 200
        openai = rec.path == "/v1/chat/completions"
        if fault.name == "empty_body":
            return h.send(200, b"")
        if fault.name == "html":
            return h.send(200, PROXY_PAGE.encode(), "text/html")
        obj: dict[str, Any]
        if fault.name == "error_200":
            obj = {"error": {"message": fault.error, "type": "api_error"}} if openai else {"error": fault.error}
        elif openai:
            obj = {"id": "chatcmpl-0", "object": "chat.completion", "created": int(time.time()), "model": model}
            obj["choices"] = [{"index": 0, "finish_reason": "stop"}]
            if fault.name == "wrong_types":
                obj["choices"] = [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": 1}]
                obj["usage"] = {"prompt_tokens": 3.5, "completion_tokens": "many", "total_tokens": None}
        else:
            obj = {"model": model, "created_at": _now_iso(), "done": True, "done_reason": "stop"}
            if fault.name == "wrong_types":
                obj |= {"message": {"role": "assistant", "content": "ok"}, "done_reason": 1, "eval_count": "many"}
        return h.send(200, json.dumps(obj).encode())

    def _route(self, h: _Handler, rec: RequestRecord, raw: bytes) -> None:
        if rec.path == "/" and h.command in ("GET", "HEAD"):
            rec.status = 200
            return h.send(200, b"Ollama is running", "text/plain; charset=utf-8")
        if h.command == "GET" and rec.path in ("/api/version", "/api/tags", "/api/ps"):
            return self._reply(
                h,
                rec,
                200,
                {"version": VERSION}
                if rec.path == "/api/version"
                else self._ps()
                if rec.path == "/api/ps"
                else {"models": [self._model_entry(m) for m in self.models]},
            )
        if h.command == "GET" and rec.path == "/v1/models":
            models = [{"id": m, "object": "model", "created": 0, "owned_by": "library"} for m in self.models]
            return self._reply(h, rec, 200, {"object": "list", "data": models})
        if h.command != "POST" or rec.path not in (*INFER_PATHS, "/api/show", "/v1/chat/completions"):
            rec.status = 404
            return h.send(404, b"404 page not found", "text/plain")
        if not raw:
            return self._reply(h, rec, 400, {"error": "missing request body"})
        try:
            body = rec.body = json.loads(raw)
        except ValueError as exc:
            return self._reply(h, rec, 400, {"error": f"invalid request body: {exc}"})
        if not isinstance(body, dict):
            return self._reply(h, rec, 400, {"error": "request body must be a JSON object"})
        model = str(body.get("model") or body.get("name") or "")
        if rec.path == "/api/show":
            if (fault := self.show_fault) is not None:
                rec.fault = fault.name
                if fault.name == "hang":
                    release, cut = self._release, self._cut
                    while not (release.wait(0.05) or cut.is_set() or h.client_gone()):
                        pass
                    h.close_connection = True
                    return None
                if fault.name in MALFORMED:
                    return self._malformed(h, rec, fault, model)
                return self._reply(h, rec, fault.status, {"error": fault.error})
            if _norm(model) not in self.models:
                return self._reply(h, rec, 404, {"error": f"model '{model}' not found"})
            entry = self._model_entry(_norm(model))
            return self._reply(
                h,
                rec,
                200,
                {
                    "license": "",
                    "modelfile": f"FROM {model}\n",
                    "parameters": "",
                    "template": "{{ .Prompt }}",
                    "details": entry["details"],
                    "modified_at": entry["modified_at"],
                    # Gemma 3 12B's own GGUF keys, whatever the tag: what the verdict reads.
                    "model_info": {
                        "general.architecture": entry["details"]["family"],
                        f"{entry['details']['family']}.context_length": 131072,
                        f"{entry['details']['family']}.block_count": 48,
                        f"{entry['details']['family']}.attention.head_count": 16,
                        f"{entry['details']['family']}.attention.head_count_kv": 8,
                        f"{entry['details']['family']}.attention.key_length": 256,
                        f"{entry['details']['family']}.attention.sliding_window": 1024,
                    },
                    "capabilities": ["completion"],
                },
            )
        if rec.path == "/v1/chat/completions":
            body = _native_request(body)
        self._infer(h, rec, body, model, chat=rec.path != "/api/generate")

    def _infer(self, h: _Handler, rec: RequestRecord, body: dict[str, Any], model: str, chat: bool) -> None:
        source: Prompt = (body.get("messages") or []) if chat else str(body.get("prompt") or "")
        rec.prompt = prompt_text(source)
        # Taken before the fault is recorded: a hang seen in `requests` is one release_hangs() ends.
        cut, release = self._cut, self._release
        fault = self._take_fault(rec.prompt)
        if fault is not None:
            rec.fault = fault.name
            if fault.status:
                return self._reply(h, rec, fault.status, {"error": fault.error})
            if fault.name in ("drop", "hang"):
                while fault.name == "hang" and not (release.wait(0.05) or cut.is_set() or h.client_gone()):
                    pass
                h.close_connection = True  # closing without a status line
                return None
            if fault.name in MALFORMED:
                return self._malformed(h, rec, fault, model)
        if not model:
            return self._reply(h, rec, 400, {"error": "model is required"})
        if _norm(model) not in self.models:
            return self._reply(h, rec, 404, {"error": f"model '{model}' not found"})
        if body.get("think"):
            return self._reply(h, rec, 400, {"error": f'"{model}" does not support thinking'})
        fmt = body.get("format")
        if not (fmt in (None, "", "json") or isinstance(fmt, dict)):
            return self._reply(
                h, rec, 400, {"error": f'invalid format: {json.dumps(fmt)}; expected "json" or a valid JSON Schema'}
            )
        options = body.get("options") or {}
        num_ctx = int(options.get("num_ctx") or DEFAULT_NUM_CTX)
        keep_alive = _keep_alive_s(body.get("keep_alive"))
        if (
            keep_alive != 0
            and self.vram_bytes is not None
            and MODEL_SIZE + KV_BYTES_PER_TOKEN * num_ctx * self.parallel > self.vram_bytes
        ):
            with self._lock:
                self._loaded.pop(_norm(model), None)  # the runner died while loading
            return self._reply(h, rec, 500, {"error": OOM})
        key = "message" if chat else "response"
        empty = {"role": "assistant", "content": ""} if chat else ""
        if not source:  # load / unload request
            if keep_alive == 0:
                with self._lock:
                    self._loaded.pop(_norm(model), None)
            else:
                self._load(_norm(model), num_ctx, keep_alive)
            return self._reply(
                h,
                rec,
                200,
                {
                    "model": model,
                    "created_at": _now_iso(),
                    key: empty,
                    "done": True,
                    "done_reason": "unload" if keep_alive == 0 else "load",
                },
            )
        with self._lock:  # admission: slots + queue
            admitted = self.pending < self.parallel + self.max_queue
            if admitted:
                self.pending += 1
                self.peak_pending = max(self.peak_pending, self.pending)
        if not admitted:
            return self._reply(h, rec, 503, {"error": BUSY})
        comp = completion_for(source, fmt, options)
        try:
            while not self._slots.acquire(timeout=0.05):
                if cut.is_set() or h.client_gone():
                    h.close_connection = True
                    return None
            try:
                with self._lock:
                    self.in_flight += 1
                    self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
                load = self.load_s if self._load(_norm(model), num_ctx, keep_alive) else 0.0
                eval_s = comp.eval_count * self.per_token_s
                served = self._wait(h, cut, load + self.latency_s + eval_s)
            finally:
                with self._lock:
                    self.in_flight -= 1
                self._slots.release()
        finally:
            with self._lock:
                self.pending -= 1
        if not served:
            h.close_connection = True
            return None
        if keep_alive == 0:
            with self._lock:
                self._loaded.pop(_norm(model), None)
        content = comp.content
        if fault is not None and fault.name == "invalid_json":
            props = list(fmt.get("properties", {})) if isinstance(fmt, dict) else []
            content = f'{{"{props[0] if props else "answer"}": "not a number"'
        if fault is not None and fault.name == "lone_surrogate":
            content += "\ud83d"  # json.dumps writes it as the escape \ud83d, which JSON parsers accept
        final = {
            "model": model,
            "created_at": _now_iso(),
            key: {"role": "assistant", "content": content} if chat else content,
            "done": True,
            "done_reason": comp.done_reason,
            "total_duration": _ns(time.monotonic() - rec.t_start),
            "load_duration": _ns(load),
            "prompt_eval_count": comp.prompt_eval_count,
            "prompt_eval_duration": _ns(self.latency_s),
            "eval_count": comp.eval_count,
            "eval_duration": _ns(eval_s),
        }
        final = {k: v for k, v in final.items() if v != 0 or k not in METRICS}  # Ollama omits zero metrics
        if body.get("stream", True) is False:  # Ollama streams unless told not to
            return self._reply(h, rec, 200, final)
        lines = [
            {
                "model": model,
                "created_at": final["created_at"],
                key: {"role": "assistant", "content": piece} if chat else piece,
                "done": False,
            }
            for piece in re.findall(r"\S+\s*|\s+", content)
        ]
        lines.append({**final, key: empty})
        rec.status = 200
        h.send(200, "".join(json.dumps(line) + "\n" for line in lines).encode(), "application/x-ndjson")
        return None


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve the Ollama emulator until Ctrl-C.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=11434)
    parser.add_argument("--models", default="gemma3:12b", help="comma-separated")
    parser.add_argument("--parallel", type=int, default=1)
    parser.add_argument("--max-queue", type=int, default=512)
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--per-token-ms", type=float, default=0.0)
    parser.add_argument("--load-ms", type=float, default=0.0)
    parser.add_argument("--spill-fraction", type=float, default=0.0)
    args = parser.parse_args(argv)
    emu = OllamaEmulator(
        args.models.split(","),
        parallel=args.parallel,
        max_queue=args.max_queue,
        latency_s=args.latency_ms / 1000,
        per_token_s=args.per_token_ms / 1000,
        load_s=args.load_ms / 1000,
        spill_fraction=args.spill_fraction,
        host=args.host,
        port=args.port,
    ).start()
    print(f"Ollama emulator on {emu.host} (parallel={args.parallel}); Ctrl-C stops it", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        emu.stop()


if __name__ == "__main__":
    main()
