"""Train the STCN propagation network on CT slices, organ by organ.

A sample is 3 axial slices of one volume at gaps drawn up to a curriculum's max skip
(rising then falling, REFERENCE section 5), randomly reversed, with 2 organs: a target
(drawn uniformly among the organs the volume holds, so small organs are not starved) and
a random second organ present in the first slice (none where there is no second). Slice
0's ground truth is encoded as memory, slice 1 is segmented, its soft masks are encoded as
memory, slice 2 is segmented from both. Loss: OHEM cross-entropy + Lovasz-softmax on the
aggregated logits. Validation propagates ground-truth masks from the largest-area slice
of each organ through held-out volumes with the appliance's own engine (app.propagation)
and compares with copying the nearest reference slice.

Optional pretraining stage (``--pretrain-iterations`` on ``--unlabelled`` folders), STCN's
static-image stage done on what the semi-supervised setting has plenty of: unlabelled CT
slices. A clip is one slice with two masks made from the image itself (a connected region
of similar intensity, or a random smooth blob; training.data.self_mask) and three frames:
the slice, and two random affine + elastic deformations of it (training.data.random_warp).
No label is read. The learning rate is constant during pretraining; the main stage then
runs its own schedule and curriculum, as without pretraining.

    flare22 train-propagation --labelled DIR [--val DIR] --out DIR --config tiny --iterations 3000 \
        [--unlabelled DIR[,DIR...] --pretrain-iterations 1000]
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from app.argtypes import nonneg_int, positive_int, probability
from app.assist import largest_area_slices, nearest_copy, propagate_annotations
from app.labels import ORGANS
from app.propagation import PropagationConfig
from evaluation.scoring import dice
from training import trainer as T
from training.data import Volume, load_folder, random_warp, self_mask, slice_inputs, slice_labels, warp
from training.losses import OhemLovaszLoss
from training.models.stcn import STCN_CONFIGS, build_stcn
from training.torch_backend import TorchStcnBackend

KIND = "propagation"


@dataclasses.dataclass
class PropagationTrainConfig(T.RunConfig):
    iterations: int = T.arg(3000, type=positive_int, help="main-stage iterations (labelled clips)")
    batch: int = T.arg(4, type=positive_int, help="clips per batch")
    betas: tuple[float, float] = (0.937, 0.999)
    milestones: tuple[float, ...] = (0.75, 0.92)
    # (fraction of training where it starts, max skip): 3, 4, 5, 7, 3 as the authors' code
    curriculum: tuple[tuple[float, int], ...] = ((0.0, 3), (0.1, 4), (0.2, 5), (0.3, 7), (0.8, 3))
    flip: bool = T.arg(True, help="no random flips (STCN is class-agnostic: a flip harms nothing here)")
    z_warp: float = T.arg(0.0, type=probability,
                          help="share of labelled clips given extra along-z change: one random affine + elastic "
                               "warp, half of it on frame 1 and all of it on frame 2 (organs move, grow or shrink "
                               "and change shape from frame to frame, as in real CT)")
    view: int = T.arg(0, type=nonneg_int,
                      help="slices are resized to VIEW x VIEW and a crop of the config's size around the target "
                           "organ is trained on (0: the config's size, no crop); validation propagates at VIEW, "
                           "so small organs span more cells of the key grid")
    second: str = T.arg("organ", choices=("organ", "rest"),
                        help="the clip's second object: a random other organ of frame 0 (organ), or all other "
                             "organs together (rest), so that each object's 'other masks' input is every other "
                             "organ, as in inference")
    unlabelled: str = T.arg("", help="comma-separated folders of unlabelled CT (images/ is enough) for pretraining")
    pretrain_iterations: int = T.arg(0, type=nonneg_int,
                                     help="self-made-mask pretraining iterations on --unlabelled before the main stage")


def max_skip(it: int, cfg: PropagationTrainConfig) -> int:
    frac = it / max(1, cfg.iterations)
    skip = cfg.curriculum[0][1]
    for start, s in cfg.curriculum:
        if frac >= start:
            skip = s
    return skip


class ClipSampler:
    """Draws 3-slice clips with two organs from labelled volumes."""

    def __init__(self, vols: list[Volume], seed: int, *, z_warp: float = 0.0, second: str = "organ", view: int = 0):
        self.vols = vols
        self.rng = np.random.default_rng(seed)
        self.z_warp, self.second, self.view = z_warp, second, view
        # slices holding each organ, per volume (computed once)
        self.where = []
        for v in vols:
            lab = np.asarray(v.labels)
            per = {}
            for o in ORGANS:
                zs = np.nonzero((lab == o).any(axis=(1, 2)))[0]
                if len(zs):
                    per[o] = zs
            self.where.append(per)

    def clip(self, skip: int, size: int, flip: bool):
        while True:
            v = int(self.rng.integers(len(self.vols)))
            if self.where[v]:
                break
        vol, per = self.vols[v], self.where[v]
        organ = int(self.rng.choice(list(per)))
        z0 = int(self.rng.choice(per[organ]))
        n = vol.image.shape[0]
        d = 1 if self.rng.random() < 0.5 else -1
        zs = [z0]
        for _ in range(2):
            step = int(self.rng.integers(1, skip + 1))
            zs.append(int(np.clip(zs[-1] + d * step, 0, n - 1)))
        view = max(size, self.view)
        img, _ = slice_inputs(vol, np.array(zs), view)
        lab = slice_labels(vol, np.array(zs), view)
        if view > size:  # a size x size crop holding the target organ of frame 0, placed at random
            ys, xs = np.nonzero(lab[0] == organ)
            if len(ys):
                y0, x0 = self._corner(ys, size, view), self._corner(xs, size, view)
            else:  # the organ vanished in the resize: any crop
                y0, x0 = (int(v) for v in self.rng.integers(0, view - size + 1, 2))
            img = img[..., y0:y0 + size, x0:x0 + size]
            lab = lab[..., y0:y0 + size, x0:x0 + size]
        if self.z_warp > 0 and self.rng.random() < self.z_warp:
            img, lab = along_z_warp(img, lab, self.rng)
        target = np.zeros_like(lab)
        target[lab == organ] = 1
        if self.second == "rest":
            target[(lab > 0) & (lab != organ)] = 2
        else:
            others = [o for o in np.unique(lab[0]) if o not in (0, organ)]
            second = int(self.rng.choice(others)) if others else -1
            if second > 0:
                target[lab == second] = 2
        first = np.stack([(target[0] == 1), (target[0] == 2)]).astype(np.float32)
        return _flip(self.rng, flip, img, first, target)

    def _corner(self, coords: np.ndarray, size: int, view: int) -> int:
        """A random crop start along one axis that keeps ``coords`` inside the crop where they
        fit (else the crop lies inside their extent)."""
        a, b = sorted((max(0, int(coords.max()) - size + 1), min(int(coords.min()), view - size)))
        return int(self.rng.integers(a, b + 1))

    def batch(self, b: int, skip: int, size: int, flip: bool):
        clips = [self.clip(skip, size, flip) for _ in range(b)]
        return tuple(np.stack(x) for x in zip(*clips))


def along_z_warp(img: np.ndarray, lab: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """More change along z than the phantoms' own: one random affine + elastic warp
    (training.data.random_warp) whose displacement grows linearly through the clip (none on
    frame 0, half on frame 1, all on frame 2), so that organs drift, grow or shrink and bend
    from slice to slice. img (T, 3, H, W), lab (T, H, W) -> the same, warped."""
    t, h, w = lab.shape
    ident = np.mgrid[:h, :w].astype(np.float32)
    disp = random_warp((h, w), rng, rotate_deg=10.0, scale=(0.85, 1.15), shift=0.05) - ident
    img, lab = img.copy(), lab.copy()
    for j in range(1, t):
        img[j], lab[j] = warp(img[j], lab[j], ident + disp * (j / (t - 1)))
    return img, lab


def _flip(rng, flip: bool, *arrays):
    if flip and rng.random() < 0.5:
        arrays = tuple(a[..., ::-1] for a in arrays)
    if flip and rng.random() < 0.5:
        arrays = tuple(a[..., ::-1, :] for a in arrays)
    return tuple(np.ascontiguousarray(a) for a in arrays)


class SelfMaskClipSampler:
    """Pretraining clips from unlabelled volumes: one slice, a target and a second mask made
    from the image, three frames (the slice and two random deformations of it)."""

    def __init__(self, vols: list[Volume], seed: int):
        if not vols:
            raise ValueError("pretraining needs at least one unlabelled volume")
        self.vols = vols
        self.rng = np.random.default_rng(seed)

    def clip(self, size: int, flip: bool):
        vol = self.vols[int(self.rng.integers(len(self.vols)))]
        z = int(self.rng.integers(vol.image.shape[0]))
        img = slice_inputs(vol, np.array([z]), size)[0][0]
        first = self_mask(img, self.rng)
        second = self_mask(img, self.rng) & ~first
        lab = first.astype(np.uint8) + 2 * (second if second.sum() >= 20 else np.zeros_like(second)).astype(np.uint8)
        frames, labs = [img], [lab]
        for _ in range(2):
            f, l = warp(img, lab, random_warp((size, size), self.rng))
            frames.append(f)
            labs.append(l)
        imgs, target = np.stack(frames), np.stack(labs).astype(np.int64)
        mem = np.stack([target[0] == 1, target[0] == 2]).astype(np.float32)
        return _flip(self.rng, flip, imgs, mem, target)

    def batch(self, b: int, size: int, flip: bool):
        clips = [self.clip(size, flip) for _ in range(b)]
        return tuple(np.stack(x) for x in zip(*clips))


def evaluate(net, vols: list[Volume], size: int, device, prop: PropagationConfig | None = None) -> dict:
    """Propagate ground-truth masks from each organ's largest-area slice; DSC per organ,
    against copying the nearest reference slice."""
    backend = TorchStcnBackend(net, device)
    per, base = {}, {}
    secs = 0.0
    for v in vols:
        gt = np.asarray(v.labels)
        refs = largest_area_slices(gt)
        ann = np.zeros_like(gt)
        ann[refs] = gt[refs]
        pred, stats = propagate_annotations(backend, np.asarray(v.image), ann, refs, (size, size), config=prop)
        secs += stats["seconds"]
        copy = nearest_copy(ann, refs)
        for o in ORGANS:
            if (gt == o).any():
                per.setdefault(o, []).append(dice(gt == o, pred == o))
                base.setdefault(o, []).append(dice(gt == o, copy == o))
    m = {o: float(np.mean(d)) for o, d in sorted(per.items())}
    b = {o: float(np.mean(d)) for o, d in sorted(base.items())}
    return {"mean_dsc": float(np.mean(list(m.values()))) if m else 0.0, "per_organ": m,
            "nearest_copy_mean_dsc": float(np.mean(list(b.values()))) if b else 0.0, "nearest_copy_per_organ": b,
            "seconds": secs}


def train(cfg: PropagationTrainConfig, out_dir, resume: str | None = None, progress: bool = True,
          stop_after: int | None = None) -> dict:
    """Train; ``stop_after`` ends the run early (after saving), as an interruption would."""
    out_dir = Path(out_dir)
    cfg, info, state = T.begin(PropagationTrainConfig, cfg, resume, KIND)
    size = STCN_CONFIGS[cfg.model].image_size
    cache = cfg.cache_dir or None
    vols = load_folder(cfg.labelled, labelled=True, cache_dir=cache)
    val = load_folder(cfg.val, labelled=True, cache_dir=cache) if cfg.val else []
    net = build_stcn(cfg.model).to(info.device)
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=cfg.lr, betas=cfg.betas,
                            weight_decay=cfg.weight_decay)
    sched = T.multistep_lr(opt, cfg.iterations, cfg.milestones)
    use_amp = cfg.amp and info.device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    sampler = ClipSampler(vols, cfg.seed * 1000 + info.rank, z_warp=cfg.z_warp, second=cfg.second, view=cfg.view)
    pre = cfg.pretrain_iterations
    synth = None
    if pre > 0:
        unl = [v for d in cfg.unlabelled.split(",") if d for v in load_folder(d, labelled=False, cache_dir=cache)]
        synth = SelfMaskClipSampler(unl, cfg.seed * 1000 + 700 + info.rank)
    parts = {"models": {"stcn": net}, "optimizers": {"stcn": opt}, "schedulers": {"stcn": sched},
             "scalers": {"stcn": scaler}}
    start, best = 0, -1.0
    if resume:
        start, best = T.restore(state, **parts)
        sampler.rng.bit_generator.state = state["extra"]["sampler"]
        if synth is not None and state["extra"].get("synth"):
            synth.rng.bit_generator.state = state["extra"]["synth"]
    model = DDP(net) if info.world > 1 else net
    loss_fn = OhemLovaszLoss()
    net.train()

    def step(it: int) -> dict:
        pretraining = it < pre
        if pretraining:
            frames, first, target = synth.batch(cfg.batch, size, cfg.flip)
        else:
            frames, first, target = sampler.batch(cfg.batch, max_skip(it - pre, cfg), size, cfg.flip)
        x = torch.from_numpy(frames).to(info.device)
        m = torch.from_numpy(first).to(info.device)
        y = torch.from_numpy(target[:, 1:]).to(info.device)  # (B, 2, H, W)
        with T.autocast(info.device, use_amp):
            logits = model(x, m)  # (B, 2, 3, H, W)
        loss = loss_fn(logits.float().flatten(0, 1), y.flatten(0, 1))
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
        scaler.step(opt)
        scaler.update()
        if not pretraining:  # the main stage's schedule is the same with or without pretraining
            sched.step()
        return {"lr": opt.param_groups[0]["lr"], "loss": loss.item(), "stage": "pretrain" if pretraining else "main",
                "max_skip": 0 if pretraining else max_skip(it - pre, cfg)}

    def save(path: Path, iteration: int, best_so_far: float) -> None:
        T.save_checkpoint(path, kind=KIND, config=cfg, iteration=iteration, **parts, best=best_so_far,
                          extra={"sampler": sampler.rng.bit_generator.state,
                                 "synth": synth.rng.bit_generator.state if synth is not None else None})

    def validate(it: int) -> dict | None:
        if it < pre:  # pretraining: checkpoints, no validation
            return None
        net.eval()
        res = evaluate(net, val, max(size, cfg.view), info.device)
        net.train()
        return res

    return T.fit(cfg, out_dir, info=info, start=start, best=best, step=step, save=save,
                 validate=validate if val else None, desc="propagation", show_progress=progress,
                 stop_after=stop_after, resumed=bool(resume), total=pre + cfg.iterations,
                 save_at=(pre,) if pre else ())


def load_stcn(checkpoint):
    state = T.load_checkpoint(checkpoint, KIND)
    net = build_stcn(state["config"]["model"])
    net.load_state_dict(state["models"]["stcn"])
    return net.eval(), state


def add_arguments(p) -> None:
    T.add_trainer_arguments(p, PropagationTrainConfig, STCN_CONFIGS)


def run(args) -> int:
    return T.run_trainer(args, PropagationTrainConfig, train, "propagation")
