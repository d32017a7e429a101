"""Loading an ONNX file safely, and the example inputs its graph declares.

An ONNX file is untrusted input. :func:`load` turns it into an :class:`OnnxModel` or
raises :class:`~gradaudit.errors.LoadError` with one line; it never executes anything
from the file. In order:

1. ``onnx`` itself must be at least 1.21.0, the release that closes the external-data
   path traversals (CVE-2022-25882 and CVE-2024-27318, ``..`` and absolute locations;
   CVE-2024-5187; CVE-2026-27489 and CVE-2026-34447, symlinks in any path component;
   CVE-2026-34446, hard links; CVE-2026-34445, injected external-data keys);
2. the file's size against a cap (``max_bytes``, default :data:`DEFAULT_MAX_BYTES`;
   ``--max-model-size`` on the command line), the external data counted too;
3. protobuf parsing, and a check that the message is a model at all (a graph with
   outputs, an IR version, a default-domain opset this ``onnx`` knows);
4. external data, checked by gradaudit itself whatever the ``onnx`` version does: each
   location must be a relative path without ``..`` components whose every component,
   below the model's folder, is no symlink, whose file is a regular file with a single
   hard link lying inside the model's folder once resolved, and whose ``offset`` and
   ``length`` lie within the file; only then does ``onnx`` read it (with its own checks);
5. every stored tensor must hold the bytes its dims declare (a tensor claiming 10^12
   elements in 10 bytes is refused before anything allocates it);
6. ``onnx.checker.check_model`` (by path when the model and its data pass 2 GB, the
   protobuf limit): topological order (no cycles), every input defined, valid attributes.

Shape inference needs the input shapes, so it runs in the frontend
(:mod:`gradaudit.frontends.onnx`), strict, after :func:`example_inputs` fixed them.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Iterator

from gradaudit.errors import ConfigError, LoadError

#: The oldest ``onnx`` with every external-data fix listed above.
MIN_ONNX = (1, 21, 0)
INSTALL = "pip install 'gradaudit[onnx]'"
#: Default cap on the model file plus its external data, and on the constants gradaudit
#: materialises from it (``ConstantOfShape`` weights and other folded values).
DEFAULT_MAX_BYTES = 4 << 30
#: protobuf cannot serialise or parse a message above 2 GB.
PROTOBUF_LIMIT = (2 << 30) - 1
#: Batch size, sequence length and spatial size given to dimensions the graph leaves open.
BATCH, SEQUENCE, SPATIAL = 2, 8, 32

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.I)
_UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}


def parse_size(text: str) -> int:
    """``"500MB"`` -> 500_000_000, ``"4GiB"`` -> 4 * 2**30; :class:`ConfigError` if bad."""
    m = _SIZE.match(str(text))
    if not m:
        raise ConfigError(f"bad size {text!r}: expected a number of bytes like 500MB or 4GiB")
    unit = (m.group(2) or "").lower()
    scale = 1024 ** " kmgt".index(unit[0]) if "i" in unit else _UNITS[unit[:1]]
    value = int(float(m.group(1)) * scale)
    if value <= 0:
        raise ConfigError(f"bad size {text!r}: must be positive")
    return value


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.3g} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.3g} GB"  # pragma: no cover


def require_onnx():
    """The ``onnx`` module, recent enough; else a :class:`LoadError` saying what to install."""
    try:
        import onnx
    except ImportError:
        raise LoadError(f"ONNX targets need the onnx extra: {INSTALL}") from None
    version = tuple(int(p) for p in re.findall(r"\d+", onnx.__version__)[:3])
    if version < MIN_ONNX:
        raise LoadError(
            f"onnx {onnx.__version__} is older than {'.'.join(map(str, MIN_ONNX))}, which fixes external-data "
            f"path traversal (CVE-2024-27318, CVE-2026-27489, CVE-2026-34446); upgrade: {INSTALL}"
        )
    return onnx


def require_onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise LoadError(f"running ONNX nodes needs onnxruntime, part of the onnx extra: {INSTALL}") from None
    return onnxruntime


def versions() -> dict[str, str]:
    """The onnx and onnxruntime versions, for a report's environment."""
    import importlib.metadata as md

    out = {}
    for name in ("onnx", "onnxruntime"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


def session_options():
    """onnxruntime options: torch's intra-op thread count (one knob for both), worker
    threads that sleep instead of spinning between ops (many short runs on shared cores)."""
    import torch

    ort = require_onnxruntime()
    opts = ort.SessionOptions()
    opts.log_severity_level = 4  # failures reach the caller as exceptions; no log lines
    opts.intra_op_num_threads = max(torch.get_num_threads(), 1)
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return opts


@dataclass
class OnnxModel:
    """A checked ONNX model: external data read, nothing executed.

    ``proto`` is the ``onnx.ModelProto`` as stored (no shapes inferred yet); ``opset`` is
    its default-domain opset; ``max_bytes`` the cap that also bounds constant folding.
    """

    path: str
    proto: Any
    opset: int
    max_bytes: int = DEFAULT_MAX_BYTES
    size: int = 0
    cache: dict = field(default_factory=dict, repr=False)

    @property
    def label(self) -> str:
        return self.path

    def input_infos(self) -> list:
        """The graph inputs that are real inputs (not initializers, the older opsets'
        convention for weights)."""
        inits = {t.name for t in self.proto.graph.initializer} | {
            t.values.name for t in self.proto.graph.sparse_initializer
        }
        return [i for i in self.proto.graph.input if i.name not in inits]


# --------------------------------------------------------------------------- loading
def load(path: str, max_bytes: int | None = None) -> OnnxModel:
    """Read, validate and check the ONNX file at ``path``; see the module docstring."""
    onnx = require_onnx()
    cap = int(max_bytes) if max_bytes else DEFAULT_MAX_BYTES
    try:
        st = os.stat(path)
    except OSError as exc:
        raise LoadError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if not os.path.isfile(path):
        raise LoadError(f"{path}: not a regular file")
    if st.st_size > cap:
        raise LoadError(f"{path}: {human_bytes(st.st_size)}, over the {human_bytes(cap)} limit (--max-model-size)")
    if st.st_size > PROTOBUF_LIMIT:
        raise LoadError(f"{path}: {human_bytes(st.st_size)} in one file; protobuf cannot parse more than 2 GB "
                        "(store the weights as external data)")
    with open(path, "rb") as fh:
        data = fh.read()
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except Exception as exc:  # protobuf's DecodeError and friends
        raise LoadError(f"{path}: not an ONNX model: the file does not parse as one ({_first(exc)})") from None
    del data
    opset = _check_is_model(path, model, onnx)
    external = _validate_external_data(path, model, cap - st.st_size, onnx)
    if external:
        try:
            onnx.load_external_data_for_model(model, os.path.dirname(os.path.abspath(path)))
        except Exception as exc:
            raise LoadError(f"{path}: cannot read its external data: {_first(exc)}") from None
    _check_tensor_sizes(path, model)
    _run_checker(path, model, st.st_size + external, onnx)
    return OnnxModel(path=path, proto=model, opset=opset, max_bytes=cap, size=st.st_size + external)


def from_proto(model: Any, label: str = "<onnx model>", max_bytes: int | None = None) -> OnnxModel:
    """An in-memory ``onnx.ModelProto`` (API use): the same checks, no external data."""
    onnx = require_onnx()
    if not isinstance(model, onnx.ModelProto):
        raise ConfigError(f"expected an onnx.ModelProto, got {type(model).__name__}")
    opset = _check_is_model(label, model, onnx)
    for t in _tensors(model.graph):
        if t.data_location == onnx.TensorProto.EXTERNAL:
            raise LoadError(f"{label}: tensor '{t.name}' keeps its data in a file; load the model from its path")
    _check_tensor_sizes(label, model)
    _run_checker(label, model, model.ByteSize(), onnx)
    return OnnxModel(path=label, proto=model, opset=opset, max_bytes=int(max_bytes or DEFAULT_MAX_BYTES),
                     size=model.ByteSize())


def _first(exc: BaseException) -> str:
    text = str(exc).strip()
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "") or type(exc).__name__
    return line[:300]


def _check_is_model(path: str, model: Any, onnx) -> int:
    """A parsed message may be any protobuf (or noise that happens to parse): require
    the parts every model has. Returns the default-domain opset."""
    if not model.HasField("graph") or model.ir_version <= 0:
        raise LoadError(f"{path}: not an ONNX model (no graph or no IR version)")
    if not model.graph.output:
        raise LoadError(f"{path}: not an ONNX model (the graph has no outputs)")
    if model.ir_version > onnx.IR_VERSION:
        raise LoadError(f"{path}: IR version {model.ir_version} is newer than this onnx supports "
                        f"({onnx.IR_VERSION}); upgrade: {INSTALL}")
    opsets = {o.domain: o.version for o in model.opset_import}
    opset = opsets.get("", opsets.get("ai.onnx"))
    if opset is None:
        raise LoadError(f"{path}: the model imports no default-domain (ai.onnx) opset")
    latest = onnx.defs.onnx_opset_version()
    if not 1 <= opset <= latest:
        raise LoadError(f"{path}: opset {opset} is not supported (this onnx knows opsets 1 to {latest})")
    return int(opset)


# --------------------------------------------------------------------------- tensors
def _graphs(graph) -> Iterator[Any]:
    """``graph`` and every subgraph inside it (If / Loop / Scan bodies)."""
    yield graph
    for node in graph.node:
        for a in node.attribute:
            if a.HasField("g"):
                yield from _graphs(a.g)
            for g in a.graphs:
                yield from _graphs(g)


def _tensors(graph) -> Iterator[Any]:
    """Every TensorProto stored in the graph: initializers, sparse initializers, tensor
    attributes (``Constant``, ``ConstantOfShape``...), in subgraphs too."""
    for g in _graphs(graph):
        yield from g.initializer
        for s in g.sparse_initializer:
            yield s.values
            yield s.indices
        for node in g.node:
            for a in node.attribute:
                if a.HasField("t"):
                    yield a.t
                yield from a.tensors
                if a.HasField("sparse_tensor"):
                    yield a.sparse_tensor.values
                    yield a.sparse_tensor.indices
                for s in a.sparse_tensors:
                    yield s.values
                    yield s.indices


def _external_info(t) -> dict[str, str]:
    return {e.key: e.value for e in t.external_data}


def _validate_external_data(path: str, model: Any, budget: int, onnx) -> int:
    """Check every external-data reference (module docstring, step 4); return the total
    number of bytes they will read. Raises :class:`LoadError` naming the tensor."""
    base = os.path.dirname(os.path.abspath(path))
    real_base = os.path.realpath(base)
    total = 0
    for t in _tensors(model.graph):
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = _external_info(t)
        where = f"{path}: tensor '{t.name}'"
        location = info.get("location", "")
        if not location or "\x00" in location:
            raise LoadError(f"{where}: external data without a location")
        if os.path.isabs(location) or location.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", location):
            raise LoadError(f"{where}: external data at the absolute path {location!r} is refused "
                            "(it must lie in the model's folder)")
        parts = [p for p in re.split(r"[/\\]+", location) if p not in ("", ".")]
        if ".." in parts or not parts:
            raise LoadError(f"{where}: external data location {location!r} leaves the model's folder ('..')")
        current = base
        for part in parts:
            current = os.path.join(current, part)
            if os.path.islink(current):
                raise LoadError(f"{where}: external data path {location!r} goes through a symlink "
                                f"({os.path.relpath(current, base)}); symlinks are refused")
        full = current
        if os.path.commonpath([os.path.realpath(full), real_base]) != real_base:
            raise LoadError(f"{where}: external data {location!r} resolves outside the model's folder")
        try:
            st = os.stat(full, follow_symlinks=False)
        except OSError:
            raise LoadError(f"{where}: external data file {location!r} does not exist") from None
        import stat as stat_mod

        if not stat_mod.S_ISREG(st.st_mode):
            raise LoadError(f"{where}: external data {location!r} is not a regular file")
        if st.st_nlink > 1:
            raise LoadError(f"{where}: external data file {location!r} has {st.st_nlink} hard links; "
                            "hard-linked data files are refused")
        try:
            offset = int(info.get("offset", "0") or 0)
            length = int(info["length"]) if info.get("length") not in (None, "") else st.st_size - offset
        except ValueError:
            raise LoadError(f"{where}: external data offset/length are not integers") from None
        if offset < 0 or length < 0 or offset + length > st.st_size:
            raise LoadError(f"{where}: external data range [{offset}, {offset + length}) lies beyond the end of "
                            f"{location!r} ({st.st_size} bytes)")
        total += length
        if total > budget:
            raise LoadError(f"{path}: external data of more than {human_bytes(total)} puts the model over the "
                            f"size limit (--max-model-size)")
    return total


def type_name(onnx, data_type: int) -> str:
    """``FLOAT``, ``INT64``...; empty for a number no ONNX type has."""
    return onnx.TensorProto.DataType.Name(data_type) if data_type in onnx.TensorProto.DataType.values() else ""


def _itemsize(onnx, data_type: int) -> float:
    """Bytes per element of an ONNX tensor type (4-bit and 2-bit types as fractions)."""
    name = type_name(onnx, data_type)
    if name in ("STRING", "UNDEFINED", ""):
        return 0.0
    if name.startswith(("INT4", "UINT4", "FLOAT4")):
        return 0.5
    if name.startswith(("INT2", "UINT2")):
        return 0.25
    np_dtype = onnx.helper.tensor_dtype_to_np_dtype(data_type)
    return float(np_dtype.itemsize)


#: Typed fields of a TensorProto and how many elements each entry holds (complex: 2 per).
_FIELDS = ("float_data", "int32_data", "string_data", "int64_data", "double_data", "uint64_data")


def _check_tensor_sizes(path: str, model: Any) -> None:
    """Every tensor holds what its dims declare (module docstring, step 5)."""
    import onnx

    for t in _tensors(model.graph):
        if any(d < 0 for d in t.dims):
            raise LoadError(f"{path}: tensor '{t.name}' declares a negative dimension {list(t.dims)}")
        n = math.prod(t.dims)
        size = _itemsize(onnx, t.data_type)
        if size == 0:
            continue
        if t.data_location == onnx.TensorProto.EXTERNAL:
            continue  # read by onnx with its length checked above; verified after loading
        if t.HasField("raw_data") or t.raw_data:
            held = len(t.raw_data)
            want = math.ceil(n * size)
        else:
            held = sum(len(getattr(t, f)) for f in _FIELDS)
            want = n * (2 if t.data_type in (onnx.TensorProto.COMPLEX64, onnx.TensorProto.COMPLEX128) else 1)
            if size < 1:  # packed 4-bit / 2-bit values in int32_data
                want = math.ceil(n * size / 4) if held else want
        if held != want and not (held == 0 and n == 0):
            raise LoadError(
                f"{path}: tensor '{t.name}' declares {list(t.dims)} ({n} elements) but holds "
                f"{held} {'bytes' if t.raw_data else 'values'}; the file is corrupt or truncated"
            )


def _run_checker(path: str, model: Any, total: int, onnx) -> None:
    try:
        if total > PROTOBUF_LIMIT and os.path.isfile(path):
            onnx.checker.check_model(path)
        else:
            onnx.checker.check_model(model)
    except Exception as exc:  # ValidationError, and protobuf errors on malformed messages
        raise LoadError(f"{path}: invalid ONNX model: {_first(exc)}") from None


# --------------------------------------------------------------------------- inputs
_DTYPES = {
    "FLOAT": "float32", "DOUBLE": "float64", "FLOAT16": "float16", "BFLOAT16": "bfloat16",
    "INT64": "int64", "INT32": "int32", "INT16": "int16", "INT8": "int8", "UINT8": "uint8", "BOOL": "bool",
}


def torch_dtype_name(onnx, elem_type: int) -> str | None:
    """The torch dtype name of an ONNX element type (None when torch has none)."""
    return _DTYPES.get(type_name(onnx, elem_type))


def declared_shape(info) -> list[int | str | None]:
    """Dims of a graph input: ints, symbolic names, or None for unknown."""
    t = info.type.tensor_type
    if not t.HasField("shape"):
        return []
    out: list[int | str | None] = []
    for d in t.shape.dim:
        if d.HasField("dim_value") and d.dim_value > 0:
            out.append(int(d.dim_value))
        elif d.HasField("dim_param") and d.dim_param:
            out.append(d.dim_param)
        else:
            out.append(None)
    return out


def example_inputs(
    model: OnnxModel,
    input_shapes: list[tuple[int, ...]] | None = None,
    input_dtype: str | None = None,
    input_range: tuple[float, float] | None = None,
) -> tuple[tuple, str, dict[int, tuple[float, float]]]:
    """Tensors for the graph's real inputs: ``(inputs, source, input_stats)``.

    Shapes come from ``input_shapes`` when given (one per input, each matching the
    declared rank and fixed dimensions), else from the declared shapes with open
    dimensions set small: the first to :data:`BATCH`, others to :data:`SEQUENCE`
    (:data:`SPATIAL` for the spatial dimensions of a 4- or 5-d floating input), one value
    per symbolic name. Integer inputs get ids below the vocabulary of the table they
    index (a ``Gather`` on a constant) unless ``input_range`` says otherwise.
    """
    onnx = require_onnx()
    from gradaudit.loading import make_inputs

    infos = model.input_infos()
    if not infos:
        raise LoadError(f"{model.label}: the graph has no inputs to feed")
    if input_shapes and len(input_shapes) != len(infos):
        names = ", ".join(i.name for i in infos)
        raise ConfigError(f"{model.label} takes {len(infos)} input(s) ({names}); --input-shape was given "
                          f"{len(input_shapes)} time(s)")
    symbols: dict[str, int] = {}
    tensors, stats = [], {}
    opened = False
    for k, info in enumerate(infos):
        elem = info.type.tensor_type.elem_type if info.type.HasField("tensor_type") else 0
        dtype = input_dtype or torch_dtype_name(onnx, elem)
        if dtype is None:
            raise LoadError(f"{model.label}: input '{info.name}' is not a tensor of a supported type "
                            f"({type_name(onnx, elem) or f'type number {elem}'})")
        dims = declared_shape(info)
        if input_shapes:
            shape = tuple(input_shapes[k])
            if dims and len(dims) != len(shape):
                raise ConfigError(f"--input-shape {','.join(map(str, shape))} has rank {len(shape)}, but input "
                                  f"'{info.name}' of {model.label} has rank {len(dims)} {_fmt_dims(dims)}")
            for d, s in zip(dims, shape):
                if isinstance(d, int) and d != s:
                    raise ConfigError(f"--input-shape {','.join(map(str, shape))} does not fit input '{info.name}' "
                                      f"of {model.label}, declared {_fmt_dims(dims)}")
        else:
            if not info.type.tensor_type.HasField("shape"):
                raise LoadError(f"{model.label}: input '{info.name}' declares no shape; pass --input-shape")
            shape = tuple(_fill(i, d, dims, dtype, symbols) for i, d in enumerate(dims))
            opened = opened or any(not isinstance(d, int) for d in dims)
        lo_hi = input_range
        if dtype.startswith(("int", "uint")) and lo_hi is None:
            vocab = _vocabulary(model, info.name)
            if vocab is None:
                raise ConfigError(f"input '{info.name}' of {model.label} is {dtype}; give its values with "
                                  "--input-range LO,HI")
            lo_hi = (0, vocab)
        (x,), st = make_inputs([shape], dtype, lo_hi if dtype not in ("bool",) else None)
        if st and dtype.startswith(("float", "bfloat")):
            stats[k] = st[0]
        tensors.append(x)
    if input_shapes:
        source = "--input-shape"
    else:
        source = "declared by the graph" + (f" (open dimensions set to {_fmt_symbols(symbols)})" if opened else "")
    return tuple(tensors), source, stats


def ordered_inputs(model: OnnxModel, call: Any) -> tuple[tuple, list[str]]:
    """The example call's tensors in graph-input order, and each one's key in the call.

    ``call``: a tensor, a tuple (positional, in graph-input order), a dict or an
    :class:`~gradaudit.frontends.signature.ExampleCall` whose keywords name graph inputs.
    """
    import torch

    from gradaudit.errors import CaptureError
    from gradaudit.frontends.signature import ExampleCall

    call = ExampleCall.of(call)
    names = [i.name for i in model.input_infos()]
    unknown = [k for k in call.kwargs if k not in names]
    if unknown:
        raise CaptureError(f"{model.label} has no input named {unknown[0]!r} (inputs: {', '.join(names)})")
    if len(call.args) + len(call.kwargs) != len(names):
        raise CaptureError(f"{model.label} takes {len(names)} input(s) ({', '.join(names)}), {len(call)} given")
    tensors, keys = [], []
    positional = iter(enumerate(call.args))
    for name in names:
        if name in call.kwargs:
            value, key = call.kwargs[name], name
        else:
            k, value = next(positional)
            key = str(k)
        if not isinstance(value, torch.Tensor):
            raise CaptureError(f"input '{name}' of {model.label} must be a tensor, got {type(value).__name__}")
        tensors.append(value)
        keys.append(key)
    return tuple(tensors), keys


def _fmt_dims(dims: list) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"


def _fmt_symbols(symbols: dict[str, int]) -> str:
    named = [f"{k}={v}" for k, v in symbols.items() if not k.startswith("?")]
    return ", ".join(named) if named else f"batch {BATCH}"


def _fill(i: int, d: Any, dims: list, dtype: str, symbols: dict[str, int]) -> int:
    if isinstance(d, int):
        return d
    if isinstance(d, str) and d in symbols:
        return symbols[d]
    if i == 0:
        value = BATCH
    elif len(dims) >= 4 and i >= 2 and dtype.startswith(("float", "bfloat")):
        value = SPATIAL
    else:
        value = SEQUENCE
    symbols[d if isinstance(d, str) else f"?{len(symbols)}"] = value
    return value


def _vocabulary(model: OnnxModel, name: str) -> int | None:
    """Rows of the constant table a ``Gather`` looks ``name`` up in (an embedding)."""
    graph = model.proto.graph
    tables = {t.name: list(t.dims) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Gather" and len(node.input) > 1 and node.input[1] == name:
            dims = tables.get(node.input[0])
            axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
            if dims and 0 <= axis < len(dims):
                return int(dims[axis])
    return None
