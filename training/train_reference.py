"""Train the reference pair (TransUNet + DeepLabV3+) with Cross Pseudo Supervision.

Supervised branch (both networks, labelled slices): Dice + cross-entropy with label
smoothing. Unsupervised CPS branch (all slices of the batch, labelled and unlabelled):
each network learns from its peer's hard (argmax) prediction, with Dice (the paper) or
cross-entropy (the CPS paper), optionally only where the peer is confident
(``cps_threshold``). Its weight is 0 for the first ``cps_start`` fraction of the run (the
unlabelled slices are then not even computed), then ramps up as w * exp(-5 (1 - t)^2) over
the next ``rampup`` fraction: from-scratch peers first learn from the labels, then from
each other.

    flare22 train-reference --labelled DIR [--unlabelled DIR] [--val DIR] --out DIR \
        --config tiny --iterations 2000
"""
from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from app.argtypes import nonneg_float, nonneg_int, positive_float, positive_int, probability
from app.labels import ORGANS
from app.predict import pair_labels
from app.windowing import DEFAULT_WINDOWS
from evaluation.scoring import dice
from training import trainer as T
from training.data import AugmentConfig, SliceSampler, Volume, load_folder, slice_weights
from training.losses import DiceCELoss, cross_pseudo_supervision
from training.models.reference import REFERENCE_CONFIGS, ReferencePair, build_reference_pair
from training.torch_backend import TorchReference

KIND = "reference"
CPS_LOSSES = ("dice", "ce")  # the paper's Dice, the CPS paper's cross-entropy
CPS_ON = ("all", "unlabelled")  # the slices the CPS loss covers


@dataclasses.dataclass
class ReferenceTrainConfig(T.RunConfig):
    batch_labelled: int = 2
    batch_unlabelled: int = 2
    label_smoothing: float = 0.1
    cps_weight: float = 1.5
    cps_loss: str = "dice"  # one of CPS_LOSSES
    cps_threshold: float = 0.0  # peer pixels less confident than this are ignored
    cps_on: str = "all"  # CPS on every slice of the batch (the CPS paper), or "unlabelled" only
    # The CPS schedule: labels alone for the first half, then the weight ramps up over the
    # next 20 % (bench/learnability.py semi: CPS from the start lost to labelled-only; this
    # schedule beat it on 3 seeds of 3). cps_start=0 gives CPS from the first iteration.
    rampup: float = 0.2
    cps_start: float = 0.5  # fraction of the run trained on labels alone before CPS begins
    small_organ_boost: float = 10.0
    sampling_rule: str = "rarity"  # or "small" (training.data.slice_weights)
    augment: bool = True
    unlabelled: str = ""

    def __post_init__(self):
        # Checked when the config is made (command line, code or a resumed checkpoint), not
        # halfway through the run when the CPS branch first switches on.
        if self.cps_on not in CPS_ON or self.cps_loss not in CPS_LOSSES:
            raise ValueError(f"cps_on must be one of {CPS_ON} and cps_loss one of {CPS_LOSSES}, "
                             f"got {self.cps_on!r} and {self.cps_loss!r}")


def cps_rampup(it: int, cfg: ReferenceTrainConfig) -> float:
    """The CPS weight at iteration ``it``: 0 before ``cps_start`` (a fraction of the run),
    then w * exp(-5 (1 - t)^2) with t going 0 -> 1 over the next ``rampup`` fraction."""
    begin = cfg.cps_start * cfg.iterations
    if it < begin:
        return 0.0
    t = min(1.0, (it - begin) / max(1.0, cfg.rampup * cfg.iterations))
    return cfg.cps_weight * math.exp(-5 * (1 - t) ** 2)


def cps_terms(logits, n_labelled: int, cfg: ReferenceTrainConfig):
    """The pair's CPS losses on the batch (labelled slices first, then unlabelled ones):
    over every slice, or with ``cps_on="unlabelled"`` over the unlabelled ones alone."""
    first = n_labelled if cfg.cps_on == "unlabelled" else 0
    return cross_pseudo_supervision(logits[0][first:], logits[1][first:], loss=cfg.cps_loss,
                                    threshold=cfg.cps_threshold)


def predict_labels(nets, vol: Volume, size: int, device, batch: int = 16) -> np.ndarray:
    """The pair's labels on every slice of a volume at its native in-plane size: the
    appliance's dense mode (``app.predict.pair_labels``) with the live networks in torch."""
    ref = TorchReference(ReferencePair(*nets), device)
    out = np.zeros(vol.image.shape, np.uint8)
    for z, labels in pair_labels(lambda x, p: ref(x, p)["probs"], vol.image, DEFAULT_WINDOWS, (size, size), batch):
        out[z] = labels
    return out


def organ_dsc(pred: np.ndarray, gt: np.ndarray) -> dict[int, float]:
    """DSC of every organ present in the ground truth (the project's scorer's Dice)."""
    return {o: dice(gt == o, pred == o) for o in ORGANS if (gt == o).any()}


def validate(nets, vols: list[Volume], size: int, device) -> dict:
    for n in nets:
        n.eval()
    per_organ: dict[int, list[float]] = {}
    for v in vols:
        pred = predict_labels(nets, v, size, device)
        for o, d in organ_dsc(pred, np.asarray(v.labels)).items():
            per_organ.setdefault(o, []).append(d)
    for n in nets:
        n.train()
    means = {o: float(np.mean(d)) for o, d in sorted(per_organ.items())}
    return {"mean_dsc": float(np.mean(list(means.values()))) if means else 0.0, "per_organ": means}


def train(cfg: ReferenceTrainConfig, out_dir: str | Path, resume: str | None = None, progress: bool = True,
          stop_after: int | None = None) -> dict:
    """Train; ``stop_after`` ends the run early (after saving), as an interruption would."""
    out_dir = Path(out_dir)
    info = T.setup_distributed(cfg.device)
    if resume:
        state = T.load_checkpoint(resume, KIND)
        cfg = ReferenceTrainConfig(**{**state["config"], "milestones": tuple(state["config"]["milestones"])})
    T.seed_everything(cfg.seed + info.rank)
    size = REFERENCE_CONFIGS[cfg.model].image_size
    cache = cfg.cache_dir or None
    labelled = load_folder(cfg.labelled, labelled=True, cache_dir=cache)
    unlabelled = load_folder(cfg.unlabelled, labelled=False, cache_dir=cache) if cfg.unlabelled else []
    val = load_folder(cfg.val, labelled=True, cache_dir=cache) if cfg.val else []

    net_a, net_b = build_reference_pair(cfg.model)  # two architectures, two initialisations
    nets = [net_a.to(info.device), net_b.to(info.device)]
    opts = [torch.optim.AdamW(n.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay) for n in nets]
    scheds = [T.multistep_lr(o, cfg.iterations, cfg.milestones) for o in opts]
    use_amp = cfg.amp and info.device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)  # one scaler, two optimisers
    start, best = 0, -1.0
    if resume:
        for key, n in zip("ab", nets):
            n.load_state_dict(state["models"][key])
        for key, o, s in zip("ab", opts, scheds):
            o.load_state_dict(state["optimizers"][key])
            s.load_state_dict(state["schedulers"][key])
        if state["scalers"]:
            scaler.load_state_dict(state["scalers"]["pair"])
        start, best = state["iteration"], state["best"] if state["best"] is not None else -1.0
        T.restore_rng(state)
        sampler_state = state["extra"].get("sampler")
    else:
        sampler_state = None
    if info.world > 1:
        nets = [DDP(n) for n in nets]

    weights = (slice_weights(labelled, cfg.small_organ_boost, rule=cfg.sampling_rule)
               if cfg.small_organ_boost > 0 else None)
    lab_sampler = SliceSampler(labelled, weights, cfg.seed * 1000 + info.rank)
    unl_sampler = SliceSampler(unlabelled, None, cfg.seed * 1000 + 500 + info.rank) if unlabelled else None
    if sampler_state:
        lab_sampler.rng.bit_generator.state = sampler_state["lab"]
        if unl_sampler and sampler_state.get("unl"):
            unl_sampler.rng.bit_generator.state = sampler_state["unl"]
    aug = AugmentConfig() if cfg.augment else None
    # Dice over the classes present in the batch: with "all", every organ absent from a
    # 4-slice batch scores ~0 (smooth / (sum of its small probabilities + smooth)) and
    # fights the label smoothing's floor; training plateaued there.
    sup_loss = DiceCELoss(label_smoothing=cfg.label_smoothing, classes="present")
    log = T.JsonLog(out_dir / "log.jsonl", info.main)
    if info.main and not resume:
        log.write(event="start", config=dataclasses.asdict(cfg), world=info.world, device=str(info.device))
    bar = T.progress(cfg.iterations, start, disable=not (progress and info.main), desc="reference")
    last = {}
    t0 = time.time()
    for it in range(start, cfg.iterations):
        x, pos, y = lab_sampler.batch(cfg.batch_labelled, size, aug, with_labels=True)
        w = cps_rampup(it, cfg)
        # Before the CPS weight rises the unlabelled half of the batch would be computed for
        # nothing: leave it out (the run is then the labelled-only run, step for step).
        if unl_sampler is not None and w > 0:
            xu, posu = unl_sampler.batch(cfg.batch_unlabelled, size, aug, with_labels=False)
            x_all, pos_all = np.concatenate([x, xu]), np.concatenate([pos, posu])
        else:
            x_all, pos_all = x, pos
        xt = torch.from_numpy(x_all).to(info.device)
        pt = torch.from_numpy(pos_all).to(info.device)
        yt = torch.from_numpy(y).to(info.device)
        nl = len(y)
        with T.autocast(info.device, use_amp):
            logits = [n(xt, pt) for n in nets]
            sup = [sup_loss(lg[:nl].float(), yt) for lg in logits]
            loss = sup[0] + sup[1]
            if w > 0:
                cps = cps_terms(logits, nl, cfg)
                loss = loss + w * (cps[0] + cps[1])
            else:
                cps = (torch.zeros(()), torch.zeros(()))
        for o in opts:
            o.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        for n, o in zip(nets, opts):
            scaler.unscale_(o)
            torch.nn.utils.clip_grad_norm_(n.parameters(), cfg.grad_clip)
            scaler.step(o)
        scaler.update()
        for s in scheds:
            s.step()
        bar.update(1)
        last = {"loss": loss.item(), "sup_a": sup[0].item(), "sup_b": sup[1].item(),
                "cps": (cps[0] + cps[1]).item(), "cps_weight": w}
        if info.main and ((it + 1) % cfg.log_every == 0 or it == start):
            log.write(event="train", iteration=it + 1, lr=opts[0].param_groups[0]["lr"], **last)
            bar.set_postfix(loss=f"{last['loss']:.3f}")
        stopping = (stop_after is not None and it + 1 >= stop_after) or (
            cfg.max_minutes > 0 and time.time() - t0 > 60 * cfg.max_minutes)
        is_last = it + 1 == cfg.iterations or stopping
        if val and info.main and ((it + 1) % cfg.val_every == 0 or is_last):
            res = validate([T.unwrap(n) for n in nets], val, size, info.device)
            log.write(event="val", iteration=it + 1, **res)
            if res["mean_dsc"] > best:
                best = res["mean_dsc"]
                _save(out_dir / "best.pt", cfg, it + 1, nets, opts, scheds, scaler, best, lab_sampler, unl_sampler)
        if info.main and ((it + 1) % cfg.val_every == 0 or is_last):
            _save(out_dir / "last.pt", cfg, it + 1, nets, opts, scheds, scaler, best, lab_sampler, unl_sampler)
        if stopping:
            break
    bar.close()
    if info.main and not val and not stop_after:  # no validation set: the last checkpoint is the one to export
        (out_dir / "best.pt").write_bytes((out_dir / "last.pt").read_bytes())
    summary = {"iterations": it + 1 if cfg.iterations > start else start, "best_val_dsc": best, "last": last, "seconds": time.time() - t0,
               "checkpoint": str(out_dir / "best.pt")}
    log.write(event="end", **summary)
    return summary


def _save(path, cfg, it, nets, opts, scheds, scaler, best, lab_sampler, unl_sampler):
    T.save_checkpoint(
        path, kind=KIND, config=cfg, iteration=it,
        models={"a": nets[0], "b": nets[1]}, optimizers={"a": opts[0], "b": opts[1]},
        schedulers={"a": scheds[0], "b": scheds[1]}, scalers={"pair": scaler}, best=best,
        extra={"sampler": {"lab": lab_sampler.rng.bit_generator.state,
                           "unl": unl_sampler.rng.bit_generator.state if unl_sampler else None}},
    )


def load_pair(checkpoint: str | Path):
    """(net_a, net_b, config) from a reference checkpoint, in eval mode on the CPU."""
    state = T.load_checkpoint(checkpoint, KIND)
    cfg = state["config"]
    a, b = build_reference_pair(cfg["model"])
    a.load_state_dict(state["models"]["a"])
    b.load_state_dict(state["models"]["b"])
    return a.eval(), b.eval(), state


def add_arguments(p) -> None:
    p.add_argument("--labelled", required=True, help="FLARE folder with images/ and labels/")
    p.add_argument("--unlabelled", default="", help="FLARE folder with images/ only (CPS input)")
    p.add_argument("--val", default="", help="labelled FLARE folder for validation")
    p.add_argument("--out", required=True, help="run folder: checkpoints, log.jsonl")
    p.add_argument("--config", default="tiny", choices=sorted(REFERENCE_CONFIGS), help="network configuration")
    p.add_argument("--iterations", type=positive_int, default=2000)
    p.add_argument("--batch-labelled", type=positive_int, default=2)
    p.add_argument("--batch-unlabelled", type=positive_int, default=2)
    p.add_argument("--lr", type=positive_float, default=1e-4)
    p.add_argument("--cps-weight", type=nonneg_float, default=1.5)
    p.add_argument("--cps-loss", choices=CPS_LOSSES, default="dice")
    p.add_argument("--cps-threshold", type=probability, default=0.0,
                   help="ignore peer pixels whose top probability is below this (0: every pixel, the paper)")
    p.add_argument("--cps-on", choices=CPS_ON, default="all",
                   help="slices the CPS loss covers: all of the batch (the CPS paper) or the unlabelled ones")
    p.add_argument("--cps-rampup", type=probability, default=0.2,
                   help="fraction of the run over which the CPS weight ramps up to --cps-weight")
    p.add_argument("--cps-start", type=probability, default=0.5,
                   help="fraction of the run trained on the labelled slices alone before the CPS ramp begins "
                        "(0: CPS from the first iteration, as in the CPS paper)")
    p.add_argument("--small-organ-boost", type=nonneg_float, default=10.0,
                   help="extra sampling weight of slices showing a rare organ (0: uniform)")
    p.add_argument("--sampling-rule", choices=("small", "rarity"), default="rarity",
                   help="small: boost slices showing a small organ; rarity: boost by the rarest organ present")
    p.add_argument("--no-augment", action="store_true")
    p.add_argument("--val-every", type=positive_int, default=500)
    p.add_argument("--max-minutes", type=nonneg_float, default=0.0, help="stop (and save) after this much wall time")
    p.add_argument("--seed", type=nonneg_int, default=0)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--cache-dir", default="", help="decoded-volume cache (default $FLARE22_CACHE or ~/.cache/flare22)")
    p.add_argument("--resume", help="checkpoint to continue from (its config wins)")
    p.add_argument("--no-progress", action="store_true")


def run(args) -> int:
    cfg = ReferenceTrainConfig(
        model=args.config, iterations=args.iterations, batch_labelled=args.batch_labelled,
        batch_unlabelled=args.batch_unlabelled, lr=args.lr, cps_weight=args.cps_weight, cps_loss=args.cps_loss,
        cps_threshold=args.cps_threshold, rampup=args.cps_rampup, cps_start=args.cps_start,
        cps_on=args.cps_on,
        small_organ_boost=args.small_organ_boost, sampling_rule=args.sampling_rule, augment=not args.no_augment, val_every=args.val_every, max_minutes=args.max_minutes,
        seed=args.seed, device=args.device, labelled=args.labelled, unlabelled=args.unlabelled, val=args.val,
        cache_dir=args.cache_dir,
    )
    summary = train(cfg, args.out, resume=args.resume, progress=not args.no_progress)
    print(f"reference training done: best validation mean DSC {summary['best_val_dsc']:.4f}; {summary['checkpoint']}")
    return 0
