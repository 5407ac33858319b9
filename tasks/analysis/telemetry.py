"""GPU (NVML) and host (psutil) telemetry: a sampler thread and window summaries (store writes the Parquet).

This is the only module that imports `pynvml` (package `nvidia-ml-py`).

Frame layout (`Sampler.frame()`, wide/tidy): one row per sample per GPU, host fields repeated on
each GPU's row; with no GPU source there is one row per sample and `gpu` is null.

    t                      f64        time.time() of the sample (epoch seconds)
    gpu                    i32|null   NVML device index
    vram_used_mib          f64|null   nvmlDeviceGetMemoryInfo().used
    vram_total_mib         f64|null   nvmlDeviceGetMemoryInfo().total
    gpu_util_pct           f64|null   share of time *some* kernel ran, not throughput
    mem_util_pct           f64|null   share of time device memory was read/written
    temperature_c          f64|null
    power_w                f64|null
    sm_clock_mhz           f64|null
    pstate                 i32|null   0 (max performance) .. 15
    server_vram_mib        f64|null   the sum over the processes NVML lists on this GPU (None where it lists none)
    cpu_pct                f64        all cores, 0..100: the whole machine, other processes' work included
    job_cpu_pct            f64|null   this process and its children, as a share of all cores, 0..100
    cpu_per_core           list[f64]  one value per logical core, 0..100
    ram_used_mib           f64
    ram_available_mib      f64
    ram_total_mib          f64
    rss_mib                f64        this process
    ollama_size_mib        f64|null   Ollama's /api/ps `size` summed over loaded models (last poll)
    ollama_size_vram_mib   f64|null   /api/ps `size_vram` summed; < size means CPU spill

Marks (`Sampler.marks()`): columns `t` (f64) and `label` (str).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal, Protocol, cast

import polars as pl
import psutil
import pynvml

log = logging.getLogger(__name__)

MIB = 1024 * 1024

GPU_FIELDS: tuple[str, ...] = (
    "vram_used_mib",
    "vram_total_mib",
    "gpu_util_pct",
    "mem_util_pct",
    "temperature_c",
    "power_w",
    "sm_clock_mhz",
    "pstate",
    "server_vram_mib",
)

SCHEMA: dict[str, Any] = {
    "t": pl.Float64,
    "gpu": pl.Int32,
    **{name: pl.Float64 for name in GPU_FIELDS},
    "pstate": pl.Int32,
    "cpu_pct": pl.Float64,
    "job_cpu_pct": pl.Float64,
    "cpu_per_core": pl.List(pl.Float64),
    "ram_used_mib": pl.Float64,
    "ram_available_mib": pl.Float64,
    "ram_total_mib": pl.Float64,
    "rss_mib": pl.Float64,
    "ollama_size_mib": pl.Float64,
    "ollama_size_vram_mib": pl.Float64,
}
MARK_SCHEMA: dict[str, Any] = {"t": pl.Float64, "label": pl.String}
FIRST_ANSWER = "first answer"  # a chunk's first answer, marked at its time when the chunk ends

OLLAMA_POLL_S = 5.0  # /api/ps is cheap but the server is busy with real work: poll sparingly
CHILDREN_EVERY_S = 10.0  # how often the job's CPU meter lists this process's descendants
_FLUSH_ROWS = 1000  # rows buffered as dicts before they are packed into a Polars frame


class ModelMemory(Protocol):
    """Says how much memory the server's loaded models take and how much of it is VRAM (OllamaBackend)."""

    def loaded_sizes(self) -> tuple[float | None, float | None]:
        """(size, size in VRAM) in MiB, or (None, None) when the server does not answer."""
        ...


class GpuSource(Protocol):
    """Something that reads per-GPU fields; NVML in production, a fake in tests."""

    def devices(self) -> int: ...

    def read(self, index: int) -> dict[str, float | int | None]: ...

    def close(self) -> None: ...


class NvmlSource:
    """GpuSource over an already initialised NVML; `open_gpu_source()` builds it."""

    def __init__(self, handles: list[Any]) -> None:
        self._handles = handles

    def devices(self) -> int:
        return len(self._handles)

    def read(self, index: int) -> dict[str, float | int | None]:
        """Read every field; a query this GPU does not support gives None for that field."""
        h = self._handles[index]
        try:
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
        except pynvml.NVMLError_GpuIsLost:
            raise  # the Sampler stops reading a lost GPU instead of retrying it every second
        except pynvml.NVMLError:
            mem = None
        util = _nvml(lambda: pynvml.nvmlDeviceGetUtilizationRates(h))
        power_mw = _nvml(lambda: pynvml.nvmlDeviceGetPowerUsage(h))
        return {
            "vram_used_mib": mem.used / MIB if mem is not None else None,
            "vram_total_mib": mem.total / MIB if mem is not None else None,
            "gpu_util_pct": float(util.gpu) if util is not None else None,
            "mem_util_pct": float(util.memory) if util is not None else None,
            "temperature_c": _nvml(lambda: float(pynvml.nvmlDeviceGetTemperature(h, pynvml.NVML_TEMPERATURE_GPU))),
            "power_w": power_mw / 1000.0 if power_mw is not None else None,
            "sm_clock_mhz": _nvml(lambda: float(pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_SM))),
            "pstate": _nvml(lambda: int(pynvml.nvmlDeviceGetPerformanceState(h))),
            "server_vram_mib": _nvml(lambda: self._server_mib(h)),
        }

    def _server_mib(self, handle: Any) -> float | None:
        # Containers often see no processes (PID namespaces) and WDDM reports no per-process
        # memory (usedGpuMemory None): both give None rather than a misleading 0.
        procs = pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
        used = [p.usedGpuMemory for p in procs if p.usedGpuMemory is not None]
        return sum(used) / MIB if used else None

    def close(self) -> None:
        with contextlib.suppress(pynvml.NVMLError):  # already shut down or driver gone
            pynvml.nvmlShutdown()


def _nvml(query: Callable[[], Any]) -> Any:
    """Run one NVML query; unsupported or failing queries become None."""
    try:
        return query()
    except pynvml.NVMLError:
        return None


def open_gpu_source() -> GpuSource | None:
    """Initialise NVML; without a usable NVML log one warning and return None."""
    try:
        pynvml.nvmlInit()
        count = pynvml.nvmlDeviceGetCount()
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
    except pynvml.NVMLError as exc:
        log.warning("GPU telemetry is off: NVML unavailable (%s); sampling host only", exc)
        return None
    return NvmlSource(handles)


class _CpuMeter:
    """CPU % from our own cpu_times deltas, so other psutil.cpu_percent() callers can't skew it."""

    def __init__(self) -> None:
        self._last: list[Any] | None = None

    def read(self) -> tuple[float | None, list[float]]:
        now = psutil.cpu_times(percpu=True)
        last, self._last = self._last, now
        if last is None or len(last) != len(now):
            return None, []  # the first reading has no interval to measure over
        per_core = [_busy_pct(a, b) for a, b in zip(last, now, strict=True)]
        return sum(per_core) / len(per_core), per_core


class _JobCpuMeter:
    """CPU % of this process and its descendants, as a share of all cores: the job's own load. The
    machine's cpu_pct counts whatever else runs there too (a compiler, another job)."""

    def __init__(self, proc: psutil.Process) -> None:
        self._proc = proc
        self._cores = psutil.cpu_count() or 1
        self._last: tuple[float, float] | None = None  # (monotonic time, CPU seconds)
        self._children: list[psutil.Process] = []
        self._children_next = 0.0

    def _cpu_seconds(self, now: float) -> float:
        if now >= self._children_next:
            # Listing descendants reads every process on the machine: every 10 s, not every sample. A child
            # found late adds its seconds so far in one sample; the run's mean stays right.
            self._children_next = now + CHILDREN_EVERY_S
            with contextlib.suppress(psutil.Error):
                self._children = self._proc.children(recursive=True)
        own = self._proc.cpu_times()
        # children_*: children that ended and were waited for; the living ones are read one by one, so a
        # child's seconds move from one term to the other when it ends.
        total = own.user + own.system + own.children_user + own.children_system
        for child in self._children:
            with contextlib.suppress(psutil.Error):  # it ended since it was listed
                times = child.cpu_times()
                total += times.user + times.system
        return total

    def read(self) -> float | None:
        now = time.monotonic()
        used = self._cpu_seconds(now)
        last, self._last = self._last, (now, used)
        if last is None or now <= last[0]:
            return None
        # A child that ended unwaited-for takes its seconds with it: clamp that dip to 0, never below.
        busy = max(0.0, used - last[1]) / ((now - last[0]) * self._cores)
        return min(100.0, 100.0 * busy)


def _busy_pct(before: Any, after: Any) -> float:
    # Same definition as psutil.cpu_percent: busy = all time except idle and iowait.
    total = sum(after) - sum(before)
    idle = (after.idle - before.idle) + (getattr(after, "iowait", 0.0) - getattr(before, "iowait", 0.0))
    return 0.0 if total <= 0 else max(0.0, min(100.0, 100.0 * (total - idle) / total))


class Sampler:
    """Samples GPU and host fields every `interval_s` on a daemon thread; start() / stop().

    Rows are buffered as dicts and packed into a Polars frame every `flush_rows` rows.
    """

    def __init__(
        self,
        interval_s: float = 1.0,
        gpu_source: GpuSource | None | Literal["auto"] = "auto",
        model_memory: Sequence[ModelMemory] = (),
        flush_rows: int = _FLUSH_ROWS,
    ) -> None:
        # No I/O here: "auto" opens NVML in start(), so a Sampler can be built anywhere.
        self.interval_s = interval_s
        self._source_arg = gpu_source
        self._source: GpuSource | None = None
        self._model_memory = list(model_memory)
        self.flush_rows = flush_rows
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._rows: list[dict[str, Any]] = []
        self._parts: list[pl.DataFrame] = []
        self._marks: list[tuple[float, str]] = []
        self._lost: set[int] = set()
        self._gpu_off = False
        self._ollama: tuple[float | None, float | None] = (None, None)
        self._ollama_next = 0.0
        self._host_failed = False
        self.samples = 0
        self.cpu_seconds = 0.0  # thread CPU time spent sampling: the sampler's own cost

    def start(self) -> None:
        """Open the GPU source (if "auto") and start the sampling thread."""
        if self._thread is not None:
            raise RuntimeError("Sampler already started")
        if self._source_arg == "auto":
            self._source = open_gpu_source()
        else:
            self._source = self._source_arg
        self._thread = threading.Thread(target=self._run, name="telemetry-sampler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread, wait for it, close the GPU source."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
        if self._source is not None:
            try:
                self._source.close()
            except Exception:  # closing must never break a run's teardown
                log.exception("closing the GPU source failed")
            self._source = None

    def mark(self, label: str, at: float | None = None) -> None:
        """Record an event (e.g. "chunk 3 start") at `at`, or now."""
        with self._lock:
            self._marks.append((time.time() if at is None else at, label))

    def marks(self) -> pl.DataFrame:
        """All marks so far: columns t, label."""
        with self._lock:
            rows = list(self._marks)
        return pl.DataFrame(rows, schema=MARK_SCHEMA, orient="row")

    def frame(self) -> pl.DataFrame:
        """All samples so far (layout in the module docstring)."""
        with self._lock:
            parts = [*self._parts, _to_frame(self._rows)]
        return pl.concat(parts, how="vertical")

    @property
    def cpu_seconds_per_sample(self) -> float | None:
        """Mean CPU seconds one sample cost the sampling thread."""
        return self.cpu_seconds / self.samples if self.samples else None

    def _run(self) -> None:
        cpu = _CpuMeter()
        proc = psutil.Process()
        job_cpu = _JobCpuMeter(proc)
        cpu.read()  # prime the CPU deltas so the first real sample has an interval
        job_cpu.read()
        while not self._stop.is_set():
            began = time.perf_counter()
            cpu_began = time.thread_time()
            try:
                self._sample(cpu, proc, job_cpu)
            except Exception:  # never let telemetry kill the run; keep trying next tick
                if not self._host_failed:
                    log.exception("telemetry sample failed; will keep trying")
                    self._host_failed = True
            self.cpu_seconds += time.thread_time() - cpu_began
            self.samples += 1
            self._stop.wait(max(0.0, self.interval_s - (time.perf_counter() - began)))

    def _sample(self, cpu: _CpuMeter, proc: psutil.Process, job_cpu: _JobCpuMeter) -> None:
        t = time.time()
        cpu_pct, per_core = cpu.read()
        vm = psutil.virtual_memory()
        host: dict[str, Any] = {
            "t": t,
            "cpu_pct": cpu_pct,
            "job_cpu_pct": job_cpu.read(),
            "cpu_per_core": per_core,
            "ram_used_mib": vm.used / MIB,
            "ram_available_mib": vm.available / MIB,
            "ram_total_mib": vm.total / MIB,
            "rss_mib": proc.memory_info().rss / MIB,
        }
        host["ollama_size_mib"], host["ollama_size_vram_mib"] = self._poll_ollama()
        rows = [{**host, "gpu": i, **self._read_gpu(i)} for i in range(self._devices())]
        with self._lock:
            self._rows.extend(rows or [{**host, "gpu": None}])
            if len(self._rows) >= self.flush_rows:
                # Packed frames hold a long run (1 sample/s for 14 h) in a few MB, dicts would not.
                self._parts.append(_to_frame(self._rows))
                self._rows = []

    def _devices(self) -> int:
        if self._source is None or self._gpu_off:
            return 0
        try:
            return self._source.devices()
        except Exception:
            log.exception("GPU telemetry is off from now on: listing devices failed")
            self._gpu_off = True  # stop() still closes the source
            return 0

    def _read_gpu(self, index: int) -> dict[str, Any]:
        if self._source is None or index in self._lost:
            return {}
        try:
            fields = self._source.read(index)
        except Exception as exc:
            # A lost device usually stays lost; polling it again each second only spams errors.
            log.warning("GPU %d stopped answering (%s); its fields are None from now on", index, exc)
            self._lost.add(index)
            return {}
        return {k: fields.get(k) for k in GPU_FIELDS}

    def _poll_ollama(self) -> tuple[float | None, float | None]:
        if not self._model_memory:
            return None, None
        now = time.monotonic()
        if now >= self._ollama_next:
            self._ollama_next = now + OLLAMA_POLL_S
            answers = [server.loaded_sizes() for server in self._model_memory]
            size = [a[0] for a in answers if a[0] is not None]
            vram = [a[1] for a in answers if a[1] is not None]
            # Summed over the endpoints that answered; None when none did.
            self._ollama = (sum(size) if size else None, sum(vram) if vram else None)
        return self._ollama  # between polls the last answer stands


def _to_frame(rows: list[dict[str, Any]]) -> pl.DataFrame:
    # strict=False: a source may hand ints for float fields (e.g. MiB from a fake or an old driver).
    return pl.DataFrame(rows, schema=SCHEMA, strict=False)


IDLE_UTIL_PCT = 10.0  # below it the GPU was waiting (on the client, a model load, the next chunk) most of that second


def warm_ups(marks: pl.DataFrame) -> list[tuple[float, float]]:
    """Each attempt's start to its first answer: the wait for the GPU slot (another job may hold it) and
    loading the model (Ollama loads it at the first request). summarize ends a span earlier where the GPU
    got busy before the first answer came (long answers)."""
    spans: list[tuple[float, float]] = []
    start: float | None = None
    relevant = pl.col("label").str.starts_with("attempt ") | (pl.col("label") == FIRST_ANSWER)
    for t, label in marks.filter(relevant).sort("t").iter_rows():
        if label.startswith("attempt "):
            start = t
        elif start is not None:
            spans.append((start, t))
            start = None
    return spans


def summarize(frame: pl.DataFrame, t0: float, t1: float, warm_up: Sequence[tuple[float, float]] = ()) -> dict[str, Any]:
    """Summarise samples in [t0, t1]; GPU keys are None when the window has no GPU data.

    With several GPUs, peaks/means are over all GPU rows and headroom is the smallest per GPU.
    Samples inside a `warm_up` span (see warm_ups) count for memory, power and CPU, but not for
    how busy the GPU was: utilisation and idle share are the steady state's.
    """
    w = frame.filter(pl.col("t").is_between(t0, t1))
    host = w.unique(subset="t", keep="first")  # host fields repeat on each GPU's row
    gpu = w.filter(pl.col("vram_used_mib").is_not_null())
    # A span ends at the GPU's first busy sample: 64 long answers keep the GPU working for 20 s before the
    # first comes back, and that is the run's work, not a wait (it was half of a 40 s run on an H100).
    warm_up = [(start, _first_busy(gpu, start, end)) for start, end in warm_up]
    loading = pl.lit(False)
    for start, end in warm_up:
        loading = loading | pl.col("t").is_between(start, end, closed="left")
    out: dict[str, Any] = {
        "samples": host.height,
        "cpu_mean_pct": _stat(host["cpu_pct"].mean()),
        # Samples written before job_cpu_pct existed (an earlier attempt's) have no such column.
        "job_cpu_mean_pct": _stat(host["job_cpu_pct"].mean()) if "job_cpu_pct" in host.columns else None,
        "rss_peak_mib": _stat(host["rss_mib"].max()),
        "ram_available_min_mib": _stat(host["ram_available_mib"].min()),
        "ram_total_mib": _stat(host["ram_total_mib"].max()),
        "ollama_spill": _spill(host),
        "vram_peak_mib": None,
        "vram_mean_mib": None,
        "vram_total_mib": None,
        "vram_headroom_mib": None,
        "gpu_util_mean": None,
        "mem_util_mean": None,
        "gpu_idle_fraction": None,
        "power_mean_w": None,
        "power_max_w": None,
        "warm_up_s": round(sum(max(0.0, min(end, t1) - max(start, t0)) for start, end in warm_up), 1) or None,
    }
    if gpu.height == 0:
        return out
    per_gpu = gpu.group_by("gpu").agg(peak=pl.col("vram_used_mib").max(), total=pl.col("vram_total_mib").max())
    steady = gpu.filter(~loading)
    util = steady["gpu_util_pct"].drop_nulls()
    out.update(
        vram_peak_mib=_stat(gpu["vram_used_mib"].max()),
        vram_mean_mib=_stat(gpu["vram_used_mib"].mean()),
        vram_total_mib=_stat(gpu["vram_total_mib"].max()),
        vram_headroom_mib=_stat((per_gpu["total"] - per_gpu["peak"]).min()),
        gpu_util_mean=_stat(util.mean()),
        mem_util_mean=_stat(steady["mem_util_pct"].mean()),
        gpu_idle_fraction=float((util < IDLE_UTIL_PCT).mean()) if util.len() else None,  # type: ignore[arg-type]
        power_mean_w=_stat(gpu["power_w"].mean()),
        power_max_w=_stat(gpu["power_w"].max()),
    )
    return out


def _first_busy(gpu: pl.DataFrame, start: float, end: float) -> float:
    """The first sample in [start, end) at which the GPU was busy, else end."""
    busy = gpu.filter(pl.col("t").is_between(start, end, closed="left") & (pl.col("gpu_util_pct") >= IDLE_UTIL_PCT))
    return float(busy["t"].min()) if busy.height else end  # type: ignore[arg-type]


def chunks_busy_s(marks: pl.DataFrame) -> float:
    """Seconds in which at least one chunk try ran, from the marks' 'chunk-N start' / 'chunk-N end'
    pairs: tries that failed count, and endpoints working side by side count once."""
    open_tries, since, busy = 0, 0.0, 0.0
    for t, label in marks.filter(pl.col("label").str.starts_with("chunk-")).sort("t").iter_rows():
        if label.endswith(" start"):
            if open_tries == 0:
                since = t
            open_tries += 1
        elif label.endswith(" end") and open_tries:
            open_tries -= 1
            if open_tries == 0:
                busy += t - since
    return busy


ENERGY_GAP_FACTOR = 5.0  # an interval over 5x the usual sampling interval is a gap, not a sample step


def energy_wh(frame: pl.DataFrame) -> float | None:
    """GPU energy over the samples in Wh, summed over every GPU NVML sees; None without a power reading.

    Power is integrated over time between consecutive samples of each GPU (trapezoids: the mean of the
    two readings times the time between them). An interval longer than ENERGY_GAP_FACTOR x the median
    one (a stalled sampler, the time between two attempts of a job) is left out, not bridged with a guess.
    """
    power = frame.filter(pl.col("power_w").is_not_null() & pl.col("gpu").is_not_null())
    if power.height == 0:
        return None
    steps = (
        power.sort("gpu", "t")
        .select(
            dt=pl.col("t").diff().over("gpu"),
            mean_w=((pl.col("power_w") + pl.col("power_w").shift()) / 2).over("gpu"),
        )
        .drop_nulls()
    )
    if steps.height == 0:
        return 0.0  # one reading per GPU: no interval to integrate over
    limit = ENERGY_GAP_FACTOR * cast(float, steps["dt"].median())
    joules = steps.filter(pl.col("dt") <= limit).select((pl.col("dt") * pl.col("mean_w")).sum()).item()
    return float(joules) / 3600.0


def hosts_energy_wh(readings: list[float | None]) -> float | None:
    """Several runs' energy (a scale-out job's shard runs): their sum, or None when any of them had no
    power reading, so that a part never reads as the whole."""
    return None if not readings or None in readings else sum(r for r in readings if r is not None)


def of_gpus(frame: pl.DataFrame, gpus: list[int] | None) -> pl.DataFrame:
    """The samples of the job's GPUs (settings.gpus; every one when None). Rows without a GPU (no NVML)
    stay: they carry the host's figures."""
    return frame if gpus is None else frame.filter(pl.col("gpu").is_in(gpus) | pl.col("gpu").is_null())


def wh_per_1000_rows(energy: float | None, rows: int) -> float | None:
    """Energy per 1,000 finished rows; None without a power reading or without rows."""
    return None if energy is None or rows <= 0 else energy / rows * 1000.0


def _spill(host: pl.DataFrame) -> bool | None:
    seen = host.filter(
        pl.col("ollama_size_mib").is_not_null()
        & pl.col("ollama_size_vram_mib").is_not_null()
        & (pl.col("ollama_size_mib") > 0)
    )
    if seen.height == 0:
        return None
    return bool((seen["ollama_size_vram_mib"] < seen["ollama_size_mib"]).any())


def _stat(value: Any) -> float | None:
    return None if value is None else float(value)
