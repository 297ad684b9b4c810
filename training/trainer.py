"""What both trainers share: distributed set-up, seeding, checkpoints that resume exactly,
the learning-rate schedule, mixed precision, a JSON-lines log, the progress bar, the
training loop (``fit``: budget, validation cadence, best/last checkpoints, summary) and the
command-line flags made from the config dataclasses (``add_config_arguments``).

Each trainer keeps one typed config (a dataclass) that is saved into every checkpoint
with the iteration, the networks, the optimisers, the schedulers and the random states,
so ``--resume`` continues exactly where it stopped.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from app.argtypes import nonneg_float, nonneg_int, positive_float, positive_int


@dataclasses.dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def arg(default, *, type=None, help: str | None = None, flag: str | None = None, **kwargs):
    """A config field that is also a command-line flag: its default lives here only.

    ``type`` is the flag's checked type (``app.argtypes``), ``flag`` its name when not
    ``--field-name``; other keyword arguments (``choices``, ``required``) go to argparse."""
    return dataclasses.field(default=default, metadata={"type": type, "help": help, "flag": flag, **kwargs})


@dataclasses.dataclass
class RunConfig:
    """What every training run has besides its method's own settings (dataclass fields
    of the trainers' configs come after these). Each scalar field is also a flag of the
    trainer's command (``add_config_arguments``)."""

    model: str = arg("tiny", flag="--config", help="network configuration")
    iterations: int = arg(2000, type=positive_int, help="training iterations")
    lr: float = arg(1e-4, type=positive_float, help="AdamW learning rate (the paper: 1e-4)")
    weight_decay: float = arg(1e-4, type=nonneg_float)
    milestones: tuple[float, ...] = (0.8, 0.9)  # x0.5 at these fractions of the run
    grad_clip: float = arg(12.0, type=positive_float, help="gradient norm clip")
    amp: bool = arg(True, help="no mixed precision (it is used on GPUs only)")
    seed: int = arg(0, type=nonneg_int)
    val_every: int = arg(500, type=positive_int, help="validate and save every this many iterations")
    max_minutes: float = arg(0.0, type=nonneg_float, help="stop (and save) after this much wall time (0: no limit)")
    log_every: int = arg(20, type=positive_int, help="log.jsonl line every this many iterations")
    device: str = arg("auto", choices=("auto", "cpu", "cuda"))
    labelled: str = arg("", required=True, help="FLARE folder with images/ and labels/")
    val: str = arg("", help="labelled FLARE folder for validation")
    cache_dir: str = arg("", help="decoded-volume cache (default $FLARE22_CACHE or ~/.cache/flare22)")


def setup_distributed(device: str = "auto") -> DistInfo:
    """torchrun sets RANK / WORLD_SIZE / LOCAL_RANK: gloo on the CPU, nccl on GPUs."""
    want_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if want_cuda:
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if want_cuda else "gloo")
    return DistInfo(rank, world, dev)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def multistep_lr(optimizer, iterations: int, milestones=(0.8, 0.9), gamma: float = 0.5):
    """x gamma at each milestone, given as fractions of the run (the paper: 40k, 45k of 50k)."""
    steps = sorted({max(1, int(round(m * iterations))) for m in milestones})
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, steps, gamma=gamma)


def autocast(dev: torch.device, enabled: bool):
    if enabled and dev.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()


def unwrap(model):
    return model.module if hasattr(model, "module") else model


def config_to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def save_checkpoint(path: Path, *, kind: str, config, iteration: int, models: dict, optimizers: dict,
                    schedulers: dict, scalers: dict | None = None, best: float | None = None, extra=None) -> None:
    state = {
        "kind": kind,
        "config": config_to_dict(config),
        "iteration": iteration,
        "models": {k: unwrap(m).state_dict() for k, m in models.items()},
        "optimizers": {k: o.state_dict() for k, o in optimizers.items()},
        "schedulers": {k: s.state_dict() for k, s in schedulers.items()},
        "scalers": {k: s.state_dict() for k, s in (scalers or {}).items()},
        "best": best,
        "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
        "extra": extra or {},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


# What a checkpoint holds beyond tensors and plain containers: numpy's RNG state (an array).
# Everything else is refused by torch's restricted unpickler: a crafted .pt cannot run code.
_CHECKPOINT_GLOBALS = [np._core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def load_checkpoint(path: str | os.PathLike, kind: str | None = None) -> dict:
    with torch.serialization.safe_globals(_CHECKPOINT_GLOBALS):
        state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path}: not a checkpoint of this project (a {type(state).__name__})")
    if kind is not None and state.get("kind") != kind:
        raise ValueError(f"{path}: a {state.get('kind')!r} checkpoint, expected {kind!r}")
    return state


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["rng"]["torch"])
    np.random.set_state(state["rng"]["numpy"])
    random.setstate(state["rng"]["python"])


class JsonLog:
    """Append-only JSON-lines log, written by the main process only."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path, self.enabled = path, enabled
        if enabled:
            path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, **record) -> None:
        if not self.enabled:
            return
        record.setdefault("time", round(time.time(), 3))
        with open(self.path, "a") as f:
            f.write(json.dumps(record, default=float) + "\n")


def progress(total: int, initial: int, disable: bool, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, disable=disable, desc=desc, dynamic_ncols=True, mininterval=1.0)


# ---- configs: from a checkpoint, and as command-line flags --------------------------


_FALLBACK_TYPES = {"int": positive_int, "float": positive_float, "str": str}


def add_config_arguments(parser, cls, **overrides) -> None:
    """One flag per scalar field of the config dataclass ``cls`` (tuples stay code-only), with
    the field's default. A True bool becomes ``--no-NAME``, a False one ``--NAME``.
    ``overrides`` = field -> extra argparse keywords (e.g. the choices of ``model``)."""
    for f in dataclasses.fields(cls):
        kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        if kind not in ("int", "float", "str", "bool"):
            continue
        meta = {k: v for k, v in f.metadata.items() if v is not None}
        meta.update(overrides.get(f.name, {}))
        name = meta.pop("flag", None) or "--" + f.name.replace("_", "-")
        help_text = meta.pop("help", None)
        if kind == "bool":
            meta.pop("type", None)
            if f.default:
                name = "--no-" + name[2:] if not name.startswith("--no-") else name
                parser.add_argument(name, dest=f.name, action="store_false", help=help_text)
            else:
                parser.add_argument(name, dest=f.name, action="store_true", help=help_text)
            continue
        meta.setdefault("type", _FALLBACK_TYPES[kind])
        if not meta.get("required"):
            help_text = f"{help_text} (default: {f.default!r})" if help_text else f"default: {f.default!r}"
        parser.add_argument(name, dest=f.name, default=f.default, help=help_text, **meta)


def add_trainer_arguments(parser, cls, configs) -> None:
    """A trainer's command line: the flags of its config ``cls`` (``--config`` one of
    ``configs``), ``--out``, ``--resume`` and ``--no-progress``."""
    add_config_arguments(parser, cls, model={"choices": sorted(configs)})
    parser.add_argument("--out", required=True, help="run folder: checkpoints, log.jsonl")
    parser.add_argument("--resume", help="checkpoint to continue from (its config wins)")
    parser.add_argument("--no-progress", action="store_true")


def run_trainer(args, cls, train, name: str) -> int:
    """Run ``train`` on the config the flags give; print the best checkpoint."""
    summary = train(config_from_args(cls, args), args.out, resume=args.resume, progress=not args.no_progress)
    print(f"{name} training done: best validation mean DSC {summary['best_val_dsc']:.4f}; {summary['checkpoint']}")
    return 0


def config_from_args(cls, args, **extra):
    """The config ``cls`` from parsed flags (fields without a flag keep their default)."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    return cls(**{**values, **extra})


def _tuples(value):
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def config_from_dict(cls, values: dict):
    """The config ``cls`` saved in a checkpoint (JSON-like: lists back to tuples)."""
    known = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: _tuples(v) for k, v in values.items() if k in known})


# ---- the loop both trainers share ----------------------------------------------------


def begin(cls, cfg, resume: str | None, kind: str):
    """(config, distributed info, checkpoint state or None) at the start of a run: on
    ``resume`` the checkpoint's config wins; every process is seeded."""
    info = setup_distributed(cfg.device)
    state = None
    if resume:
        state = load_checkpoint(resume, kind)
        cfg = config_from_dict(cls, state["config"])
    seed_everything(cfg.seed + info.rank)
    return cfg, info, state


def restore(state: dict, *, models: dict, optimizers: dict, schedulers: dict, scalers: dict) -> tuple[int, float]:
    """Load a checkpoint's networks, optimisers, schedulers, scalers and random states;
    returns (iteration, best validation score so far)."""
    for k, m in models.items():
        unwrap(m).load_state_dict(state["models"][k])
    for k, o in optimizers.items():
        o.load_state_dict(state["optimizers"][k])
    for k, s in schedulers.items():
        s.load_state_dict(state["schedulers"][k])
    for k, s in scalers.items():
        if state["scalers"].get(k):
            s.load_state_dict(state["scalers"][k])
    restore_rng(state)
    return state["iteration"], state["best"] if state["best"] is not None else -1.0


def fit(cfg, out_dir: Path, *, info: DistInfo, start: int, best: float, step, save, validate=None,
        desc: str, show_progress: bool = True, stop_after: int | None = None, resumed: bool = False,
        total: int | None = None, save_at: tuple[int, ...] = ()) -> dict:
    """The loop both trainers share. Runs iterations ``start .. total`` (default
    ``cfg.iterations``) of ``step(it) -> dict of figures`` ("loss" shown on the bar, all of
    them in the JSON-lines log every ``cfg.log_every``). Every ``cfg.val_every`` iterations,
    at the iterations in ``save_at`` and at the end: ``validate(it) -> {"mean_dsc", ...}``
    (when given; it may return None to skip) with ``best.pt`` on a new best, and ``last.pt``
    always, through ``save(path, iteration, best)``. The run stops after ``total``, after
    ``cfg.max_minutes`` of wall time (> 0), or after ``stop_after`` iterations (as an
    interruption would). Without validation the last checkpoint is also ``best.pt``.
    Returns the summary, also logged."""
    total = cfg.iterations if total is None else total
    log = JsonLog(out_dir / "log.jsonl", info.main)
    if info.main and not resumed:
        log.write(event="start", config=dataclasses.asdict(cfg), world=info.world, device=str(info.device))
    bar = progress(total, start, disable=not (show_progress and info.main), desc=desc)
    last, t0, it = {}, time.time(), start - 1
    for it in range(start, total):
        last = step(it)
        bar.update(1)
        if info.main and ((it + 1) % cfg.log_every == 0 or it == start):
            log.write(event="train", iteration=it + 1, **last)
            bar.set_postfix(loss=f"{last['loss']:.3f}")
        stopping = (stop_after is not None and it + 1 >= stop_after) or (
            cfg.max_minutes > 0 and time.time() - t0 > 60 * cfg.max_minutes)
        is_last = it + 1 == total or stopping
        if info.main and ((it + 1) % cfg.val_every == 0 or is_last or it + 1 in save_at):
            res = validate(it) if validate is not None else None
            if res is not None:
                log.write(event="val", iteration=it + 1, **res)
                if res["mean_dsc"] > best:
                    best = res["mean_dsc"]
                    save(out_dir / "best.pt", it + 1, best)
            save(out_dir / "last.pt", it + 1, best)
        if stopping:
            break
    bar.close()
    if info.main and validate is None and not stop_after:  # the last checkpoint is the one to export
        (out_dir / "best.pt").write_bytes((out_dir / "last.pt").read_bytes())
    summary = {"iterations": it + 1 if total > start else start, "best_val_dsc": best, "last": last,
               "seconds": time.time() - t0, "checkpoint": str(out_dir / "best.pt")}
    log.write(event="end", **summary)
    return summary
