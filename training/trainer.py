"""What both trainers share: distributed set-up, seeding, checkpoints that resume exactly,
the learning-rate schedule, mixed precision, a JSON-lines log and the progress bar.

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


@dataclasses.dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


@dataclasses.dataclass
class RunConfig:
    """What every training run has besides its method's own settings (dataclass fields
    of the trainers' configs come after these)."""

    model: str = "tiny"
    iterations: int = 2000
    lr: float = 1e-4
    weight_decay: float = 1e-4
    milestones: tuple[float, ...] = (0.8, 0.9)  # x0.5 at these fractions of the run
    grad_clip: float = 12.0
    amp: bool = True  # mixed precision, on GPUs only
    seed: int = 0
    val_every: int = 500
    max_minutes: float = 0.0  # > 0: stop (and save) once this much wall time has passed
    log_every: int = 20
    device: str = "auto"
    labelled: str = ""
    val: str = ""
    cache_dir: str = ""


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
