"""Resource measurement the way the FLARE22 organisers do it (REFERENCE section 3).

Two halves:

* :class:`ResourceMonitor` samples, every 0.1 s in a background thread, the device-wide GPU
  memory in use (NVML total minus free, MiB), the GPU memory of the watched process tree
  (where NVML reports it), the machine-wide CPU utilisation (100 minus the idle percentage
  over the change in ``psutil.cpu_times()`` since the previous sample), the machine's used
  RAM and the watched process tree's RSS. Without NVML (no driver, no GPU) the GPU series
  are ``None``; that is logged once per monitor, never per sample.
* Pure functions turn a sample series into the organisers' per-case figures
  (:func:`compute_figures`): Time, GPU_Mem, AUC_GPU_Time (raw and with the 2 GB
  tolerance), CPU_Utilization, AUC_CPU_Time, RAM and AUC_RAM_Time.

Units: "MB" is what the organisers' monitor reports, which is MiB (bytes / 2**20); the CPU
figures are percent of the whole machine (all logical CPUs together = 100), so AUC_CPU_Time
is in percent-seconds; areas are ``sum(samples) * 0.1``, exactly as the organisers compute
them (JunMa11/FLARE, FLARE22/Evaluation/Efficiency.py and load_json.py; FLARE23 and FLARE24
have the same code), whatever the real spacing of the samples.

Sampling schedule: ``"organisers"`` (default) is their loop: the first sample at t = 0, as the
monitor starts (their daemon process starts before the container), then a sleep of 0.1 s
after each query, so the period is 0.1 s plus the query's own time and drifts slower.
``"grid"`` ticks at k x 0.1 s after start from 0.1 s on (a late tick is skipped and counted,
never bunched up): fewer samples per second than theirs is impossible, so its areas come out
a little higher than theirs for the same run.

CPU formula: ``"organisers"`` (default) reproduces their script: per sample the shares
``100 x d / (d_user + d_system + d_idle + 0.1)`` of user, system and idle (their JSON's
``cpu_list``), and the utilisation ``100 - idle share``; it reads a few percent above zero on
an idle machine (about 7.7 % on their 12-thread evaluation machine) and ignores nice, iowait,
irq and softirq time. Their first sample spans the moment from their script's start to the
first query; ours the moment from :class:`ResourceMonitor`'s creation to the first sample.
``"exact"`` is 100 x (1 - d_idle / d_total) with d_total the change of all ``cpu_times()``
fields except guest and guest_nice (which Linux already counts in user and nice). Both are
always recorded: the chosen one fills CPU_Utilization / AUC_CPU_Time, the exact one also
goes to CPU_Utilization_Exact / AUC_CPU_Time_Exact.

Editions (``--edition``): the column names and GPU-memory rule of the organisers' code.
FLARE22: ``GPU_Mem`` is the largest value seen in more than 2 % of the samples (their
``load_json.py``), and ``CPU_Utilization``, ``RAM``; FLARE23 and FLARE24: ``MaxGPU_Mem``
(the plain maximum), ``MaxCPU_Utilization``, ``MaxRAM``. What is only in the rules' text, not
in their code: the 2 GB tolerance (``AUC_GPU_Time_2GB``, an extra column here) and the
charges for a case that hangs (:func:`hang_figures`).

The watched tree's RSS is the sum over its processes (pages shared between them count
once per process); its GPU memory is what NVML lists for those PIDs, which reads 0 where
NVML sees other PID numbers (inside a container, or for a Docker case, whose processes are
not our children). The machine-wide series are what the organisers measure.

The sampler is a thread: it needs the GIL for a moment per sample, so in a process whose
main thread runs pure Python without pause its samples come late (late ticks are skipped
and counted in ``missed_ticks``). ``flare22 efficiency`` watches a child process and only
waits meanwhile; numpy and ONNX Runtime release the GIL while they compute. The sampler
costs about 0.1-0.5 ms of CPU per sample (``thread_cpu_s``; ``bench/monitor_overhead.py``).

This module imports numpy, psutil and pynvml only (never torch).
"""
from __future__ import annotations

import functools
import logging
import os
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import ClassVar, Iterable, Literal, Sequence

import numpy as np
import psutil

log = logging.getLogger(__name__)

SAMPLE_INTERVAL_S = 0.1
GPU_TOLERANCE_MB = 2048.0
SPIKE_FRACTION = 0.02  # GPU_Mem ignores values seen in at most 2 % of the samples
MIB = 1024 * 1024

# What the organisers charge for a case that hangs (REFERENCE section 3).
HANG_TIME_S = 3600.0
HANG_AUC_GPU_TOLERANT = 3600.0 * (10240.0 - 2048.0)
HANG_AUC_CPU = 360000.0

CpuFormula = Literal["exact", "organisers"]
CPU_FORMULAS: tuple[str, ...] = ("organisers", "exact")
Schedule = Literal["organisers", "grid"]
SCHEDULES: tuple[str, ...] = ("organisers", "grid")
EDITIONS: tuple[int, ...] = (22, 23, 24)


# --------------------------------------------------------------------------------------
# Pure figures on a sample series
# --------------------------------------------------------------------------------------


def auc(series: Sequence[float], interval_s: float = SAMPLE_INTERVAL_S) -> float:
    """Area under a sampled curve as the organisers take it: ``sum(samples) * interval``."""
    return float(sum(series) * interval_s)


def gpu_tolerant(series: Iterable[float], tolerance_mb: float = GPU_TOLERANCE_MB) -> list[float]:
    """Per-sample GPU memory with the 2 GB tolerance: ``max(0, used - 2048)``."""
    return [max(0.0, float(v) - tolerance_mb) for v in series]


def spike_filtered_max(series: Sequence[float], fraction: float = SPIKE_FRACTION) -> float | None:
    """GPU_Mem: the highest value that occurs in more than ``fraction`` of the samples.

    The organisers count the occurrences of each distinct value and keep the values whose
    count is strictly greater than ``0.02 * n``; GPU_Mem is the largest of those. So:

    * ``n < 50``: every value occurs at least once > 0.02 n, nothing is filtered: the plain max.
    * ``n = 50 k``: a value must occur at least ``k + 1`` times (exactly 2 % is not enough).
    * With ``fraction = 0.02`` the test ``count > 0.02 * n`` in floating point equals the
      integer test ``50 * count > n`` for every n (the double nearest 0.02 lies above 0.02,
      and a non-integer n / 50 is at least 1/50 from any count), so it is done in integers.
    * If no value qualifies (n >= 50 and no value repeats often enough; the organisers'
      script would fail on ``max([])``), the unfiltered maximum is returned with a warning:
      an upper bound, never an under-report.
    * An empty series gives ``None``.
    """
    n = len(series)
    if n == 0:
        return None
    counts = Counter(float(v) for v in series)
    if fraction == SPIKE_FRACTION:
        kept = [v for v, c in counts.items() if 50 * c > n]
    else:
        kept = [v for v, c in counts.items() if c > fraction * n]
    if not kept:
        log.warning(
            "GPU memory: no value occurs in more than %.0f%% of %d samples; using the unfiltered maximum",
            100 * fraction, n,
        )
        return float(max(counts))
    return float(max(kept))


def cpu_shares_organisers(before, after) -> list[float]:
    """[user, system, idle] as the organisers' script records them per sample (``cpu_list``):
    ``100 x d / (d_user + d_system + d_idle + 0.1)`` between two ``cpu_times()`` readings."""
    d = [getattr(after, k) - getattr(before, k) for k in ("user", "system", "idle")]
    total = sum(d)
    return [100.0 * v / (total + 0.1) for v in d]


def cpu_busy_percent(before, after, formula: CpuFormula = "exact") -> float:
    """Machine-wide CPU utilisation between two ``psutil.cpu_times()`` readings: 100 - idle %."""
    if formula == "organisers":
        return 100.0 - cpu_shares_organisers(before, after)[2]
    d = {name: getattr(after, name) - getattr(before, name) for name in after._fields}
    if formula != "exact":
        raise ValueError(f"unknown CPU formula {formula!r}; expected one of {CPU_FORMULAS}")
    # Linux counts guest time inside user/nice already (psutil's cpu_percent drops it too).
    total = sum(v for k, v in d.items() if k not in ("guest", "guest_nice"))
    if total <= 0:
        return 0.0
    return 100.0 - 100.0 * d["idle"] / total


@dataclass(frozen=True)
class Figures:
    """One case's figures, named as in the organisers' efficiency CSV (plus a few extras).

    ``auc_gpu_time_2gb`` (the 2 GB tolerance of FLARE22's rules) is the GPU figure FLARE22
    ranks on. GPU fields are ``None`` when there were no GPU samples (no NVML);
    sample-derived fields are ``None`` for an empty series.
    """

    time_s: float
    gpu_mem_mb: float | None  # FLARE22's GPU_Mem: the 2 % spike rule
    auc_gpu_time: float | None
    auc_gpu_time_2gb: float | None
    cpu_utilization: float | None
    auc_cpu_time: float | None
    ram_mb: float | None
    auc_ram_time: float | None
    gpu_process_max_mb: float | None = None
    rss_max_mb: float | None = None
    n_samples: int = 0
    gpu_mem_max_mb: float | None = None  # FLARE23/24's MaxGPU_Mem: the plain maximum
    cpu_utilization_exact: float | None = None
    auc_cpu_time_exact: float | None = None

    # the organisers' columns per edition, in their order: column name -> attribute
    EDITION_COLUMNS: ClassVar[dict[int, dict[str, str]]] = {
        22: {"Time": "time_s", "GPU_Mem": "gpu_mem_mb", "AUC_GPU_Time": "auc_gpu_time",
             "CPU_Utilization": "cpu_utilization", "AUC_CPU_Time": "auc_cpu_time",
             "RAM": "ram_mb", "AUC_RAM_Time": "auc_ram_time"},
        23: {"Time": "time_s", "MaxGPU_Mem": "gpu_mem_max_mb", "AUC_GPU_Time": "auc_gpu_time",
             "MaxCPU_Utilization": "cpu_utilization", "AUC_CPU_Time": "auc_cpu_time",
             "MaxRAM": "ram_mb", "AUC_RAM_Time": "auc_ram_time"},
    }
    EDITION_COLUMNS[24] = EDITION_COLUMNS[23]
    # ours, after theirs (AUC_GPU_Time_2GB: FLARE22's rules' text, not their code)
    EXTRA_COLUMNS: ClassVar[dict[str, str]] = {
        "AUC_GPU_Time_2GB": "auc_gpu_time_2gb",
        "CPU_Utilization_Exact": "cpu_utilization_exact",
        "AUC_CPU_Time_Exact": "auc_cpu_time_exact",
        "GPU_Mem_Process_Max": "gpu_process_max_mb",
        "RSS_Max": "rss_max_mb",
        "Samples": "n_samples",
    }
    COLUMNS: ClassVar[dict[str, str]] = {**EDITION_COLUMNS[22], **EXTRA_COLUMNS}
    # decimals the organisers' CSV rounds each column to (None: as is)
    DECIMALS: ClassVar[dict[str, int | None]] = {
        "Time": 2, "GPU_Mem": 0, "MaxGPU_Mem": 0, "AUC_GPU_Time": 0, "AUC_GPU_Time_2GB": 0,
        "CPU_Utilization": 2, "MaxCPU_Utilization": 2, "AUC_CPU_Time": 2, "RAM": 2, "MaxRAM": 2,
        "AUC_RAM_Time": 0, "CPU_Utilization_Exact": 2, "AUC_CPU_Time_Exact": 2,
        "GPU_Mem_Process_Max": 0, "RSS_Max": 2, "Samples": None,
    }

    @classmethod
    def columns(cls, edition: int = 22) -> dict[str, str]:
        """Column name -> attribute: the organisers' columns of ``edition``, then ours."""
        if edition not in cls.EDITION_COLUMNS:
            raise ValueError(f"unknown FLARE edition {edition!r}; expected one of {EDITIONS}")
        return {**cls.EDITION_COLUMNS[edition], **cls.EXTRA_COLUMNS}

    def to_dict(self, edition: int = 22) -> dict:
        """Full-precision figures under the organisers' column names of ``edition``."""
        return {col: getattr(self, attr) for col, attr in self.columns(edition).items()}

    def to_row(self, edition: int = 22) -> dict:
        """The organisers' rounding (``np.round``, half to even), for the CSV."""
        row = {}
        for col, value in self.to_dict(edition).items():
            digits = self.DECIMALS[col]
            row[col] = value if value is None or digits is None else float(np.round(value, digits))
        return row


def hang_figures() -> Figures:
    """What a case that hangs is charged: Time 3600 s, AUC GPU 3600 x 8192, AUC CPU 360000."""
    return Figures(
        time_s=HANG_TIME_S, gpu_mem_mb=None, auc_gpu_time=None,
        auc_gpu_time_2gb=HANG_AUC_GPU_TOLERANT, cpu_utilization=None,
        auc_cpu_time=HANG_AUC_CPU, ram_mb=None, auc_ram_time=None,
    )


def organisers_record(samples: "Samples", time_s: float) -> dict:
    """A case as the organisers' ``Efficiency.py`` saves it (what their ``load_json.py`` reads):
    ``gpu_memory`` (MiB per sample), ``cpu_list`` ([user, system, idle] % per sample),
    ``RAM_list`` (MiB per sample) and ``time`` (s)."""
    return {
        "gpu_memory": [float(v) for v in (samples.gpu_mb or [])],
        "cpu_list": [[float(x) for x in c] for c in samples.cpu_list],
        "RAM_list": [float(v) for v in samples.ram_mb],
        "time": float(time_s),
    }


def figures_from_organisers_record(record: dict, interval_s: float = SAMPLE_INTERVAL_S) -> Figures:
    """Figures of a case saved in the organisers' JSON form (``time`` missing: their fallback,
    0.1 s per GPU sample). The exact CPU formula needs raw counters and stays ``None``."""
    cpu_list = record.get("cpu_list") or []
    gpu = [float(v) for v in record.get("gpu_memory") or []]
    samples = Samples(
        interval_s=interval_s, t=[i * interval_s for i in range(len(cpu_list))],
        gpu_mb=gpu or None, cpu_percent=[100.0 - float(c[2]) for c in cpu_list],
        cpu_list=[list(c) for c in cpu_list], ram_mb=[float(v) for v in record.get("RAM_list") or []],
    )
    time_s = record["time"] if "time" in record else interval_s * len(gpu)
    return compute_figures(samples, time_s)


def _max_or_none(series: Sequence[float | None] | None) -> float | None:
    values = [v for v in (series or []) if v is not None]
    return float(max(values)) if values else None


def compute_figures(
    samples: "Samples", time_s: float, *, interval_s: float | None = None
) -> Figures:
    """The organisers' per-case figures from a sample series; ``time_s`` is the wall time."""
    dt = samples.interval_s if interval_s is None else interval_s
    n = len(samples.cpu_percent)
    gpu = samples.gpu_mb
    has_gpu = gpu is not None and len(gpu) > 0
    exact = samples.cpu_percent_exact or []
    return Figures(
        time_s=float(time_s),
        gpu_mem_mb=spike_filtered_max(gpu) if has_gpu else None,
        auc_gpu_time=auc(gpu, dt) if has_gpu else None,
        auc_gpu_time_2gb=auc(gpu_tolerant(gpu), dt) if has_gpu else None,
        cpu_utilization=float(max(samples.cpu_percent)) if n else None,
        auc_cpu_time=auc(samples.cpu_percent, dt) if n else None,
        ram_mb=float(max(samples.ram_mb)) if samples.ram_mb else None,
        auc_ram_time=auc(samples.ram_mb, dt) if samples.ram_mb else None,
        gpu_process_max_mb=_max_or_none(samples.gpu_process_mb),
        rss_max_mb=_max_or_none(samples.rss_mb),
        n_samples=n,
        gpu_mem_max_mb=float(max(gpu)) if has_gpu else None,
        cpu_utilization_exact=float(max(exact)) if exact else None,
        auc_cpu_time_exact=auc(exact, dt) if exact else None,
    )


# --------------------------------------------------------------------------------------
# Sample series
# --------------------------------------------------------------------------------------


@dataclass
class Samples:
    """Parallel per-sample series. ``gpu_mb``/``gpu_process_mb`` are ``None`` without NVML;
    a ``gpu_process_mb`` entry is ``None`` where NVML could not list the processes; the GPU
    series end early (shorter than ``t``) if NVML fails mid-run."""

    interval_s: float = SAMPLE_INTERVAL_S
    cpu_formula: str = "organisers"
    schedule: str = "organisers"
    t: list[float] = field(default_factory=list)  # seconds since the monitor started
    gpu_mb: list[float] | None = None  # device-wide, NVML total - free, MiB
    gpu_process_mb: list[float | None] | None = None  # the watched process tree, MiB
    cpu_percent: list[float] = field(default_factory=list)  # machine-wide, 100 - idle %, by cpu_formula
    cpu_percent_exact: list[float] = field(default_factory=list)  # the exact formula, always
    cpu_list: list[list[float]] = field(default_factory=list)  # the organisers' [user, system, idle] %
    ram_mb: list[float] = field(default_factory=list)  # psutil.virtual_memory().used, MiB
    rss_mb: list[float] = field(default_factory=list)  # watched process tree RSS sum, MiB

    def __len__(self) -> int:
        return len(self.t)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Samples":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


# --------------------------------------------------------------------------------------
# NVML probe
# --------------------------------------------------------------------------------------


def default_gpu_index() -> int | str:
    """The device to watch: the first entry of CUDA_VISIBLE_DEVICES, else 0.

    A numeric entry is taken as an NVML index (NVML enumerates in PCI bus order, which is
    CUDA's order only under CUDA_DEVICE_ORDER=PCI_BUS_ID); a ``GPU-...``/``MIG-...`` entry
    is a UUID and is looked up as such.
    """
    first = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
    if first.isdigit():
        return int(first)
    if first.startswith(("GPU-", "MIG-")):
        return first
    return 0


class GpuProbe:
    """An open NVML device handle; :meth:`open` returns ``None`` (one warning) without NVML."""

    def __init__(self, nvml, handle, index: int | str, name: str):
        self._nvml = nvml
        self._handle = handle
        self.index = index
        self.name = name
        self._procs_ok = True

    @classmethod
    def open(cls, index: int | str | None = None) -> "GpuProbe | None":
        index = default_gpu_index() if index is None else index
        try:
            import pynvml

            pynvml.nvmlInit()
        except Exception as exc:  # no library, no driver, no device
            log.warning("NVML unavailable (%s): GPU memory will not be measured", exc)
            return None
        try:
            if isinstance(index, str):
                handle = pynvml.nvmlDeviceGetHandleByUUID(index)
            else:
                handle = pynvml.nvmlDeviceGetHandleByIndex(int(index))
            name = pynvml.nvmlDeviceGetName(handle)
            name = name.decode() if isinstance(name, bytes) else str(name)
            pynvml.nvmlDeviceGetMemoryInfo(handle)
        except Exception as exc:
            log.warning("NVML device %r unusable (%s): GPU memory will not be measured", index, exc)
            pynvml.nvmlShutdown()
            return None
        return cls(pynvml, handle, index, name)

    def device_used_mb(self) -> float:
        """Device-wide memory in use, total minus free, in MiB (as the organisers read it)."""
        info = self._nvml.nvmlDeviceGetMemoryInfo(self._handle)
        return (info.total - info.free) / MIB

    def processes_used_mb(self, pids: set[int]) -> float | None:
        """GPU memory of the given processes as NVML's compute-process list reports it.

        ``None`` where NVML cannot list processes (then never asked again). NVML reports
        PIDs of the host's namespace: inside a container, or for a Docker case (the
        container's processes are not our children), this reads 0.
        """
        if not self._procs_ok:
            return None
        try:
            procs = self._nvml.nvmlDeviceGetComputeRunningProcesses(self._handle)
        except Exception as exc:
            log.info("NVML cannot list compute processes (%s); per-process GPU memory off", exc)
            self._procs_ok = False
            return None
        used = sum((p.usedGpuMemory or 0) for p in procs if p.pid in pids)
        return used / MIB

    def close(self) -> None:
        if self._handle is not None:
            self._handle = None
            try:
                self._nvml.nvmlShutdown()
            except Exception:  # already shut down elsewhere: nothing to release
                pass


# --------------------------------------------------------------------------------------
# The monitor
# --------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _proc_children_available() -> bool:
    """Linux with CONFIG_PROC_CHILDREN: ``/proc/<pid>/task/<tid>/children`` lists children."""
    return os.path.exists(f"/proc/{os.getpid()}/task/{threading.get_native_id()}/children")


def _descendants(pid: int) -> list[int]:
    """PIDs of all descendants of ``pid``.

    On Linux this walks ``/proc/<pid>/task/<tid>/children`` from the root down: a few small
    reads for a small tree, where ``psutil.Process.children`` reads the stat file of every
    process on the machine (about 1 ms of CPU per sample with 80 processes, 10 ms with 1000).
    """
    if not _proc_children_available():
        try:
            return [p.pid for p in psutil.Process(pid).children(recursive=True)]
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return []
    found: list[int] = []
    stack = [pid]
    while stack:
        parent = stack.pop()
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except OSError:  # gone
            continue
        for tid in tasks:
            try:
                with open(f"/proc/{parent}/task/{tid}/children") as f:
                    kids = [int(k) for k in f.read().split()]
            except (OSError, ValueError):
                continue
            found.extend(kids)
            stack.extend(kids)
    return found


class ResourceMonitor:
    """Samples GPU memory, CPU utilisation, RAM and a process tree's RSS in a thread.

    ``gpu``: ``"auto"`` opens NVML on ``gpu_index`` (default :func:`default_gpu_index`) and
    closes it on stop; a :class:`GpuProbe` is used as given and left open (share one across
    many cases); ``None`` measures no GPU. ``pid`` is the root of the process tree whose RSS
    (and GPU memory) is summed; default this process; :meth:`track` changes it while running.
    ``schedule`` and ``cpu_formula``: see the module's docstring (both default to the
    organisers'); the CPU counters are first read when the monitor is created.

    Usage::

        with ResourceMonitor() as mon:
            work()
        figures = mon.figures(time_s)
    """

    def __init__(
        self,
        *,
        interval_s: float = SAMPLE_INTERVAL_S,
        gpu: "GpuProbe | str | None" = "auto",
        gpu_index: int | str | None = None,
        pid: int | None = None,
        cpu_formula: CpuFormula = "organisers",
        schedule: Schedule = "organisers",
    ):
        if interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        if cpu_formula not in CPU_FORMULAS:
            raise ValueError(f"unknown CPU formula {cpu_formula!r}; expected one of {CPU_FORMULAS}")
        if schedule not in SCHEDULES:
            raise ValueError(f"unknown sampling schedule {schedule!r}; expected one of {SCHEDULES}")
        if not (gpu is None or gpu == "auto" or isinstance(gpu, GpuProbe)):
            raise ValueError(f"gpu must be 'auto', None or a GpuProbe, got {gpu!r}")
        self.interval_s = float(interval_s)
        self.cpu_formula = cpu_formula
        self.schedule = schedule
        self._gpu_arg = gpu
        self._gpu_index = gpu_index
        self._gpu: GpuProbe | None = None
        self._owns_gpu = False
        self._gpu_active = False
        self._root_pid = os.getpid() if pid is None else int(pid)
        self._procs: dict[int, psutil.Process] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._t0 = 0.0
        self._cpu_before = psutil.cpu_times()  # as the organisers' script reads it at import
        self.samples = Samples(interval_s=self.interval_s, cpu_formula=cpu_formula, schedule=schedule)
        self.missed_ticks = 0
        self.thread_cpu_s = 0.0  # CPU time of the sampling thread: the monitor's own cost
        self.elapsed_s = 0.0

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> "ResourceMonitor":
        if self._thread is not None:
            raise RuntimeError("ResourceMonitor.start() called twice; make a new monitor per run")
        if self._gpu_arg == "auto":
            self._gpu = GpuProbe.open(self._gpu_index)
            self._owns_gpu = self._gpu is not None
        elif isinstance(self._gpu_arg, GpuProbe):
            self._gpu = self._gpu_arg
        if self._gpu is not None:
            self._gpu_active = True
            self.samples.gpu_mb = []
            self.samples.gpu_process_mb = []
        if self.schedule == "grid":
            self._cpu_before = psutil.cpu_times()
        self._t0 = time.perf_counter()
        self._thread = threading.Thread(target=self._loop, name="ResourceMonitor", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> Samples:
        """Stop sampling (idempotent). A run shorter than one interval still gets one sample."""
        if self._thread is None:
            raise RuntimeError("ResourceMonitor.stop() before start()")
        if not self._stop.is_set():
            self._stop.set()
            self._thread.join()
            self.elapsed_s = time.perf_counter() - self._t0
            if len(self.samples) == 0:
                self._sample()
            if self._owns_gpu and self._gpu is not None:
                self._gpu.close()
        return self.samples

    def __enter__(self) -> "ResourceMonitor":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def track(self, pid: int) -> None:
        """Follow the process tree rooted at ``pid`` from the next sample on."""
        with self._lock:
            self._root_pid = int(pid)
            self._procs = {}

    # -- sampling ----------------------------------------------------------------------

    def _loop(self) -> None:
        c0 = time.thread_time()
        try:
            self._run_ticks()
        finally:
            self.thread_cpu_s = time.thread_time() - c0

    def _run_ticks(self) -> None:
        if self.schedule == "organisers":  # sample now, sleep 0.1 s, repeat (their loop)
            while True:
                self._sample()
                if self._stop.wait(self.interval_s):
                    return
        k = 1
        while True:
            deadline = self._t0 + k * self.interval_s
            if self._stop.wait(max(0.0, deadline - time.perf_counter())):
                return
            self._sample()
            # next tick strictly in the future; a late sample skips ticks rather than bunching
            now = time.perf_counter()
            k_next = k + 1
            if now > self._t0 + k_next * self.interval_s:
                late = int((now - self._t0) / self.interval_s) + 1
                self.missed_ticks += late - k_next
                k_next = late
            k = k_next

    def _tree(self) -> list[psutil.Process]:
        with self._lock:
            root_pid = self._root_pid
            cache = self._procs
        pids = [root_pid] + _descendants(root_pid)
        # keep psutil.Process objects between samples (cheap re-reads, stable identity)
        fresh = {}
        for pid in pids:
            proc = cache.get(pid)
            if proc is None:
                try:
                    proc = psutil.Process(pid)
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
            fresh[pid] = proc
        with self._lock:
            if self._root_pid == root_pid:
                self._procs = fresh
        return list(fresh.values())

    def _sample(self) -> None:
        t = time.perf_counter() - self._t0
        cpu_now = psutil.cpu_times()
        shares = cpu_shares_organisers(self._cpu_before, cpu_now)
        exact = cpu_busy_percent(self._cpu_before, cpu_now, "exact")
        self._cpu_before = cpu_now
        ram = psutil.virtual_memory().used / MIB
        procs = self._tree()
        rss = 0
        for p in procs:
            try:
                rss += p.memory_info().rss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        gpu_dev = gpu_proc = None
        if self._gpu is not None and self._gpu_active:
            try:
                gpu_dev = self._gpu.device_used_mb()
                gpu_proc = self._gpu.processes_used_mb({p.pid for p in procs})
            except Exception as exc:
                # the series then ends early (shorter than t); figures use what was read
                log.warning("NVML memory query failed (%s); GPU sampling stopped", exc)
                self._gpu_active = False
        s = self.samples
        if gpu_dev is not None:
            s.gpu_mb.append(gpu_dev)
            s.gpu_process_mb.append(gpu_proc)
        s.t.append(t)
        s.cpu_percent.append(100.0 - shares[2] if self.cpu_formula == "organisers" else exact)
        s.cpu_percent_exact.append(exact)
        s.cpu_list.append(shares)
        s.ram_mb.append(ram)
        s.rss_mb.append(rss / MIB)

    # -- results -----------------------------------------------------------------------

    @property
    def gpu_name(self) -> str | None:
        probe = self._gpu_arg if isinstance(self._gpu_arg, GpuProbe) else self._gpu
        return probe.name if probe is not None else None

    def figures(self, time_s: float | None = None) -> Figures:
        """Figures of what was sampled; ``time_s`` defaults to the monitor's own run time."""
        return compute_figures(self.samples, self.elapsed_s if time_s is None else time_s)

    def to_dict(self, time_s: float | None = None) -> dict:
        """JSON-able record: the samples, the figures and how the sampling went."""
        return {
            "figures": self.figures(time_s).to_dict(),
            "samples": self.samples.to_dict(),
            "gpu_name": self.gpu_name,
            "missed_ticks": self.missed_ticks,
            "thread_cpu_s": self.thread_cpu_s,
            "monitor_elapsed_s": self.elapsed_s,
        }
