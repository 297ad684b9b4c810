"""The one table of exported graphs: for each graph its module, input and output names with
symbolic shapes (a string is a dynamic axis), sample inputs, parity cases and cost unit.

Export (``export.bundle``), the parity check, MAC counting, the bench scripts and the tests
all read ``GRAPHS``; adding a graph is adding one ``Graph`` row here (and its caller in the
appliance). Shapes are written for a model input of ``H x W`` (``Dims.hw``) with the STCN
channel counts ``Dims.ch`` (``stcn_channels``); feature grids are ``h = H / 16``.

=============  ===========================================  =================================
reference      image (B,3,H,W), position (B,)               probs (summed softmax), probs_a, probs_b
stcn_key       image (B,3,H,W)                              key, query_value, f16, f8, f4
stcn_skip      f8 (B,C8,2h,2w), f4 (B,C4,4h,4w)             s8, s4
stcn_value     image, f16, masks (O,..), others (O,..)      values (O,Cv,hc,wc)  [crops: any hc, wc]
stcn_decode    readout (O,..), query_value, s8, s4          logits (O,1,Hc,Wc)   [crops: any size]
stcn_read      mem_keys (Ck,N), mem_values (O,Cv,N),        readout (O,Cv,P)     [top_k baked in,
               query_key (Ck,P)                                                   needs N >= top_k]
=============  ===========================================  =================================

The memory read exists twice on purpose, each checked against the network's torch read at
export: the ``stcn_read`` graph (which keeps the memory on the device under I/O binding) and
the appliance's numpy read (``app.propagation.read_memory``, for memories shorter than top_k
and where it is faster); ``app.backends.MEMORY_READ`` picks one per device.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from training.models.reference import ReferencePair
from training.models.stcn import STCN, build_stcn

STRIDE = 16
# The form of topk_read the stcn_read graph is exported in: "gather" (work O*Cv*k*P, whatever
# the memory's length N; the torch GPU backend's form) rather than "dense" (O*Cv*N*P through an
# N x P matrix), which only pays for short memories; both measured in docs/efficiency.md.
READ_METHOD = "gather"


@dataclass(frozen=True)
class Dims:
    """Model input size and STCN channel counts: what every symbolic shape is written in."""

    hw: tuple[int, int]
    ch: dict

    @property
    def cells(self) -> tuple[int, int]:
        return self.hw[0] // STRIDE, self.hw[1] // STRIDE


@dataclass(frozen=True)
class Case:
    """One set of input sizes: batch ``b`` (slices), ``o`` organs, a feature grid of ``cells``."""

    b: int = 2
    o: int = 2
    cells: tuple[int, int] = (4, 4)

    def to_json(self) -> dict:
        return {"b": self.b, "o": self.o, "cells": list(self.cells)}


class Read(nn.Module):
    """The STCN memory read with the network's top_k baked in: keys (Ck,N), values (O,Cv,N),
    query (Ck,P) -> readout (O,Cv,P), in the form READ_METHOD names."""

    def __init__(self, net: STCN):
        super().__init__()
        self.net, self.top_k = net, net.cfg.top_k
        self.train(net.training)

    def forward(self, mem_keys: torch.Tensor, mem_values: torch.Tensor, query_key: torch.Tensor):
        return self.net.read_memory(mem_keys, mem_values, query_key, top_k=self.top_k, method=READ_METHOD)


class Stage(nn.Module):
    """One method of the STCN network as a module: forward(*inputs) = net.<method>(*inputs)."""

    def __init__(self, net: STCN, method: str):
        super().__init__()
        self.net, self.method = net, method
        self.train(net.training)

    def forward(self, *inputs: torch.Tensor):
        return getattr(self.net, self.method)(*inputs)


Shapes = list[tuple[str, list]]
COST_UNITS = ("slice", "cell", "organ_cell")


@dataclass(frozen=True)
class Graph:
    name: str
    module: Callable[[nn.Module, nn.Module, STCN], nn.Module]  # (net_a, net_b, stcn) -> module
    inputs: Callable[[Dims], Shapes]
    outputs: Callable[[Dims], Shapes]
    sample: Callable[[Dims, np.random.Generator, Case], list[np.ndarray]]
    parity: tuple[Case, ...]
    cost_unit: str  # what the appliance counts calls in: slices, feature cells or organ x cells
    example: Case = field(default_factory=Case)  # the sizes export traces and counts MACs at
    # settings baked into the graph, recorded in its manifest entry: (stcn) -> dict
    baked: Callable[[STCN], dict] = field(default=lambda net: {})

    def __post_init__(self):
        if self.cost_unit not in COST_UNITS:
            raise ValueError(f"graph {self.name}: cost unit {self.cost_unit!r} is not one of {COST_UNITS}")

    def units(self, case: Case) -> int:
        """How many cost units one call on ``case``'s inputs is."""
        cells = case.cells[0] * case.cells[1]
        return {"slice": case.b, "cell": case.b * cells, "organ_cell": case.o * cells}[self.cost_unit]

    def dynamic_axes(self, dims: Dims) -> dict[str, dict[int, str]]:
        axes = {}
        for name, shape in self.inputs(dims) + self.outputs(dims):
            d = {i: s for i, s in enumerate(shape) if isinstance(s, str)}
            if d:
                axes[name] = d
        return axes

    def manifest_entry(self, dims: Dims) -> dict:
        def io(shapes):
            return [{"name": n, "shape": s, "dtype": "float32"} for n, s in shapes]

        return {"onnx": f"{self.name}.onnx", "inputs": io(self.inputs(dims)), "outputs": io(self.outputs(dims))}


def _normal(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def _uniform(rng, *shape):
    return rng.random(shape).astype(np.float32)


def _grid(d: Dims, scale: int) -> list[int]:
    """The full-frame feature grid at 1/16 x ``scale`` of the input."""
    return [scale * d.cells[0], scale * d.cells[1]]


GRAPHS: dict[str, Graph] = {g.name: g for g in (
    Graph(
        "reference",
        module=lambda a, b, net: ReferencePair(a, b),
        inputs=lambda d: [("image", ["B", 3, *d.hw]), ("position", ["B"])],
        outputs=lambda d: [(n, ["B", 14, *d.hw]) for n in ("probs", "probs_a", "probs_b")],
        sample=lambda d, r, c: [_uniform(r, c.b, 3, *d.hw), _uniform(r, c.b)],
        parity=(Case(b=1), Case(b=3)),
        cost_unit="slice",
    ),
    Graph(
        "stcn_key",
        module=lambda a, b, net: Stage(net, "encode_key"),
        inputs=lambda d: [("image", ["B", 3, *d.hw])],
        outputs=lambda d: [("key", ["B", d.ch["ck"], *_grid(d, 1)]), ("query_value", ["B", d.ch["cv"], *_grid(d, 1)]),
                           ("f16", ["B", d.ch["c16"], *_grid(d, 1)]), ("f8", ["B", d.ch["c8"], *_grid(d, 2)]),
                           ("f4", ["B", d.ch["c4"], *_grid(d, 4)])],
        sample=lambda d, r, c: [_uniform(r, c.b, 3, *d.hw)],
        parity=(Case(b=1), Case(b=3)),
        cost_unit="slice",
    ),
    Graph(
        "stcn_skip",
        module=lambda a, b, net: Stage(net, "skip_features"),
        inputs=lambda d: [("f8", ["B", d.ch["c8"], "h8", "w8"]), ("f4", ["B", d.ch["c4"], "h4", "w4"])],
        outputs=lambda d: [("s8", ["B", d.ch["s8"], "h8", "w8"]), ("s4", ["B", d.ch["s4"], "h4", "w4"])],
        sample=lambda d, r, c: [_normal(r, c.b, d.ch["c8"], 2 * c.cells[0], 2 * c.cells[1]),
                                _normal(r, c.b, d.ch["c4"], 4 * c.cells[0], 4 * c.cells[1])],
        parity=(Case(b=1, cells=(4, 4)), Case(b=2, cells=(6, 5))),
        cost_unit="cell",
    ),
    Graph(
        "stcn_value",
        module=lambda a, b, net: Stage(net, "encode_value"),
        inputs=lambda d: [("image", [1, 3, "Hc", "Wc"]), ("f16", [1, d.ch["c16"], "hc", "wc"]),
                          ("masks", ["O", "Hc", "Wc"]), ("others", ["O", "Hc", "Wc"])],
        outputs=lambda d: [("values", ["O", d.ch["cv"], "hc", "wc"])],
        sample=lambda d, r, c: [_uniform(r, 1, 3, 16 * c.cells[0], 16 * c.cells[1]),
                                _normal(r, 1, d.ch["c16"], *c.cells),
                                _uniform(r, c.o, 16 * c.cells[0], 16 * c.cells[1]),
                                _uniform(r, c.o, 16 * c.cells[0], 16 * c.cells[1])],
        parity=(Case(o=1, cells=(4, 4)), Case(o=3, cells=(5, 7))),
        cost_unit="organ_cell",
    ),
    Graph(
        "stcn_decode",
        module=lambda a, b, net: Stage(net, "decode"),
        inputs=lambda d: [("readout", ["O", d.ch["cv"], "hc", "wc"]), ("query_value", [1, d.ch["cv"], "hc", "wc"]),
                          ("s8", [1, d.ch["s8"], "h8", "w8"]), ("s4", [1, d.ch["s4"], "h4", "w4"])],
        outputs=lambda d: [("logits", ["O", 1, "Hc", "Wc"])],
        sample=lambda d, r, c: [_normal(r, c.o, d.ch["cv"], *c.cells), _normal(r, 1, d.ch["cv"], *c.cells),
                                _normal(r, 1, d.ch["s8"], 2 * c.cells[0], 2 * c.cells[1]),
                                _normal(r, 1, d.ch["s4"], 4 * c.cells[0], 4 * c.cells[1])],
        parity=(Case(o=1, cells=(4, 4)), Case(o=3, cells=(5, 7))),
        cost_unit="organ_cell",
    ),
    Graph(
        "stcn_read",
        module=lambda a, b, net: Read(net),
        inputs=lambda d: [("mem_keys", [d.ch["ck"], "N"]), ("mem_values", ["O", d.ch["cv"], "N"]),
                          ("query_key", [d.ch["ck"], "P"])],
        outputs=lambda d: [("readout", ["O", d.ch["cv"], "P"])],
        # memory: 4 frames of the case's grid (N >= top_k = 20 from 4 x 4 cells); query: one grid
        sample=lambda d, r, c: [_normal(r, d.ch["ck"], 4 * c.cells[0] * c.cells[1]),
                                _normal(r, c.o, d.ch["cv"], 4 * c.cells[0] * c.cells[1]),
                                _normal(r, d.ch["ck"], c.cells[0] * c.cells[1])],
        parity=(Case(o=1, cells=(4, 4)), Case(o=3, cells=(5, 7))),
        cost_unit="organ_cell",
        baked=lambda net: {"top_k": net.cfg.top_k},
    ),
)}


def stcn_channels(cfg) -> dict:
    """Channel counts of the STCN features for a config (probed on a tiny input)."""
    net = build_stcn(cfg).eval()
    with torch.no_grad():
        key, qv, f16, f8, f4 = net.encode_key(torch.zeros(1, 3, 32, 32))
        s8, s4 = net.skip_features(f8, f4)
    return {"ck": key.shape[1], "cv": qv.shape[1], "c16": f16.shape[1], "c8": f8.shape[1],
            "c4": f4.shape[1], "s8": s8.shape[1], "s4": s4.shape[1]}


def modules(net_a: nn.Module, net_b: nn.Module, stcn: STCN, names=None) -> dict[str, nn.Module]:
    """The exported graphs as torch modules (eval mode), in table order."""
    return {n: g.module(net_a, net_b, stcn).eval() for n, g in GRAPHS.items() if names is None or n in names}


def count_macs(graph: Graph, module: nn.Module, dims: Dims, seed: int = 0) -> dict:
    """Multiply-adds of one call, per the graph's cost unit, at its example sizes."""
    from torch.utils.flop_counter import FlopCounterMode

    xs = graph.sample(dims, np.random.default_rng(seed), graph.example)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        module(*[torch.from_numpy(x) for x in xs])
    return {"per": graph.cost_unit, "macs": counter.get_total_flops() / 2 / graph.units(graph.example)}
