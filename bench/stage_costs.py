"""Parameter counts and CPU time per call of the reference networks and the STCN stages.

For each config (`paper` at 512 x 512, `tiny` at 128 x 128): the reference pair's forward
on one slice, and each STCN stage as the propagation engine calls it: encode_key and
skip_features once per slice, encode_value and decode for 1 and for 13 organs, read_memory
with T = 2 memory frames and 13 organs (both readout methods); for `--train-configs`
(default tiny) also one training step, forward + backward. Randomly initialised
networks in eval mode under inference_mode; each figure is the median of `--repeats` timed
calls after one warm-up call, with torch limited to `--threads` threads; the fastest call
and the process's CPU time (all threads) are printed too.

    .venv/bin/python bench/stage_costs.py [--threads 2] [--configs paper tiny] [--repeats 5]
                                         [--train-configs tiny] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from app.argtypes import positive_int  # noqa: E402
from training.models.reference import REFERENCE_CONFIGS, build_reference_pair, count_parameters  # noqa: E402
from training.models.stcn import STCN_CONFIGS, build_stcn  # noqa: E402


def time_call(fn, repeats: int) -> tuple[float, float, float]:
    """(median wall, fastest wall, median process CPU) seconds of `fn()` over `repeats`
    calls after a warm-up call.

    On a machine shared with other work the fastest call is the closest to the cost on
    idle cores; CPU time sums this process's threads (spin-waiting included).
    """
    fn()
    wall, cpu = [], []
    for _ in range(repeats):
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return statistics.median(wall), min(wall), statistics.median(cpu)


def _params(*modules) -> int:
    return sum(count_parameters(m) for m in modules)


def measure(config: str, repeats: int) -> list[dict]:
    """Rows of {config, what, params, input, wall_s, min_s, cpu_s} for one config."""
    torch.manual_seed(0)
    rows = []
    size = REFERENCE_CONFIGS[config].image_size
    image, position = torch.rand(1, 3, size, size), torch.rand(1)

    transunet, deeplab = (n.eval() for n in build_reference_pair(config))
    with torch.inference_mode():
        for name, net in (("TransUNet", transunet), ("DeepLabV3+", deeplab)):
            wall, fastest, cpu = time_call(lambda: net(image, position), repeats)
            rows.append(dict(config=config, what=f"{name} forward", params=count_parameters(net),
                             input=f"1x3x{size}x{size}", wall_s=wall, min_s=fastest, cpu_s=cpu))
        rows.append(dict(config=config, what="reference pair forward", params=_params(transunet, deeplab),
                         input=f"1x3x{size}x{size}",
                         **{k: rows[-1][k] + rows[-2][k] for k in ("wall_s", "min_s", "cpu_s")}))
    del transunet, deeplab

    cfg = STCN_CONFIGS[config]
    size = cfg.image_size
    stcn = build_stcn(cfg).eval()
    image = torch.rand(1, 3, size, size)
    rows.append(dict(config=config, what="STCN (all stages)", params=count_parameters(stcn), input="",
                     wall_s=None, min_s=None, cpu_s=None))
    d = stcn.decoder
    with torch.inference_mode():
        key, qv, f16, f8, f4 = stcn.encode_key(image)
        s8, s4 = stcn.skip_features(f8, f4)
        hw = f"{key.shape[-2]}x{key.shape[-1]}"

        def add(what, params, shape, fn):
            wall, fastest, cpu = time_call(fn, repeats)
            rows.append(dict(config=config, what=what, params=params, input=shape, wall_s=wall, min_s=fastest,
                             cpu_s=cpu))

        add("STCN encode_key", _params(stcn.key_encoder, stcn.key_proj, stcn.key_comp),
            f"1x3x{size}x{size}", lambda: stcn.encode_key(image))
        add("STCN skip_features", _params(d.skip8, d.skip4), "f8, f4", lambda: stcn.skip_features(f8, f4))
        for organs in (1, 13):
            masks = (torch.rand(organs, size, size) > 0.5).float()
            add(f"STCN encode_value, {organs} organ(s)", count_parameters(stcn.value_encoder),
                f"{organs}x{size}x{size} masks", lambda: stcn.encode_value(image, f16, masks))
        mem_keys = key[0].unsqueeze(1).repeat(1, 2, 1, 1)  # (Ck, T=2, h, w)
        mem_values = torch.randn(13, cfg.value_dim, 2, *key.shape[-2:])
        for method in ("dense", "gather"):
            add(f"STCN read_memory ({method}), T=2, 13 organs", 0, f"top-{cfg.top_k}, {hw} grid",
                lambda: stcn.read_memory(mem_keys, mem_values, key[0], method=method))
        decode_params = _params(d) - _params(d.skip8, d.skip4)
        for organs in (1, 13):
            readout = torch.randn(organs, cfg.value_dim, *key.shape[-2:])
            add(f"STCN decode, {organs} organ(s)", decode_params, f"{organs}x{cfg.value_dim}x{hw}",
                lambda: stcn.decode(readout, qv, s8, s4))
    return rows


def measure_training(config: str, repeats: int) -> list[dict]:
    """One optimiser-free training step (forward + backward) of the reference pair on a
    batch of 4 slices, and of STCN on a batch of 4 three-frame clips with 2 objects."""
    torch.manual_seed(0)
    rows = []
    size = REFERENCE_CONFIGS[config].image_size
    image, position = torch.rand(4, 3, size, size), torch.rand(4)
    pair = [n.train() for n in build_reference_pair(config)]

    def pair_step():
        loss = sum(net(image, position).logsumexp(1).mean() for net in pair)
        loss.backward()

    wall, fastest, cpu = time_call(pair_step, repeats)
    rows.append(dict(config=config, what="reference pair train step (fwd+bwd)", params=_params(*pair),
                     input=f"4x3x{size}x{size}", wall_s=wall, min_s=fastest, cpu_s=cpu))
    stcn = build_stcn(config).train()
    size = stcn.cfg.image_size
    frames = torch.rand(4, 3, 3, size, size)
    masks = (torch.rand(4, 2, size, size) > 0.5).float()
    wall, fastest, cpu = time_call(lambda: stcn(frames, masks).logsumexp(2).mean().backward(), repeats)
    rows.append(dict(config=config, what="STCN train step (fwd+bwd)", params=count_parameters(stcn),
                     input=f"4 clips x 3 frames x 2 objects, {size}x{size}", wall_s=wall, min_s=fastest,
                     cpu_s=cpu))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=positive_int, default=2, help="torch intra-op threads (default 2)")
    p.add_argument("--configs", nargs="*", default=["paper", "tiny"], choices=sorted(STCN_CONFIGS),
                   help="configs whose networks and stages are timed at inference")
    p.add_argument("--train-configs", nargs="*", default=["tiny"], choices=sorted(STCN_CONFIGS),
                   help="configs whose training step (forward + backward) is also timed")
    p.add_argument("--repeats", type=positive_int, default=5, help="timed calls per figure (median)")
    p.add_argument("--json", type=Path, default=None, help="also write the rows here as JSON")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    rows = [r for c in args.configs for r in measure(c, args.repeats)]
    rows += [r for c in args.train_configs for r in measure_training(c, args.repeats)]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.repeats} calls")
    load_after = os.getloadavg()[0]
    print(f"1-min load average {load_before:.2f} before, {load_after:.2f} after on {os.cpu_count()} cores "
          "(wall times are only clean on otherwise idle cores)")
    print(f"{'config':<7} {'what':<42} {'params':>12} {'wall ms':>9} {'min ms':>9} {'cpu ms':>9}  input")
    ms = lambda s: "" if s is None else f"{1000 * s:.1f}"  # noqa: E731
    for r in rows:
        print(f"{r['config']:<7} {r['what']:<42} {r['params']:>12,} {ms(r['wall_s']):>9} {ms(r['min_s']):>9} "
              f"{ms(r['cpu_s']):>9}  {r['input']}")
    if args.json:
        meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "repeats": args.repeats,
                "load_before": load_before, "load_after": load_after, "cpu_count": os.cpu_count()}
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
