"""The organisers' efficiency figures on known series, the monitor, and the per-case harness."""
from __future__ import annotations

import csv
import json
import logging
import os
import shlex
import stat
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import psutil
import pytest
import SimpleITK as sitk

from flare22 import cli
from evaluation.efficiency import (
    MIB,
    GpuProbe,
    ResourceMonitor,
    Samples,
    auc,
    compute_figures,
    cpu_busy_percent,
    default_gpu_index,
    figures_from_organisers_record,
    gpu_tolerant,
    hang_figures,
    organisers_record,
    spike_filtered_max,
)
from evaluation import harness

# ---------------------------------------------------------------------------------------
# Figures on known series
# ---------------------------------------------------------------------------------------


def known_samples() -> Samples:
    return Samples(
        t=[0.1 * (i + 1) for i in range(100)],
        gpu_mb=[1000.0] * 10 + [3000.0] * 88 + [9000.0] * 2,
        gpu_process_mb=[None] * 50 + [700.0] * 50,
        cpu_percent=[25.0] * 50 + [75.0] * 50,
        ram_mb=[2000.0] * 99 + [2500.0],
        rss_mb=[100.0] * 99 + [300.0],
    )


def test_figures_on_a_known_series_are_exact():
    f = compute_figures(known_samples(), time_s=10.25)
    assert f.time_s == 10.25
    # 9000 occurs in exactly 2 % of the samples (2 of 100): filtered as a spike
    assert f.gpu_mem_mb == 3000.0
    assert f.auc_gpu_time == 29200.0  # (10 x 1000 + 88 x 3000 + 2 x 9000) x 0.1
    assert f.auc_gpu_time_2gb == 9768.0  # (88 x 952 + 2 x 6952) x 0.1
    assert f.cpu_utilization == 75.0
    assert f.auc_cpu_time == 500.0  # (50 x 25 + 50 x 75) x 0.1
    assert f.ram_mb == 2500.0
    assert f.auc_ram_time == 20050.0  # (99 x 2000 + 2500) x 0.1
    assert f.gpu_process_max_mb == 700.0
    assert f.rss_max_mb == 300.0
    assert f.n_samples == 100


def test_figures_dict_row_and_roundtrip():
    s = known_samples()
    s.ram_mb[-1] = 2500.456
    f = compute_figures(s, time_s=10.256)
    d = f.to_dict()
    # the organisers' FLARE22 columns in their order, then ours
    assert list(d)[:8] == ["Time", "GPU_Mem", "AUC_GPU_Time", "CPU_Utilization", "AUC_CPU_Time",
                           "RAM", "AUC_RAM_Time", "AUC_GPU_Time_2GB"]
    # FLARE23/24: renamed, and GPU memory is the plain maximum (no 2 % spike rule)
    d23 = f.to_dict(23)
    assert list(d23)[:7] == ["Time", "MaxGPU_Mem", "AUC_GPU_Time", "MaxCPU_Utilization", "AUC_CPU_Time",
                             "MaxRAM", "AUC_RAM_Time"]
    assert d["GPU_Mem"] == 3000.0 and d23["MaxGPU_Mem"] == 9000.0 and f.to_dict(24) == d23
    with pytest.raises(ValueError, match="edition"):
        f.to_dict(21)
    row = f.to_row()  # the organisers' rounding
    assert row["Time"] == 10.26 and row["RAM"] == 2500.46 and row["AUC_RAM_Time"] == 20050.0
    back = Samples.from_dict(json.loads(json.dumps(s.to_dict())))
    assert back == s


def test_no_gpu_and_empty_series_give_none():
    s = Samples(cpu_percent=[10.0, 30.0], ram_mb=[1.0, 2.0], rss_mb=[1.0, 1.0], t=[0.1, 0.2])
    f = compute_figures(s, time_s=0.2)
    assert f.gpu_mem_mb is None and f.auc_gpu_time is None and f.auc_gpu_time_2gb is None
    assert f.cpu_utilization == 30.0 and f.auc_cpu_time == 4.0
    empty = compute_figures(Samples(), time_s=0.05)
    assert empty.cpu_utilization is None and empty.ram_mb is None and empty.n_samples == 0


def test_tolerance_and_auc():
    assert gpu_tolerant([0.0, 2048.0, 2049.0, 4096.0]) == [0.0, 0.0, 1.0, 2048.0]
    assert auc([10.0, 20.0, 30.0]) == 6.0
    assert auc([10.0, 20.0], interval_s=0.5) == 15.0


def test_hang_figures_are_the_organisers_charge():
    h = hang_figures()
    assert h.time_s == 3600.0
    assert h.auc_gpu_time_2gb == 3600.0 * 8192.0
    assert h.auc_cpu_time == 360000.0


# ---------------------------------------------------------------------------------------
# The 2 % rule
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "series, expected",
    [
        ([100.0] * 48 + [900.0], 900.0),  # n = 49 < 50: a single sample is > 2 %: not filtered
        ([100.0] * 48 + [200.0, 300.0], 100.0),  # n = 50: once is exactly 2 %: filtered
        ([100.0] * 47 + [200.0, 200.0, 300.0], 200.0),  # n = 50: twice is 4 %: kept
        ([100.0] * 98 + [500.0] * 2, 100.0),  # n = 100: 2 of 100 is not > 2 %
        ([100.0] * 97 + [500.0] * 3, 500.0),  # n = 100: 3 of 100 is
        ([7.0], 7.0),
        ([3000.0, 1000.0], 3000.0),
    ],
)
def test_spike_rule_edges(series, expected):
    assert spike_filtered_max(series) == expected


def test_spike_rule_integer_test_equals_the_organisers_float_test():
    for n in range(1, 1201):
        for c in (n // 50 - 1, n // 50, n // 50 + 1):
            if c < 1:
                continue
            series = [1.0] * (n - c) + [2.0] * c
            organisers = max(v for v in set(series) if series.count(v) > 0.02 * len(series)) if (
                c > 0.02 * n or (n - c) > 0.02 * n) else None
            assert spike_filtered_max(series) == organisers, (n, c)


def test_spike_rule_without_a_frequent_value_falls_back_to_the_max(caplog):
    series = [float(v) for v in range(60)]  # n = 60, every value once: nothing > 1.2
    with caplog.at_level(logging.WARNING, logger="evaluation.efficiency"):
        assert spike_filtered_max(series) == 59.0
    assert "unfiltered maximum" in caplog.text
    assert spike_filtered_max([]) is None


# ---------------------------------------------------------------------------------------
# CPU formula
# ---------------------------------------------------------------------------------------


def cpu_times(**fields):
    cls = type(psutil.cpu_times())
    return cls(**{name: float(fields.get(name, 0.0)) for name in cls._fields})


def test_cpu_busy_percent_exact_and_organisers():
    before = cpu_times()
    after = cpu_times(user=3, system=1, idle=4, iowait=2, guest=5)
    # exact: total = 3 + 1 + 4 + 2 (guest is inside user already) = 10; idle 40 %
    assert cpu_busy_percent(before, after) == 60.0
    after = cpu_times(user=0.9, idle=1.0, nice=7.0)
    # organisers: only user + system + idle, + 0.1: 100 - 100 x 1.0 / 2.0
    assert cpu_busy_percent(before, after, "organisers") == 50.0
    assert cpu_busy_percent(before, cpu_times(idle=2.0)) == 0.0
    assert cpu_busy_percent(before, before) == 0.0  # no time passed: no division by zero
    with pytest.raises(ValueError, match="unknown CPU formula"):
        cpu_busy_percent(before, after, "psutil")


# ---------------------------------------------------------------------------------------
# The monitor
# ---------------------------------------------------------------------------------------


class _NoNvml(types.ModuleType):
    class NVMLError(Exception):
        pass

    def nvmlInit(self):
        raise self.NVMLError("NVML Shared Library Not Found")


class _FakeNvml(types.ModuleType):
    """16 GiB device with 3 GiB in use; this process holds 512 MiB of it, pid 1 the rest."""

    def __init__(self):
        super().__init__("pynvml")
        self.shutdowns = 0

    def nvmlInit(self):
        pass

    def nvmlShutdown(self):
        self.shutdowns += 1

    def nvmlDeviceGetHandleByIndex(self, index):
        return ("handle", index)

    def nvmlDeviceGetName(self, handle):
        return b"Fake GPU"

    def nvmlDeviceGetMemoryInfo(self, handle):
        return types.SimpleNamespace(total=16 * 1024 * MIB, free=13 * 1024 * MIB, used=3 * 1024 * MIB)

    def nvmlDeviceGetComputeRunningProcesses(self, handle):
        return [types.SimpleNamespace(pid=os.getpid(), usedGpuMemory=512 * MIB),
                types.SimpleNamespace(pid=1, usedGpuMemory=2560 * MIB)]


BUSY_055 = "import time\nt = time.perf_counter() + 0.55\nwhile time.perf_counter() < t: pass"


def test_monitor_without_nvml_samples_cpu_and_warns_once(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "pynvml", _NoNvml("pynvml"))
    with caplog.at_level(logging.WARNING, logger="evaluation.efficiency"):
        with ResourceMonitor() as mon:
            # keep one CPU busy in a child (a busy loop here would hold the GIL)
            subprocess.run([sys.executable, "-c", BUSY_055], check=True)
    s = mon.samples
    # one at the start, then one per 0.1 s sleep plus the query's time: never more
    assert 4 <= len(s) <= mon.elapsed_s / 0.1 + 1
    assert s.gpu_mb is None and s.gpu_process_mb is None
    assert len(s.cpu_percent) == len(s.ram_mb) == len(s.rss_mb) == len(s)
    assert all(0.0 <= c <= 100.0 for c in s.cpu_percent)
    assert max(s.cpu_percent) > 0.0  # one CPU was busy the whole time
    assert all(r > 0 for r in s.rss_mb) and all(r > 0 for r in s.ram_mb)
    assert np.all(np.diff(s.t) >= 0.099)  # a full 0.1 s sleep between samples
    warnings = [r for r in caplog.records if "NVML unavailable" in r.getMessage()]
    assert len(warnings) == 1  # once for the whole run, not per sample
    assert GpuProbe.open(0) is None
    f = mon.figures(0.55)
    assert f.gpu_mem_mb is None and f.auc_gpu_time_2gb is None
    assert f.cpu_utilization == max(s.cpu_percent) and f.n_samples == len(s)
    json.dumps(mon.to_dict())


def test_monitor_reads_nvml_device_and_process_memory(monkeypatch):
    fake = _FakeNvml()
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    with ResourceMonitor(gpu_index=2) as mon:
        time.sleep(0.35)
    s = mon.samples
    assert len(s) >= 2
    assert s.gpu_mb == [3072.0] * len(s)  # total - free
    assert s.gpu_process_mb == [512.0] * len(s)  # only this process's tree
    f = mon.figures()
    assert f.gpu_mem_mb == 3072.0
    assert f.auc_gpu_time_2gb == pytest.approx(1024.0 * 0.1 * len(s))
    assert mon.gpu_name == "Fake GPU"
    assert fake.shutdowns == 1  # the monitor opened NVML, so it closed it


def test_monitor_short_run_still_has_a_sample_and_rejects_misuse():
    mon = ResourceMonitor(gpu=None)
    with pytest.raises(RuntimeError, match="before start"):
        mon.stop()
    with mon:
        pass
    assert len(mon.samples) == 1
    with pytest.raises(RuntimeError, match="twice"):
        mon.start()
    with pytest.raises(ValueError, match="interval_s"):
        ResourceMonitor(interval_s=0)


def test_monitor_follows_a_child_process_tree():
    proc = subprocess.Popen([sys.executable, "-c", "import time; b = bytearray(64 << 20); print('ready', flush=True); "
                             "time.sleep(0.6)"], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "ready\n"  # the buffer exists before the monitor starts (busy machines)
        with ResourceMonitor(gpu=None, pid=proc.pid) as mon:
            time.sleep(0.3)
    finally:
        proc.wait()
    assert max(mon.samples.rss_mb) > 60.0  # the child's 64 MiB buffer, not this process


@pytest.mark.parametrize("env, expected", [("3,1", 3), ("GPU-1234-abcd", "GPU-1234-abcd"), ("", 0), (None, 0)])
def test_default_gpu_index(monkeypatch, env, expected):
    if env is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", env)
    assert default_gpu_index() == expected


# ---------------------------------------------------------------------------------------
# The harness
# ---------------------------------------------------------------------------------------

# copies each input to <case>.nii.gz, sleeps 0.3 s; exits 3 for a case named *B*
FAKE_PREDICT = (
    'for f in "$FLARE22_INPUT"/*_0000.nii.gz; do b=$(basename "$f" _0000.nii.gz); '
    'cp "$f" "$FLARE22_OUTPUT/$b.nii.gz"; done; sleep 0.3; '
    'case "$FLARE22_INPUT" in *CaseB*) echo boom >&2; exit 3;; esac'
)


def write_label(path: Path, organ: int, spacing=(0.75, 0.75, 2.5)) -> None:
    arr = np.zeros((3, 4, 5), np.uint8)
    arr[1, 1:3, 1:4] = organ
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    sitk.WriteImage(img, str(path))


@pytest.fixture
def cases(tmp_path) -> Path:
    inp = tmp_path / "in"
    inp.mkdir()
    for name, value in (("CaseA", 1), ("CaseB", 2)):
        write_label(inp / f"{name}_0000.nii.gz", value)
    (inp / "notes.txt").write_text("not a case")
    return inp


@pytest.fixture(autouse=True)
def no_nvml(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", _NoNvml("pynvml"))


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_harness_local_command_two_cases_one_failing(cases, tmp_path):
    out, rep = tmp_path / "out", tmp_path / "rep"
    rc = cli.main(["efficiency", "--input", str(cases), "--output", str(out), "--report", str(rep),
                   "--command", FAKE_PREDICT])
    assert rc == 1  # one case failed
    assert sorted(p.name for p in out.iterdir()) == ["CaseA.nii.gz", "CaseB.nii.gz"]
    for case in ("CaseA", "CaseB"):
        assert (rep / f"{case}.log").is_file()
        for suffix in (".json", "_GPU-Time.png", "_CPU-Time.png", "_RAM-Time.png"):
            assert (rep / f"{case}{suffix}").stat().st_size > 0, (case, suffix)
    rows = read_csv(rep / "efficiency.csv")
    assert [r["Name"] for r in rows] == ["CaseA_0000.nii.gz", "CaseB_0000.nii.gz"]
    assert [r["Status"] for r in rows] == ["ok", "failed"]
    assert [r["ReturnCode"] for r in rows] == ["0", "3"]
    for r in rows:
        assert float(r["Time"]) >= 0.3
        assert int(r["Samples"]) >= 3
        assert r["GPU_Mem"] == "" and r["AUC_GPU_Time_2GB"] == ""  # no NVML here
        assert 0.0 <= float(r["CPU_Utilization"]) <= 100.0
        assert float(r["RAM"]) > 0
    a = json.loads((rep / "CaseA.json").read_text())
    assert a["status"] == "ok" and a["returncode"] == 0
    assert a["figures"]["Time"] >= 0.3
    assert a["prediction"] == str(out / "CaseA.nii.gz")
    assert a["command"][:2] == ["bash", "-c"]
    assert len(a["monitor"]["samples"]["cpu_percent"]) == a["figures"]["Samples"]
    b = json.loads((rep / "CaseB.json").read_text())
    assert b["status"] == "failed" and b["returncode"] == 3 and "exit code 3" in b["error"]
    assert "boom" in (rep / "CaseB.log").read_text()
    summary = (rep / "summary.md").read_text()
    assert "| CaseA | - | - |" in summary and "| ok |" in summary and "| failed |" in summary
    assert "| **mean** |" in summary
    run = json.loads((rep / "efficiency.json").read_text())
    assert [c["case"] for c in run["cases"]] == ["CaseA", "CaseB"] and run["gpu"] is None


def test_each_case_sees_only_its_own_input(cases, tmp_path):
    cmd = 'ls "$FLARE22_INPUT" > "$FLARE22_OUTPUT/seen_$(ls "$FLARE22_INPUT" | head -c 5).txt"'
    results = harness.run_cases(harness.list_cases(cases), tmp_path / "out", tmp_path / "rep",
                                harness.LocalCommand.from_string(cmd))
    assert [r.status for r in results] == ["no_output", "no_output"]  # exit 0, no <case>.nii.gz
    assert (tmp_path / "out" / "seen_CaseA.txt").read_text() == "CaseA_0000.nii.gz\n"
    assert (tmp_path / "out" / "seen_CaseB.txt").read_text() == "CaseB_0000.nii.gz\n"


def test_timeout_kills_the_case_and_charges_the_hang_figures(cases, tmp_path):
    inputs = harness.list_cases(cases)[:1]
    t0 = time.perf_counter()
    [r] = harness.run_cases(inputs, tmp_path / "out", tmp_path / "rep",
                            harness.LocalCommand.from_string(
                                FAKE_PREDICT.replace("sleep 0.3", "sleep 30 & wait")), timeout_s=0.4)
    assert time.perf_counter() - t0 < 10
    assert r.status == "timeout" and r.prediction is None
    assert not (tmp_path / "out" / "CaseA.nii.gz").exists()  # a hung case's output is dropped
    assert r.figures.time_s == 3600.0 and r.figures.auc_cpu_time == 360000.0
    assert 0.4 <= r.measured.time_s < 5


def test_unstartable_command_is_an_error_not_a_crash(cases, tmp_path):
    cmd = harness.LocalCommand(argv=(str(tmp_path / "does-not-exist"),))
    results = harness.run_cases(harness.list_cases(cases), tmp_path / "out", tmp_path / "rep", cmd)
    assert [r.status for r in results] == ["error", "error"]
    assert all("could not start" in r.error for r in results)


def test_default_command_needs_predict_sh(cases, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["efficiency", "--input", str(cases), "--output", str(tmp_path / "o"), "--report", str(tmp_path / "r")]
    assert cli.main(args) == 2
    (tmp_path / "predict.sh").write_text(
        'set -e\nfor f in "$FLARE22_INPUT"/*_0000.nii.gz; do b=$(basename "$f" _0000.nii.gz); '
        'cp "$f" "$FLARE22_OUTPUT/$b.nii.gz"; done\n'
        'test "$FLARE22_BUNDLE" = /models/b\ntest "$CUDA_VISIBLE_DEVICES" = 1\n'
    )
    assert cli.main(args + ["--bundle", "/models/b", "--gpu", "1"]) == 0
    assert [r["Status"] for r in read_csv(tmp_path / "r" / "efficiency.csv")] == ["ok", "ok"]


def test_docker_command_line():
    argv = harness.docker_command("team:latest", "/data/in", "/data/out", gpu=1, name="team")
    assert argv == [
        "docker", "container", "run", "--gpus=device=1", "--name", "team", "--rm",
        "-v", "/data/in/:/workspace/inputs/", "-v", "/data/out/:/workspace/outputs/",
        "team:latest", "/bin/bash", "-c", "sh predict.sh",
    ]
    # the organisers' shell line parses to the same argv
    organisers = ('docker container run --gpus="device=1" --name team --rm -v /data/in/:/workspace/inputs/ '
                  '-v /data/out/:/workspace/outputs/ team:latest /bin/bash -c "sh predict.sh"')
    assert shlex.split(organisers) == argv
    # FLARE23/24 put --shm-size=28gb -m 28G first, as their Efficiency.py does
    line23 = ('docker container run --shm-size=28gb -m 28G --gpus="device=1" --name team --rm '
              '-v /data/in/:/workspace/inputs/ -v /data/out/:/workspace/outputs/ team:latest /bin/bash -c "sh predict.sh"')
    for edition in (23, 24):
        assert harness.docker_command("team:latest", "/data/in", "/data/out", gpu=1, name="team",
                                      edition=edition) == shlex.split(line23)
    # podman on machines without a daemon; no GPU: --gpus left out; --network=none
    argv = harness.docker_command("t:latest", "/i", "/o", gpu=None, engine="podman", network_none=True)
    assert argv[:5] == ["podman", "--runtime=runc", "--storage-driver=vfs", "--cgroup-manager=cgroupfs", "container"]
    assert argv[6:11] == ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024", "--network=none"]
    assert not [a for a in argv if a.startswith("--gpus")]
    with pytest.raises(ValueError, match="edition"):
        harness.docker_command("t", "/i", "/o", edition=25)
    argv, env = harness.DockerCommand("flare22:latest", gpu=0).build(Path("/x/inputs"), Path("/x/outputs"), "FLARETs_0001")
    assert env is None and argv[argv.index("--name") + 1] == "flare22_eff_flarets_0001"
    assert harness.container_name("p", "../weird case") == "p_.._weird_case"


def test_docker_path_end_to_end_with_a_stand_in_docker(cases, tmp_path, monkeypatch):
    """A fake `docker` on PATH that does what the image would: read the mounts, write the label."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake = bindir / "docker"
    fake.write_text(
        "#!/bin/bash\n"
        'echo "$@" >> "$FAKE_DOCKER_LOG"\n'
        "while [ $# -gt 0 ]; do\n"
        '  if [ "$1" = -v ]; then case "$2" in *:/workspace/inputs/) IN=${2%%:*};; *:/workspace/outputs/) OUT=${2%%:*};; esac; fi\n'
        "  shift\ndone\n"
        'for f in "$IN"/*_0000.nii.gz; do b=$(basename "$f" _0000.nii.gz); cp "$f" "$OUT/$b.nii.gz"; done\n'
    )
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_DOCKER_LOG", str(tmp_path / "docker.log"))
    monkeypatch.setitem(sys.modules, "pynvml", _FakeNvml())  # a GPU with 3 GiB in use
    rc = cli.main(["efficiency", "--input", str(cases), "--output", str(tmp_path / "out"),
                   "--report", str(tmp_path / "rep"), "--image", "flare22:latest", "--gpu", "2"])
    assert rc == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["CaseA.nii.gz", "CaseB.nii.gz"]
    calls = (tmp_path / "docker.log").read_text().splitlines()
    assert len(calls) == 2  # a fresh container per case
    assert all(c.startswith("container run --gpus=device=2 --name flare22_eff_case") for c in calls)
    assert all(c.endswith("flare22:latest /bin/bash -c sh predict.sh") for c in calls)
    rows = read_csv(tmp_path / "rep" / "efficiency.csv")
    assert [r["GPU_Mem"] for r in rows] == ["3072.0", "3072.0"]
    for r in rows:  # 1024 MiB above the tolerance in every sample
        assert float(r["AUC_GPU_Time_2GB"]) == round(1024 * 0.1 * int(r["Samples"]))
    run = json.loads((tmp_path / "rep" / "efficiency.json").read_text())
    assert run["gpu"] == "Fake GPU (NVML index 2)"


def test_gt_adds_dsc_and_nsd_through_app_scoring(cases, tmp_path):
    gt = tmp_path / "gt"
    gt.mkdir()
    write_label(gt / "CaseA.nii.gz", 1)  # CaseA's prediction (a copy of its input) matches exactly
    write_label(gt / "CaseB.nii.gz", 2, spacing=(1.0, 1.0, 2.5))  # CaseB's is off the grid
    rep = tmp_path / "rep"
    rc = cli.main(["efficiency", "--input", str(cases), "--output", str(tmp_path / "out"),
                   "--report", str(rep), "--command", FAKE_PREDICT, "--gt", str(gt)])
    assert rc == 1
    rows = {r["Name"]: r for r in read_csv(rep / "efficiency.csv")}
    assert rows["CaseA_0000.nii.gz"]["DSC"] == "1.0" and rows["CaseA_0000.nii.gz"]["NSD"] == "1.0"
    assert rows["CaseB_0000.nii.gz"]["DSC"] == "0.0" and rows["CaseB_0000.nii.gz"]["NSD"] == "0.0"
    b = json.loads((rep / "CaseB.json").read_text())
    assert "scoring:" in b["error"] and "does not resample" in b["error"]
    summary = (rep / "summary.md").read_text()
    assert "| CaseA | 1.0000 | 1.0000 |" in summary
    assert "| **mean** | 0.5000 | 0.5000 |" in summary


def test_missing_prediction_scores_as_empty_and_missing_gt_is_left_out(cases, tmp_path):
    gt = tmp_path / "gt"
    gt.mkdir()
    write_label(gt / "CaseA.nii.gz", 1)  # no CaseB ground truth
    (tmp_path / "out").mkdir()
    write_label(tmp_path / "out" / "CaseA.nii.gz", 1)  # stale: a perfect prediction from before
    results = harness.run_cases(harness.list_cases(cases), tmp_path / "out", tmp_path / "rep",
                                harness.LocalCommand.from_string("true"), gt_dir=gt)
    assert [r.status for r in results] == ["no_output", "no_output"]
    assert not (tmp_path / "out" / "CaseA.nii.gz").exists()  # the stale file did not count
    a, b = results
    assert a.prediction is None
    # empty prediction: the liver (present in the GT) scores 0, the 12 absent organs 1
    assert a.dsc == pytest.approx(12 / 13) and a.nsd == pytest.approx(12 / 13)
    assert b.dsc is None and b.nsd is None


# ---------------------------------------------------------------------------------------
# As the organisers measure: schedule, output folder, Time, their JSON
# ---------------------------------------------------------------------------------------


def test_organisers_schedule_samples_at_start_then_sleeps_and_grid_starts_at_one_interval():
    mon = ResourceMonitor(gpu=None)  # their loop and CPU formula by default
    with mon:
        time.sleep(0.45)
    s = mon.samples
    assert s.schedule == "organisers" and s.cpu_formula == "organisers"
    assert s.t[0] < 0.1 and len(s.t) >= 2  # the first sample comes as the monitor starts
    assert all(b - a >= 0.099 for a, b in zip(s.t, s.t[1:]))  # then a full 0.1 s sleep after each
    assert len(s.cpu_list) == len(s.cpu_percent) == len(s.cpu_percent_exact) == len(s.t)
    for shares, busy in zip(s.cpu_list, s.cpu_percent):
        assert len(shares) == 3 and busy == pytest.approx(100.0 - shares[2])
    grid = ResourceMonitor(gpu=None, schedule="grid", cpu_formula="exact")
    with grid:
        time.sleep(0.25)
    assert grid.samples.t[0] >= 0.099 and grid.samples.cpu_percent == grid.samples.cpu_percent_exact
    with pytest.raises(ValueError, match="schedule"):
        ResourceMonitor(gpu=None, schedule="every")


def test_outputs_folder_as_their_scripts_make_it_and_time_stops_after_the_samples_are_saved(cases, tmp_path):
    cmd = 'stat -c %a "$FLARE22_OUTPUT" > "$FLARE22_OUTPUT/mode.txt"'
    old = os.umask(0o022)
    try:
        for edition, mode in ((22, "755"), (23, "777"), (24, "777")):
            out, rep = tmp_path / f"out{edition}", tmp_path / f"rep{edition}"
            [r] = harness.run_cases(harness.list_cases(cases)[:1], out, rep,
                                    harness.LocalCommand.from_string(cmd), edition=edition)
            assert (out / "mode.txt").read_text().strip() == mode, edition  # FLARE22: os.makedirs as is
    finally:
        os.umask(old)
    assert 0 < r.monitor["exit_s"] <= r.figures.time_s
    saved = json.loads((rep / "CaseA.json").read_text())
    # their load_json.py reads these keys; the figures come from the same samples
    assert saved["time"] == r.figures.time_s and saved["RAM_list"] == r.monitor["samples"]["ram_mb"]
    assert [100 - c[2] for c in saved["cpu_list"]] == pytest.approx(r.monitor["samples"]["cpu_percent"])
    assert saved["gpu_memory"] == []  # no NVML here
    header = read_csv(rep / "efficiency.csv")[0]
    assert list(header)[:8] == ["Name", "Time", "MaxGPU_Mem", "AUC_GPU_Time", "MaxCPU_Utilization",
                                "AUC_CPU_Time", "MaxRAM", "AUC_RAM_Time"]
    assert float(header["CPU_Utilization_Exact"]) >= 0.0


def test_their_columns_on_a_recorded_series_equal_what_their_load_json_wrote():
    data = json.loads((Path(__file__).parent / "data" / "organisers_series.json").read_text())
    figures = figures_from_organisers_record(data["record"])
    for edition in (22, 23, 24):
        header, row = data["their_csv"]["23" if edition == 24 else str(edition)]
        ours = figures.to_row(edition)
        assert list(ours)[:7] == header[1:]  # their column names, in their order
        assert [ours[c] for c in header[1:]] == [float(v) for v in row[1:]], edition
    # the editions differ only where their code does: GPU memory with or without the 2 % rule
    assert figures.to_row(22)["GPU_Mem"] == 1802.0 and figures.to_row(23)["MaxGPU_Mem"] == 2732.0
    # and our JSON form of those samples is theirs again
    again = organisers_record(Samples(gpu_mb=data["record"]["gpu_memory"], cpu_list=data["record"]["cpu_list"],
                                      ram_mb=data["record"]["RAM_list"]), data["record"]["time"])
    assert again == data["record"]
    no_time = {k: v for k, v in data["record"].items() if k != "time"}
    assert figures_from_organisers_record(no_time).time_s == pytest.approx(0.1 * len(no_time["gpu_memory"]))
