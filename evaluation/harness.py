"""`flare22 efficiency`: run a predictor once per case and measure it as the FLARE22 organisers do.

For every ``*_0000`` CT in ``--input`` the harness copies that case alone into a fresh
temporary input folder, starts the command with a fresh temporary output folder, and
measures it with :class:`evaluation.efficiency.ResourceMonitor` (REFERENCE section 3), the way the
organisers' scripts do (JunMa11/FLARE, ``FLARE22/Evaluation/resource_eval.py``,
``Efficiency.py`` and ``load_json.py``; FLARE23 and FLARE24 alike): the first sample is taken
as the monitor starts, just before the process, then one every 0.1 s plus the query's time;
Time runs from just before the process starts until the samples are saved (``<case>.json``
in their form: ``gpu_memory``, ``cpu_list``, ``RAM_list``, ``time``), so process start-up,
model loading and CUDA initialisation count (with ``--image`` a fresh container per case).
The output folder is made as their script makes it: FLARE22 ``os.makedirs`` (0755 under the
usual umask, owned by whoever runs the harness), FLARE23/24 ``chmod -R 777``. What the
command writes is moved into ``--output``; the prediction is expected as ``<case>.nii.gz``.

``--edition 22|23|24`` picks their column names, GPU-memory rule and Docker flags (FLARE23/24
add ``--shm-size=28gb -m 28G``). Which figures follow their code and which their rules' text:
see :mod:`evaluation.efficiency`.

Two ways to run a case:

* ``--image TAG``: the organisers' command,
  ``docker container run --gpus="device=N" --name NAME --rm -v IN:/workspace/inputs/
  -v OUT:/workspace/outputs/ TAG /bin/bash -c "sh predict.sh"`` (FLARE23/24:
  ``--shm-size=28gb -m 28G`` first). ``--engine podman`` runs it with podman and the flags
  machines without a Docker daemon need (docs/efficiency.md); ``--no-gpu`` drops ``--gpus``;
  ``--network-none`` adds ``--network=none``.
* local (default ``bash predict.sh``, or ``--command "..."`` run with ``bash -c``), with
  ``FLARE22_INPUT`` and ``FLARE22_OUTPUT`` set to the case's folders (and ``FLARE22_BUNDLE``
  with ``--bundle``; ``CUDA_VISIBLE_DEVICES`` with ``--gpu``).

A case's status is ``ok``, ``failed`` (non-zero exit), ``no_output`` (exit 0 but no
``<case>.nii.gz``), ``timeout`` (killed after ``--timeout`` s and charged the organisers'
hang figures) or ``error`` (could not be started). A bad case never stops the others; the
exit code is 0 only when every case is ``ok``.

Report (``--report``): ``<case>.json`` (samples, figures, status, exit code, command),
``<case>.log`` (the command's stdout and stderr), ``<case>_GPU-Time.png``,
``<case>_CPU-Time.png``, ``<case>_RAM-Time.png``, ``efficiency.csv`` (one row per case, the
organisers' columns and rounding), ``efficiency.json`` (the run) and ``summary.md`` (one table
of DSC, NSD, Time, AUC GPU, AUC CPU, GPU memory and RAM). With ``--gt`` every case is scored
with :mod:`evaluation.scoring` (a missing prediction is scored as an empty one; a timed-out case
scores DSC = NSD = 0, the organisers' charge for a hang).
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, Sequence

import psutil

from app.argtypes import existing_dir, nonneg_int, positive_float
from app.ctio import case_name, list_cases
from evaluation.efficiency import (
    CPU_FORMULAS,
    EDITIONS,
    SCHEDULES,
    Figures,
    GpuProbe,
    ResourceMonitor,
    default_gpu_index,
    hang_figures,
    organisers_record,
)

log = logging.getLogger(__name__)

DOCKER_INPUTS = "/workspace/inputs/"
DOCKER_OUTPUTS = "/workspace/outputs/"
DEFAULT_LOCAL = ("bash", "predict.sh")
# what FLARE23/24's command adds (Docker's default /dev/shm is 64 MB)
EDITION_DOCKER_FLAGS = {22: (), 23: ("--shm-size=28gb", "-m", "28G"), 24: ("--shm-size=28gb", "-m", "28G")}
# podman on machines without a Docker daemon (setrlimit not permitted, hybrid cgroups);
# FLARE22_PODMAN replaces the podman command (docker/engine.sh picks the store and prints it)
ENGINES = {
    "docker": ("docker",),
    "podman": tuple(shlex.split(os.environ.get(
        "FLARE22_PODMAN", "podman --runtime=runc --storage-driver=vfs --cgroup-manager=cgroupfs"))),
}
ENGINE_RUN_FLAGS = {"docker": (), "podman": ("--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024")}


# --------------------------------------------------------------------------------------
# How a case is started
# --------------------------------------------------------------------------------------


class CaseCommand(Protocol):
    def build(self, input_dir: Path, output_dir: Path, case: str) -> tuple[list[str], dict | None]:
        """The argv and environment (``None``: inherit) that run one case."""

    def kill(self, case: str) -> None:
        """Extra clean-up after the process group of a timed-out case was killed."""


def container_name(prefix: str, case: str) -> str:
    """A Docker container name for one case (Docker allows ``[a-zA-Z0-9][a-zA-Z0-9_.-]*``)."""
    name = re.sub(r"[^a-zA-Z0-9_.-]", "_", f"{prefix}_{case}".lower())
    return name if name[0].isalnum() else f"c{name}"


def docker_command(
    image: str, input_dir: str | os.PathLike, output_dir: str | os.PathLike, *, gpu: int | None = 0,
    name: str | None = None, edition: int = 22, engine: str = "docker", network_none: bool = False,
) -> list[str]:
    """The organisers' per-case command as an argv list (no shell in between).

    ``--gpus="device=N"`` in their shell line reaches Docker as ``--gpus=device=N``
    (``gpu=None``: left out, for machines without a GPU); the folders are bind-mounted by
    absolute path. ``engine`` and ``network_none`` add only what this machine needs.
    """
    if edition not in EDITIONS:
        raise ValueError(f"unknown FLARE edition {edition!r}; expected one of {EDITIONS}")
    argv = [*ENGINES[engine], "container", "run", *ENGINE_RUN_FLAGS[engine]]
    if network_none:
        argv.append("--network=none")
    argv += EDITION_DOCKER_FLAGS[edition]
    if gpu is not None:
        argv.append(f"--gpus=device={int(gpu)}")
    if name:
        argv += ["--name", name]
    argv += [
        "--rm",
        "-v", f"{Path(input_dir).resolve()}/:{DOCKER_INPUTS}",
        "-v", f"{Path(output_dir).resolve()}/:{DOCKER_OUTPUTS}",
        image,
        "/bin/bash", "-c", "sh predict.sh",
    ]
    return argv


@dataclass(frozen=True)
class DockerCommand:
    image: str
    gpu: int | None = 0
    name_prefix: str = "flare22_eff"
    edition: int = 22
    engine: str = "docker"
    network_none: bool = False

    def build(self, input_dir: Path, output_dir: Path, case: str) -> tuple[list[str], dict | None]:
        name = container_name(self.name_prefix, case)
        return docker_command(self.image, input_dir, output_dir, gpu=self.gpu, name=name, edition=self.edition,
                              engine=self.engine, network_none=self.network_none), None

    def kill(self, case: str) -> None:
        # killing the docker client does not stop the container
        subprocess.run(
            [*ENGINES[self.engine], "kill", container_name(self.name_prefix, case)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False,
        )


@dataclass(frozen=True)
class LocalCommand:
    argv: tuple[str, ...] = DEFAULT_LOCAL
    bundle: str | None = None
    gpu: int | None = None

    @classmethod
    def from_string(cls, command: str, **kw) -> "LocalCommand":
        return cls(argv=("bash", "-c", command), **kw)

    def build(self, input_dir: Path, output_dir: Path, case: str) -> tuple[list[str], dict | None]:
        env = dict(os.environ, FLARE22_INPUT=str(input_dir), FLARE22_OUTPUT=str(output_dir))
        if self.bundle is not None:
            env["FLARE22_BUNDLE"] = str(self.bundle)
        if self.gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = str(self.gpu)
        return list(self.argv), env

    def kill(self, case: str) -> None:
        return None


# --------------------------------------------------------------------------------------
# One case
# --------------------------------------------------------------------------------------


@dataclass
class CaseResult:
    case: str
    input_name: str
    status: str
    returncode: int | None
    figures: Figures
    measured: Figures  # what the monitor saw (differs from ``figures`` only for a timeout)
    command: list[str]
    prediction: str | None = None
    error: str | None = None
    dsc: float | None = None
    nsd: float | None = None
    monitor: dict = field(default_factory=dict)
    record: dict = field(default_factory=dict)  # the organisers' JSON form of the case

    def summary(self) -> dict:
        """The case without its sample series."""
        return {
            "case": self.case, "input": self.input_name, "status": self.status,
            "returncode": self.returncode, "error": self.error, "prediction": self.prediction,
            "DSC": self.dsc, "NSD": self.nsd, "figures": self.figures.to_dict(),
        }

    def to_dict(self) -> dict:
        """Ours, plus the keys their ``load_json.py`` reads (gpu_memory, cpu_list, RAM_list, time)."""
        return {
            **self.record,
            **self.summary(),
            "command": self.command,
            "measured_figures": self.measured.to_dict(),
            "monitor": self.monitor,
        }


def _move_contents(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for item in sorted(src.iterdir()):
        target = dst / item.name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()
        shutil.move(str(item), str(target))


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def run_case(
    input_file: str | os.PathLike,
    output_dir: str | os.PathLike,
    report_dir: str | os.PathLike,
    command: CaseCommand,
    *,
    gpu: GpuProbe | None = None,
    timeout_s: float | None = None,
    cpu_formula: str = "organisers",
    schedule: str = "organisers",
    edition: int = 22,
    workdir: str | os.PathLike | None = None,
) -> CaseResult:
    """Run ``command`` on one case alone and measure it. Never raises for a bad case."""
    input_file = Path(input_file)
    output_dir, report_dir = Path(output_dir), Path(report_dir)
    case = case_name(input_file)
    output_dir.mkdir(parents=True, exist_ok=True)
    report_dir.mkdir(parents=True, exist_ok=True)
    prediction = output_dir / f"{case}.nii.gz"
    if prediction.is_file():  # a stale one must not pass for this run's
        log.info("%s: removing the previous %s", case, prediction)
        prediction.unlink()
    with tempfile.TemporaryDirectory(prefix=f"flare22-eff-{case}-", dir=workdir) as tmp:
        os.chmod(tmp, 0o755)  # mkdtemp makes 0700: a container's user must reach the mounts
        in_dir, out_dir = Path(tmp) / "inputs", Path(tmp) / "outputs"
        # as their scripts make them: os.makedirs (0777 & ~umask); FLARE23/24 chmod -R 777 outputs/
        os.makedirs(in_dir)
        os.makedirs(out_dir)
        if edition != 22:
            os.chmod(out_dir, 0o777)
        monitor = ResourceMonitor(gpu=gpu, cpu_formula=cpu_formula, schedule=schedule)
        shutil.copy(input_file, in_dir / input_file.name)
        argv, env = command.build(in_dir, out_dir, case)
        log_path = report_dir / f"{case}.log"
        status, returncode, error = "ok", None, None
        exit_s = None
        with open(log_path, "wb") as log_file:
            monitor.start()
            t0 = time.perf_counter()
            try:
                proc = subprocess.Popen(
                    argv, env=env, stdin=subprocess.DEVNULL, stdout=log_file,
                    stderr=subprocess.STDOUT, start_new_session=True,
                )
            except OSError as exc:
                monitor.stop()
                status, error = "error", f"could not start {argv[0]!r}: {exc}"
            else:
                monitor.track(proc.pid)
                try:
                    returncode = proc.wait(timeout=timeout_s)
                except subprocess.TimeoutExpired:
                    _kill_group(proc)
                    command.kill(case)
                    status, error = "timeout", f"killed after {timeout_s} s"
                except BaseException:  # Ctrl-C: leave nothing running behind
                    _kill_group(proc)
                    command.kill(case)
                    monitor.stop()
                    raise
                exit_s = time.perf_counter() - t0
                monitor.stop()
            # their Time stops once the samples are saved (the full record replaces this file)
            record_path = report_dir / f"{case}.json"
            record_path.write_text(json.dumps(organisers_record(monitor.samples, 0.0), indent=4))
            elapsed = time.perf_counter() - t0
        if status == "ok" and returncode != 0:
            status, error = "failed", f"exit code {returncode}"
        if status != "timeout":  # what a hung case left half-written is dropped
            _move_contents(out_dir, output_dir)
    have_prediction = prediction.is_file()
    if status == "ok" and not have_prediction:
        status, error = "no_output", f"exit code 0 but no {prediction.name} written"
    measured = monitor.figures(elapsed)
    result = CaseResult(
        case=case, input_name=input_file.name, status=status, returncode=returncode,
        figures=hang_figures() if status == "timeout" else measured, measured=measured,
        command=argv, prediction=str(prediction) if have_prediction else None, error=error,
        monitor={**monitor.to_dict(elapsed), "exit_s": exit_s},
        record=organisers_record(monitor.samples, elapsed),
    )
    log.info("%s: %s in %.2f s (%s)", case, status, elapsed, shlex.join(argv))
    return result


# --------------------------------------------------------------------------------------
# Scoring (optional)
# --------------------------------------------------------------------------------------


def score_prediction(
    case: str, prediction: str | os.PathLike | None, gt_file: str | os.PathLike,
    *, official_crop_off_by_one: bool = False,
) -> tuple[float, float]:
    """Mean DSC and NSD over the 13 organs of one case, by :func:`evaluation.scoring.score_files`.

    A missing prediction is scored as an empty one (as ``flare22 evaluate`` does); organs
    that come out NaN (only with the official off-by-one crop) are left out of the mean.
    """
    from evaluation.scoring import score_files  # lazily: only with --gt

    scored = score_files(case, None if prediction is None else Path(prediction), Path(gt_file),
                         official_crop_off_by_one=official_crop_off_by_one)
    means = []
    for k in (0, 1):
        values = [v[k] for v in scored.scores.values() if not math.isnan(v[k])]
        means.append(sum(values) / len(values) if values else math.nan)
    return means[0], means[1]


def score_results(
    results: Sequence[CaseResult], gt_dir: str | os.PathLike, *, official_crop_off_by_one: bool = False
) -> None:
    """Add DSC and NSD to every result with a ground truth ``<gt_dir>/<case>.nii.gz``.

    A timed-out case scores DSC = NSD = 0 (the organisers' rule for a hang); a prediction
    that cannot be scored (unreadable, off the ground truth's grid) also scores 0, 0, with
    the reason added to the case's error.
    """
    for r in results:
        gt_file = Path(gt_dir) / f"{r.case}.nii.gz"
        if not gt_file.is_file():
            log.warning("%s: no ground truth %s; DSC/NSD left out", r.case, gt_file)
            continue
        if r.status == "timeout":
            r.dsc, r.nsd = 0.0, 0.0
            continue
        try:
            r.dsc, r.nsd = score_prediction(r.case, r.prediction, gt_file,
                                            official_crop_off_by_one=official_crop_off_by_one)
        except Exception as exc:  # InputError: off the grid, unreadable
            log.warning("%s: scoring failed (%s); counted as DSC = NSD = 0", r.case, exc)
            r.dsc, r.nsd = 0.0, 0.0
            r.error = "; ".join(filter(None, [r.error, f"scoring: {exc}"]))


# --------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------


def plot_case(result: CaseResult, report_dir: str | os.PathLike) -> list[Path]:
    """The GPU memory, CPU and RAM curves of one case, named like the organisers' plots."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        log.warning("matplotlib not installed: no plots")
        return []
    s = result.monitor.get("samples", {})
    dt = s.get("interval_s", 0.1)
    ts = s.get("t") or []  # when each sample was taken, s after the monitor started
    fig_mem = result.measured.gpu_mem_mb
    curves = [
        ("GPU-Time", "GPU memory (MB)", [("device", s.get("gpu_mb")), ("process tree", s.get("gpu_process_mb"))]),
        ("CPU-Time", "CPU utilisation (%)", [("100 - idle", s.get("cpu_percent"))]),
        ("RAM-Time", "RAM (MB)", [("used (machine)", s.get("ram_mb")), ("RSS (process tree)", s.get("rss_mb"))]),
    ]
    paths = []
    for suffix, ylabel, series in curves:
        fig = Figure(figsize=(6.4, 3.6), dpi=100)
        ax = fig.add_subplot()
        drawn = False
        for label, ys in series:
            if not ys:
                continue
            xs = ts if len(ts) >= len(ys) else [i * dt for i in range(len(ys))]
            pts = [(x, y) for x, y in zip(xs, ys) if y is not None]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], label=label)
                drawn = True
        if suffix == "GPU-Time" and drawn:
            ax.axhline(2048, color="grey", ls=":", label="2 GB tolerance")
            if fig_mem is not None:
                ax.axhline(fig_mem, color="red", ls="--", label=f"GPU_Mem {fig_mem:.0f}")
        if not drawn:
            ax.text(0.5, 0.5, "not measured (no NVML)" if suffix == "GPU-Time" else "no samples",
                    ha="center", va="center", transform=ax.transAxes)
        else:
            ax.legend(loc="best", fontsize="small")
        ax.set_xlabel("Time (s)")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{result.case}: {result.status}, {result.measured.time_s:.2f} s")
        fig.tight_layout()
        path = Path(report_dir) / f"{result.case}_{suffix}.png"
        fig.savefig(path)
        paths.append(path)
    return paths


def csv_columns(edition: int = 22) -> list[str]:
    """The organisers' columns of ``edition`` in their order, then ours."""
    return ["Name", *Figures.columns(edition), "DSC", "NSD", "Status", "ReturnCode"]


def write_csv(results: Sequence[CaseResult], path: str | os.PathLike, edition: int = 22) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=csv_columns(edition))
        writer.writeheader()
        for r in results:
            row = {"Name": r.input_name, **r.figures.to_row(edition)}
            row.update(
                DSC=None if r.dsc is None else round(r.dsc, 4),
                NSD=None if r.nsd is None else round(r.nsd, 4),
                Status=r.status, ReturnCode=r.returncode,
            )
            writer.writerow({k: "" if v is None else v for k, v in row.items()})
    return Path(path)


# summary.md: (header, value of a result, format)
SUMMARY_COLUMNS = [
    ("DSC", lambda r: r.dsc, "{:.4f}"),
    ("NSD", lambda r: r.nsd, "{:.4f}"),
    ("Time (s)", lambda r: r.figures.time_s, "{:.2f}"),
    ("AUC GPU 2 GB tol. (MB s)", lambda r: r.figures.auc_gpu_time_2gb, "{:.0f}"),
    ("AUC GPU (MB s)", lambda r: r.figures.auc_gpu_time, "{:.0f}"),
    ("AUC CPU (% s)", lambda r: r.figures.auc_cpu_time, "{:.2f}"),
    ("GPU_Mem (MB)", lambda r: r.figures.gpu_mem_mb, "{:.0f}"),
    ("MaxGPU_Mem (MB)", lambda r: r.figures.gpu_mem_max_mb, "{:.0f}"),
    ("RAM (MB)", lambda r: r.figures.ram_mb, "{:.2f}"),
]


def _fmt(value, fmt: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else fmt.format(value)


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def summary_markdown(results: Sequence[CaseResult], run_info: dict) -> str:
    lines = [
        "# FLARE22 efficiency",
        "",
        f"- command: `{run_info['command']}`",
        f"- machine: {run_info['machine']}",
        f"- GPU: {run_info['gpu'] or 'not measured (no NVML)'}",
        f"- FLARE{run_info.get('edition', 22)} columns; CPU formula: {run_info['cpu_formula']}; "
        f"samples every {run_info['interval_s']} s ({run_info.get('schedule', 'organisers')} schedule)",
        f"- cases: {len(results)}, ok: {sum(r.status == 'ok' for r in results)}",
        "",
        "| Case | " + " | ".join(h for h, _, _ in SUMMARY_COLUMNS) + " | Status |",
        "|---|" + "---:|" * len(SUMMARY_COLUMNS) + "---|",
    ]
    for r in results:
        cells = [_fmt(get(r), fmt) for _, get, fmt in SUMMARY_COLUMNS]
        lines.append(f"| {r.case} | " + " | ".join(cells) + f" | {r.status} |")
    if results:
        means = [_fmt(_mean(get(r) for r in results), fmt) for _, get, fmt in SUMMARY_COLUMNS]
        lines.append("| **mean** | " + " | ".join(means) + " | |")
    lines += [
        "",
        "DSC, NSD, Time, AUC GPU (with the 2 GB tolerance) and AUC CPU are the five FLARE22",
        "ranking metrics. A timed-out case is charged the organisers' hang figures.",
        "",
    ]
    return "\n".join(lines)


def write_report(results: Sequence[CaseResult], report_dir: str | os.PathLike, run_info: dict) -> None:
    report_dir = Path(report_dir)
    for r in results:
        (report_dir / f"{r.case}.json").write_text(json.dumps(r.to_dict(), indent=1))
        plot_case(r, report_dir)
    write_csv(results, report_dir / "efficiency.csv", run_info.get("edition", 22))
    run_record = {**run_info, "cases": [r.summary() for r in results]}
    (report_dir / "efficiency.json").write_text(json.dumps(run_record, indent=1))
    (report_dir / "summary.md").write_text(summary_markdown(results, run_info))


# --------------------------------------------------------------------------------------
# All cases
# --------------------------------------------------------------------------------------


def run_cases(
    inputs: Sequence[str | os.PathLike],
    output_dir: str | os.PathLike,
    report_dir: str | os.PathLike,
    command: CaseCommand,
    *,
    gpu_index: int | str | None = None,
    measure_gpu: bool = True,
    timeout_s: float | None = None,
    cpu_formula: str = "organisers",
    schedule: str = "organisers",
    edition: int = 22,
    gt_dir: str | os.PathLike | None = None,
    official_crop_off_by_one: bool = False,
) -> list[CaseResult]:
    """Run every case in turn, score it (with ``gt_dir``) and write the report."""
    output_dir, report_dir = Path(output_dir), Path(report_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    report_dir.mkdir(parents=True, exist_ok=True)
    probe = GpuProbe.open(gpu_index) if measure_gpu else None  # one NVML session, one warning
    try:
        results = [
            run_case(f, output_dir, report_dir, command, gpu=probe, timeout_s=timeout_s, cpu_formula=cpu_formula,
                     schedule=schedule, edition=edition)
            for f in inputs
        ]
    finally:
        if probe is not None:
            probe.close()
    if gt_dir is not None:
        score_results(results, gt_dir, official_crop_off_by_one=official_crop_off_by_one)
    mem = psutil.virtual_memory().total / 2**30
    run_info = {
        "command": shlex.join(results[0].command) if results else "",
        "machine": f"{platform.node()}, {psutil.cpu_count()} logical CPUs, {mem:.1f} GiB RAM",
        "gpu": None if probe is None else f"{probe.name} (NVML index {probe.index})",
        "cpu_formula": cpu_formula,
        "schedule": schedule,
        "edition": edition,
        "interval_s": 0.1,
        "timeout_s": timeout_s,
    }
    write_report(results, report_dir, run_info)
    return results


# --------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", type=existing_dir, required=True, help="folder of *_0000 CTs")
    parser.add_argument("--output", type=Path, required=True, help="predictions land here as <case>.nii.gz")
    parser.add_argument("--report", type=Path, required=True, help="per-case JSON, CSV, plots, summary.md")
    parser.add_argument("--gt", type=existing_dir, default=None, help="ground-truth labels: adds DSC and NSD")
    how = parser.add_mutually_exclusive_group()
    how.add_argument("--image", default=None, help="Docker image tag: run the organisers' docker command")
    how.add_argument("--command", default=None,
                     help="local command run with bash -c (default: bash predict.sh), "
                          "with FLARE22_INPUT / FLARE22_OUTPUT set")
    parser.add_argument("--gpu", type=nonneg_int, default=None,
                        help="GPU index: --gpus device=N for Docker, CUDA_VISIBLE_DEVICES locally, "
                             "and the device the monitor reads (default 0, or CUDA_VISIBLE_DEVICES)")
    parser.add_argument("--bundle", default=None, help="sets FLARE22_BUNDLE for a local command")
    parser.add_argument("--timeout", type=positive_float, default=None,
                        help="seconds before a case counts as hung (killed, charged 3600 s)")
    parser.add_argument("--edition", type=int, choices=EDITIONS, default=22,
                        help="the organisers' column names, GPU-memory rule and docker flags of FLARE22, 23 or 24")
    parser.add_argument("--cpu-formula", choices=CPU_FORMULAS, default="organisers",
                        help="CPU_Utilization / AUC_CPU_Time by their script's formula (default) or the exact "
                             "one (always in the *_Exact columns too; see evaluation.efficiency)")
    parser.add_argument("--schedule", choices=SCHEDULES, default="organisers",
                        help="their sampling loop (a sample, then 0.1 s sleep) or a fixed 0.1 s grid")
    parser.add_argument("--engine", choices=sorted(ENGINES), default="docker",
                        help="with --image: docker, or podman with the flags docs/efficiency.md gives")
    parser.add_argument("--network-none", action="store_true", help="with --image: add --network=none")
    parser.add_argument("--official-off-by-one", action="store_true",
                        help="with --gt: crop aorta, IVC and oesophagus as the official script does")
    parser.add_argument("--no-gpu", action="store_true",
                        help="do not query NVML; with --image, leave --gpus out of the command")


def run(args: argparse.Namespace) -> int:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    inputs = list_cases(args.input)
    if not inputs:
        log.error("no *_0000 CT found in %s", args.input)
        return 2
    gpu_index = default_gpu_index() if args.gpu is None else args.gpu
    if args.image:
        if args.bundle:
            log.warning("--bundle is ignored with --image: the image carries its model")
        gpu_index = 0 if args.gpu is None else args.gpu  # the device the container gets
        command: CaseCommand = DockerCommand(args.image, gpu=None if args.no_gpu else gpu_index,
                                             edition=args.edition, engine=args.engine,
                                             network_none=args.network_none)
    elif args.command:
        command = LocalCommand.from_string(args.command, bundle=args.bundle, gpu=args.gpu)
    else:
        if not Path(DEFAULT_LOCAL[1]).is_file():
            log.error("%s not found in %s; pass --command or --image", DEFAULT_LOCAL[1], Path.cwd())
            return 2
        command = LocalCommand(bundle=args.bundle, gpu=args.gpu)
    results = run_cases(
        inputs, args.output, args.report, command, gpu_index=gpu_index, measure_gpu=not args.no_gpu,
        timeout_s=args.timeout, cpu_formula=args.cpu_formula, schedule=args.schedule, edition=args.edition,
        gt_dir=args.gt,
        official_crop_off_by_one=args.official_off_by_one,
    )
    bad = [r.case for r in results if r.status != "ok"]
    if bad:
        log.error("%d of %d cases not ok: %s", len(bad), len(results), ", ".join(bad))
    log.info("report: %s", Path(args.report) / "summary.md")
    return 1 if bad else 0
