"""ONNX Runtime I/O binding: STCN features stay where a session computed them (GPU memory
under the CUDA provider) from one graph to the next, instead of a host round trip per call.

A :class:`DeviceArray` is a tensor in an ONNX Runtime allocation (an ``OrtValue``), or a
contiguous view of one. It offers what the propagation engine does to its backend's arrays
(``app.propagation.StageBackend``): ``shape``, indexing and reshaping. A view along the
leading axes (one slice of a key batch, ``key[0]``) is the same memory at an offset; a crop
of the trailing axes (an organ's window) is a copy made on the device by a one-node ONNX
``Slice`` graph; memory frames are joined by a one-node ``Concat`` graph. Those two helper
graphs are written here as protobuf bytes (the appliance has no ``onnx`` package) and run on
the same providers as the bundle's graphs, so the CPU provider runs exactly the code the
CUDA provider runs: the tests check it there against the unbound path, value for value.

Arrays leave the device only where the engine asks (``to_host``: decoder logits, and memory
frames for the numpy memory read, each copied once and kept).
"""
from __future__ import annotations

import math
from collections import OrderedDict

import numpy as np

# ONNX TensorProto element types
_ELEM = {np.dtype(np.float32): 1, np.dtype(np.float16): 10, np.dtype(np.int64): 7}
_DTYPE = {v: k for k, v in _ELEM.items()}


# ---------------------------------------------------------------------------------------
# one-node ONNX models, encoded by hand (protobuf wire format; field numbers from onnx.proto)


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # int64 as protobuf writes it: negative numbers take ten bytes
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | 0x80 if n else b)
        if not n:
            return bytes(out)


def _int(field: int, n: int) -> bytes:
    return _varint(field << 3) + _varint(n)


def _msg(field: int, payload: bytes) -> bytes:
    return _varint(field << 3 | 2) + _varint(len(payload)) + payload


def _str(field: int, s: str) -> bytes:
    return _msg(field, s.encode())


def _value_info(name: str, elem: int, rank: int) -> bytes:
    # ValueInfoProto{name=1, type=2: TypeProto{tensor_type=1: {elem_type=1, shape=2: {dim=1:
    # {dim_param=2}}}}}: every axis named, so any size
    shape = b"".join(_msg(1, _str(2, f"{name}{i}")) for i in range(rank))
    return _str(1, name) + _msg(2, _msg(1, _int(1, elem) + _msg(2, shape)))


def one_node_model(op: str, inputs: list[tuple[str, int, int]], outputs: list[tuple[str, int, int]],
                   int_attrs: dict[str, int] | None = None, opset: int = 13) -> bytes:
    """A serialised ONNX ModelProto holding one node of operator ``op``; inputs and outputs
    as (name, element type, rank)."""
    attrs = b"".join(_msg(5, _str(1, k) + _int(3, v) + _int(20, 2))  # AttributeProto INT
                     for k, v in (int_attrs or {}).items())
    node = (b"".join(_str(1, t[0]) for t in inputs) + b"".join(_str(2, t[0]) for t in outputs)
            + _str(4, op) + attrs)
    graph = (_msg(1, node) + _str(2, op.lower())
             + b"".join(_msg(11, _value_info(*i)) for i in inputs)
             + b"".join(_msg(12, _value_info(*o)) for o in outputs))
    return _int(1, 8) + _str(2, "flare22") + _msg(7, graph) + _msg(8, _int(2, opset))


def slice_model(dtype, rank: int) -> bytes:
    e = _ELEM[np.dtype(dtype)]
    return one_node_model("Slice", [("data", e, rank), ("starts", 7, 1), ("ends", 7, 1), ("axes", 7, 1)],
                          [("out", e, rank)])


def concat_model(dtype, rank: int, axis: int) -> bytes:
    e = _ELEM[np.dtype(dtype)]
    return one_node_model("Concat", [("a", e, rank), ("b", e, rank)], [("out", e, rank)], {"axis": axis})


# ---------------------------------------------------------------------------------------


class DeviceContext:
    """Where bound arrays live (ONNX Runtime device ``cpu`` or ``cuda`` and its id) and the
    helper sessions that crop, copy and join them there."""

    def __init__(self, providers: list, device_type: str, device_id: int = 0, threads: int | None = None):
        self.providers, self.type, self.id, self.threads = providers, device_type, device_id, threads
        self._sessions: dict[tuple, object] = {}
        self.helper_calls = 0

    def session(self, key: tuple, model: bytes):
        if key not in self._sessions:
            import onnxruntime as ort

            from .backends import ort_session_options  # backends imports this module: no cycle at load

            self._sessions[key] = ort.InferenceSession(model, ort_session_options(self.threads), providers=self.providers)
        return self._sessions[key]

    def upload(self, array: np.ndarray) -> "DeviceArray":
        import onnxruntime as ort

        return DeviceArray(self, ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), self.type, self.id))

    def bind_input(self, binding, name: str, x) -> None:
        """Bind a DeviceArray by address (no copy), or a host array (ONNX Runtime copies it)."""
        if isinstance(x, DeviceArray):
            binding.bind_input(name, self.type, self.id, x.dtype, list(x.shape), x.ptr)
        else:
            binding.bind_cpu_input(name, np.ascontiguousarray(x))

    def run(self, session, inputs: dict, outputs: list[str], into: "DeviceArray | None" = None) -> list["DeviceArray"]:
        """Run a session with bound inputs; outputs allocated on this device (or written into
        ``into``, a contiguous region of the right size, for a one-output helper)."""
        b = session.io_binding()
        for name, x in inputs.items():
            self.bind_input(b, name, x)
        if into is not None:
            b.bind_output(outputs[0], self.type, self.id, into.dtype, list(into.shape), into.ptr)
        else:
            for name in outputs:
                b.bind_output(name, self.type, self.id)
        session.run_with_iobinding(b)
        if into is not None:
            return [into]
        return [DeviceArray(self, v) for v in b.get_outputs()]

    def crop(self, x: "DeviceArray", starts: list[int], ends: list[int], axes: list[int],
             into: "DeviceArray | None" = None) -> "DeviceArray":
        self.helper_calls += 1
        s = self.session(("slice", x.dtype.str, x.ndim), slice_model(x.dtype, x.ndim))
        i64 = lambda v: np.asarray(v, np.int64)  # noqa: E731
        return self.run(s, {"data": x, "starts": i64(starts), "ends": i64(ends), "axes": i64(axes)}, ["out"], into)[0]

    def copy(self, x: "DeviceArray") -> "DeviceArray":
        """A fresh allocation holding x (a view's own memory)."""
        return self.crop(x, [0], [x.shape[0]], [0])

    def empty(self, shape, dtype) -> "DeviceArray":
        import onnxruntime as ort

        return DeviceArray(self, ort.OrtValue.ortvalue_from_shape_and_type(list(shape), np.dtype(dtype).type, self.type, self.id))

    def stack0(self, xs: list) -> "DeviceArray":
        """Arrays joined along axis 0: each copied into its rows of one new allocation."""
        xs = [x if isinstance(x, DeviceArray) else self.upload(x) for x in xs]
        out = self.empty((sum(x.shape[0] for x in xs),) + xs[0].shape[1:], xs[0].dtype)
        row = 0
        for x in xs:
            self.crop(x, [0], [x.shape[0]], [0], into=out[row : row + x.shape[0]])
            row += x.shape[0]
        return out

    def concat2(self, a: "DeviceArray", b: "DeviceArray", axis: int) -> "DeviceArray":
        self.helper_calls += 1
        s = self.session(("concat", a.dtype.str, a.ndim, axis), concat_model(a.dtype, a.ndim, axis))
        return self.run(s, {"a": a, "b": b}, ["out"])[0]


class DeviceArray:
    """A C-contiguous tensor at ``offset`` bytes into an ``OrtValue``'s memory."""

    __slots__ = ("ctx", "value", "shape", "offset", "dtype", "_host")

    def __init__(self, ctx: DeviceContext, value, shape=None, offset: int = 0):
        self.ctx, self.value, self.offset = ctx, value, offset
        self.shape = tuple(value.shape()) if shape is None else tuple(int(n) for n in shape)
        self.dtype = _DTYPE[value.element_type()]
        self._host = None

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def ptr(self) -> int:
        return self.value.data_ptr() + self.offset

    def _view(self, shape, offset: int) -> "DeviceArray":
        return DeviceArray(self.ctx, self.value, shape, offset)

    def reshape(self, *shape) -> "DeviceArray":
        shape = list(shape[0] if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape)
        if -1 in shape:
            i = shape.index(-1)
            rest = math.prod(shape[:i] + shape[i + 1 :])
            shape[i] = self.size // rest if rest else 0
        if math.prod(shape) != self.size:
            raise ValueError(f"cannot reshape {self.shape} to {tuple(shape)}")
        return self._view(shape, self.offset)

    def __getitem__(self, index) -> "DeviceArray":
        index = index if isinstance(index, tuple) else (index,)
        if any(i is Ellipsis for i in index):
            at = next(k for k, i in enumerate(index) if i is Ellipsis)
            index = index[:at] + (slice(None),) * (self.ndim - len(index) + 1) + index[at + 1 :]
        index = index + (slice(None),) * (self.ndim - len(index))
        drop = not isinstance(index[0], slice)
        if drop:  # an integer on the leading axis (the only place the engine uses one)
            j = int(index[0]) + (self.shape[0] if int(index[0]) < 0 else 0)
            index = (slice(j, j + 1),) + index[1:]
        if len(index) != self.ndim or not all(isinstance(i, slice) for i in index):
            raise IndexError(f"DeviceArray takes basic slices (and an integer on axis 0), not {index!r}")
        bounds = [i.indices(n) for i, n in zip(index, self.shape)]
        if any(step != 1 or stop < start for start, stop, step in bounds):
            raise IndexError("DeviceArray slices must have step 1 and not be empty-reversed")
        cut = [a for a, ((start, stop, _), n) in enumerate(zip(bounds, self.shape)) if (start, stop) != (0, n)]
        shape = [stop - start for start, stop, _ in bounds]
        if not cut:
            out = self
        elif all(a == cut[0] for a in cut):  # one cut axis, whole axes after it: a view
            a = cut[0]
            row = math.prod(self.shape[a + 1 :]) * self.dtype.itemsize
            out = self._view(shape, self.offset + bounds[a][0] * row) if a == 0 or math.prod(self.shape[:a]) == 1 \
                else self.ctx.crop(self, [bounds[a][0]], [bounds[a][1]], [a])
        else:
            out = self.ctx.crop(self, [bounds[a][0] for a in cut], [bounds[a][1] for a in cut], cut)
        return out.reshape(shape[1:]) if drop else out

    def numpy(self) -> np.ndarray:
        """The array on the host, copied once and kept (arrays are never written after creation)."""
        if self._host is None:
            whole = self.offset == 0 and self.size == math.prod(self.value.shape())
            src = self if whole else self.ctx.copy(self)
            self._host = src.value.numpy().reshape(self.shape)
        return self._host


class ConcatCache:
    """Memory frames joined on the device along ``axis``, remembering the last join per
    first frame (a memory's reference frame). A memory grows by one frame every few slices
    and is read on every slice, so a read usually costs no join and at most one; where the
    frames changed after a common prefix (a temporary slot replaced, a frame evicted), the
    kept join is cut back to that prefix on the device and the rest joined to it.
    ``capacity`` joins are kept (a pass holds two per organ: keys and values), so old
    passes' joins do not hold GPU memory for long."""

    def __init__(self, ctx: DeviceContext, capacity: int = 32):
        self.ctx, self.capacity = ctx, capacity
        self._joins: OrderedDict[tuple, tuple[list, DeviceArray]] = OrderedDict()

    def join(self, xs: list, axis: int):
        xs = [x if isinstance(x, DeviceArray) else self.ctx.upload(x) for x in xs]
        if len(xs) == 1:
            return xs[0]
        key = (id(xs[0]), axis)
        parts, out = self._joins.get(key, ([], None))
        common = 0
        for p, x in zip(parts, xs):
            if p is not x:
                break
            common += 1
        if common < 2:  # nothing worth keeping (or another memory whose first frame reused the id)
            out, common = xs[0], 1
        elif common < len(parts):  # cut back to the common prefix
            width = sum(p.shape[axis] for p in parts[:common])
            out = self.ctx.crop(out, [0], [width], [axis if axis >= 0 else out.ndim + axis])
        for x in xs[common:]:
            out = self.ctx.concat2(out, x, axis)
        self._joins[key] = (list(xs), out)  # holds the frames, so their ids are not reused meanwhile
        self._joins.move_to_end(key)
        while len(self._joins) > self.capacity:
            self._joins.popitem(last=False)
        return out
