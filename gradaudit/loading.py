"""Target string -> model + example inputs.

A target is ``path/to/file.py[:attr]``, ``package.module:attr`` or ``model.onnx``.
Loading a Python target *runs the user's file* (as pytest or uvicorn do): only point
gradaudit at code you trust. Nothing is ever unpickled here. An ONNX file is data, not
code: it is read and checked without executing anything (:mod:`gradaudit.frontends.onnx_load`).

Which object is the model:

- ``:attr`` names an ``nn.Module`` instance, an ``nn.Module`` subclass constructible
  without arguments, or a callable returning a module or ``(module, example_inputs)``;
- without ``:attr``: a module-level ``model``, else a callable named ``build_model``,
  ``make_model``, ``get_model`` or ``create_model``, else the single ``nn.Module``
  subclass defined in the file (not imported into it) that constructs without arguments.

Which example inputs, first match wins: ``--input-shape`` (``input_shapes``), an
``example_inputs`` attribute or callable in the same file, the factory's tuple, else
:func:`infer_inputs` from the first layer that consumes the input. ``Loaded.input_source``
says which one was used. A ``loss_fn(output, batch)`` and an ``example_batch`` (a batch,
or a callable returning a fresh one) in the file are the probe's real loss
(:mod:`gradaudit.probe.loss`).

Every problem is a :class:`~gradaudit.errors.LoadError` with a one-line message that
names the user's file and line where one is known.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import os
import re
import sys
import traceback
from dataclasses import dataclass, field
from typing import Any

from gradaudit.errors import ConfigError, LoadError

#: Factory names tried, in order, when the target names no attribute.
FACTORY_NAMES = ("build_model", "make_model", "get_model", "create_model")
#: Batch size of inferred inputs: 2, so batch norm in training mode has a batch.
BATCH = 2
#: Spatial size of inferred convolution inputs and sequence length of inferred sequences.
SPATIAL = 32
SEQUENCE = 8

_FILE_TARGET = re.compile(r"^(?P<path>.+?\.py)(?::(?P<attr>[A-Za-z_][\w.]*))?$")
_MODULE_TARGET = re.compile(r"^(?P<module>[A-Za-z_][\w.]*)(?::(?P<attr>[A-Za-z_][\w.]*))?$")


class NoModelFound(LoadError):
    """The file loaded fine but defines nothing that looks like a model."""


@dataclass
class Loaded:
    """A loaded target: the model, its example inputs and where the inputs came from."""

    model: Any
    #: A tuple of positional inputs, or an ExampleCall with keyword inputs.
    inputs: Any
    input_source: str
    target: str
    #: (mean, std) per input position or keyword, from ``--input-range`` on floating inputs.
    input_stats: dict[Any, tuple[float, float]] = field(default_factory=dict)
    #: ``loss_fn`` and ``example_batch`` of the file (the probe's real loss), if defined.
    loss_fn: Any = None
    batch: Any = None


def load_target(
    spec: str,
    *,
    input_shapes: list[tuple[int, ...]] | None = None,
    input_dtype: str | None = None,
    input_range: tuple[float, float] | None = None,
    max_model_size: int | None = None,
) -> Loaded:
    """Load ``spec`` into a :class:`Loaded`; raise :class:`LoadError` on any problem.

    A ``model.onnx`` target loads through :func:`gradaudit.frontends.onnx_load.load`
    (``max_model_size`` caps its bytes); its inputs are the graph's declared ones."""
    import torch.nn as nn

    spec = spec.strip()
    if spec.lower().endswith(".onnx"):
        if not os.path.exists(spec):
            raise LoadError(f"{spec}: no such file")
        from gradaudit.frontends import onnx_load

        onnx_model = onnx_load.load(spec, max_model_size)
        inputs, source, stats = onnx_load.example_inputs(onnx_model, input_shapes, input_dtype, input_range)
        return Loaded(model=onnx_model, inputs=inputs, input_source=source, target=spec, input_stats=stats)
    namespace, label, attr = _import_target(spec)
    model, factory_inputs, factory = _resolve(namespace, label, attr, nn)
    source = None
    inputs = None
    stats: dict[int, tuple[float, float]] = {}
    if input_shapes:
        inputs, stats = make_inputs(input_shapes, input_dtype, input_range, model)
        source = "--input-shape"
    elif input_dtype or input_range:
        raise ConfigError("--input-dtype and --input-range need --input-shape")
    if inputs is None and "example_inputs" in namespace:
        inputs = _as_inputs(_example_inputs(namespace["example_inputs"], label), f"example_inputs in {label}")
        source = f"example_inputs in {label}"
    if inputs is None and factory_inputs is not None:
        inputs = _as_inputs(factory_inputs, f"{factory}()")
        source = f"factory {factory}()"
    if inputs is None:
        inputs, source = infer_inputs(model)
    return Loaded(model=model, inputs=inputs, input_source=source, target=spec, input_stats=stats,
                  loss_fn=namespace.get("loss_fn"), batch=namespace.get("example_batch"))


# -- importing the user's code --------------------------------------------------------------


def _import_target(spec: str) -> tuple[dict, str, str | None]:
    """Run the target's file or import its module; return (namespace, label, attr)."""
    m = _FILE_TARGET.match(spec)
    if m:
        path, attr = m.group("path"), m.group("attr")
        return _exec_file(path), path, attr
    if os.path.exists(spec):
        kind = "directory" if os.path.isdir(spec) else "file"
        raise LoadError(f"{spec}: a {kind}, not a model target (use path/to/file.py[:attr] or package.module:attr)")
    m = _MODULE_TARGET.match(spec)
    if not m:
        raise LoadError(f"{spec!r} is not a target: use path/to/file.py[:attr], package.module:attr or model.onnx")
    module_name, attr = m.group("module"), m.group("attr")
    if attr is None and "." not in module_name:
        raise LoadError(f"{spec}: no such file (a target is path/to/file.py[:attr] or package.module:attr)")
    return _import_module(module_name), module_name, attr


def _exec_file(path: str) -> dict:
    if not os.path.exists(path):
        raise LoadError(f"{path}: no such file")
    if os.path.isdir(path):
        raise LoadError(f"{path}: a directory, not a Python file")
    apath = os.path.abspath(path)
    folder = os.path.dirname(apath)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    stem = re.sub(r"\W", "_", os.path.splitext(os.path.basename(apath))[0])
    # a private module name, so the user's file never shadows (or is shadowed by) a package
    name = f"_gradaudit_target_{stem}_{hashlib.sha1(apath.encode()).hexdigest()[:8]}"
    try:
        with open(apath, "rb") as fh:
            source = fh.read()
        if b"\0" in source:
            raise LoadError(f"{path}: not a Python source file (it holds null bytes, as binary files do)")
        code = compile(source, apath, "exec")
    except SyntaxError as exc:
        where = f"{path}:{exc.lineno}" if exc.lineno else path
        raise LoadError(f"{where}: syntax error: {exc.msg}") from exc
    except (OSError, ValueError) as exc:
        raise LoadError(f"{path}: cannot read: {exc}") from exc
    spec = importlib.util.spec_from_file_location(name, apath)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        exec(code, module.__dict__)
    except BaseException as exc:
        sys.modules.pop(name, None)
        if isinstance(exc, KeyboardInterrupt):
            raise
        raise LoadError(f"{_where(exc, path)}: running the model file failed: {_describe(exc)}") from exc
    return module.__dict__


def _import_module(module_name: str) -> dict:
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise LoadError(f"{module_name}: no module named {exc.name!r}") from exc
        raise LoadError(f"{_where(exc, None)}: importing {module_name} failed: {_describe(exc)}") from exc
    except SyntaxError as exc:
        raise LoadError(f"{exc.filename}:{exc.lineno}: syntax error: {exc.msg}") from exc
    except BaseException as exc:
        if isinstance(exc, KeyboardInterrupt):
            raise
        raise LoadError(f"{_where(exc, None)}: importing {module_name} failed: {_describe(exc)}") from exc
    return vars(module)


def _describe(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    if isinstance(exc, SyntaxError):
        text = f"{exc.msg} ({exc.filename}:{exc.lineno})"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _where(exc: BaseException, path: str | None) -> str:
    """``path:line`` of the innermost frame in the user's file (or outside site-packages)."""
    frames = traceback.extract_tb(exc.__traceback__)
    if path is not None:
        apath = os.path.abspath(path)
        for frame in reversed(frames):
            if os.path.abspath(frame.filename) == apath:
                return f"{path}:{frame.lineno}"
        return path
    here = os.path.dirname(os.path.abspath(__file__))
    for frame in reversed(frames):
        f = frame.filename
        if f.startswith("<") or "site-packages" in f or f.startswith(here) or "importlib" in f:
            continue
        return f"{os.path.relpath(f) if not os.path.relpath(f).startswith('..') else f}:{frame.lineno}"
    return "<import>"


# -- finding the model ------------------------------------------------------------------------


def _resolve(namespace: dict, label: str, attr: str | None, nn) -> tuple[Any, Any, str | None]:
    """(model, factory example inputs or None, factory name or None)."""
    if attr is not None:
        obj = namespace
        for i, part in enumerate(attr.split(".")):
            try:
                obj = obj[part] if isinstance(obj, dict) else getattr(obj, part)
            except (KeyError, AttributeError):
                raise LoadError(f"{label}: has no attribute {'.'.join(attr.split('.')[: i + 1])!r}") from None
        return _materialise(obj, attr, label, nn)
    if "model" in namespace:
        return _materialise(namespace["model"], "model", label, nn)
    factories = [n for n in FACTORY_NAMES if callable(namespace.get(n))]
    if len(factories) > 1:
        raise LoadError(
            f"{label}: several model factories ({', '.join(factories)}); pick one with {label}:{factories[0]}"
        )
    if factories:
        return _materialise(namespace[factories[0]], factories[0], label, nn)
    defined = [
        (k, v)
        for k, v in namespace.items()
        if inspect.isclass(v) and issubclass(v, nn.Module) and v.__module__ == namespace.get("__name__")
    ]
    constructible = [k for k, v in defined if _no_arg_constructible(v)]
    if len(constructible) == 1:
        return _materialise(namespace[constructible[0]], constructible[0], label, nn)
    if len(constructible) > 1:
        raise LoadError(
            f"{label}: several nn.Module classes could be the model ({', '.join(constructible)}); "
            f"pick one with {label}:{constructible[-1]} or define `model` or build_model()"
        )
    hint = f" (classes needing arguments: {', '.join(k for k, _ in defined)})" if defined else ""
    raise NoModelFound(
        f"{label}: no model found: define `model`, a build_model() factory or an nn.Module class without "
        f"required arguments, or name one with {label}:NAME{hint}"
    )


def _no_arg_constructible(cls: type) -> bool:
    if inspect.isabstract(cls):
        return False
    try:
        sig = inspect.signature(cls)
    except (TypeError, ValueError):
        return False
    return all(
        p.default is not inspect.Parameter.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        for p in sig.parameters.values()
    )


def _materialise(obj: Any, name: str, label: str, nn) -> tuple[Any, Any, str | None]:
    if isinstance(obj, nn.Module):
        return obj, None, None
    if inspect.isclass(obj):
        if not issubclass(obj, nn.Module):
            raise LoadError(f"{label}: {name} is a class but not an nn.Module")
        if not _no_arg_constructible(obj):
            raise LoadError(
                f"{label}: class {name} needs constructor arguments; point at a factory that builds it "
                f"(e.g. {label}:build_model)"
            )
        return _call(obj, name, label, nn), None, None
    if callable(obj):
        try:
            inspect.signature(obj).bind()
        except TypeError:
            raise LoadError(f"{label}: {name}() needs arguments; gradaudit calls it without any") from None
        except ValueError:
            pass
        result = _call(obj, name, label, nn)
        if isinstance(result, nn.Module):
            return result, None, name
        if isinstance(result, (tuple, list)) and len(result) == 2 and isinstance(result[0], nn.Module):
            return result[0], result[1], name
        raise LoadError(
            f"{label}: {name}() returned {type(result).__name__}, not an nn.Module or (module, example_inputs)"
        )
    raise LoadError(f"{label}: {name} is a {type(obj).__name__}, not an nn.Module, a module class or a factory")


def _call(fn: Any, name: str, label: str, nn) -> Any:
    try:
        return fn()
    except BaseException as exc:
        if isinstance(exc, KeyboardInterrupt):
            raise
        path = label if label.endswith(".py") else None
        where = _where(exc, path) if path else _where(exc, None)
        raise LoadError(f"{where}: {name}() raised {_describe(exc)}") from exc


# -- example inputs ---------------------------------------------------------------------------


def _example_inputs(value: Any, label: str) -> Any:
    import torch

    if callable(value) and not isinstance(value, torch.Tensor):
        try:
            return value()
        except BaseException as exc:
            if isinstance(exc, KeyboardInterrupt):
                raise
            path = label if label.endswith(".py") else None
            raise LoadError(f"{_where(exc, path)}: example_inputs() raised {_describe(exc)}") from exc
    return value


def _as_inputs(value: Any, where: str) -> tuple:
    import torch

    if isinstance(value, torch.Tensor):
        return (value,)
    if isinstance(value, (tuple, list)) and value:
        return tuple(value)
    raise LoadError(f"{where} gave {type(value).__name__}, not a tensor or a tuple of tensors")


_DTYPES = {
    "float32": "float32", "float": "float32", "fp32": "float32",
    "float64": "float64", "double": "float64", "fp64": "float64",
    "float16": "float16", "half": "float16", "fp16": "float16",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "int64": "int64", "long": "int64", "int32": "int32", "int": "int32",
    "int16": "int16", "int8": "int8", "uint8": "uint8", "bool": "bool",
}


def parse_dtype(name: str):
    """``"int64"`` -> ``torch.int64``; raise :class:`ConfigError` for unknown names."""
    import torch

    key = name.strip().lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise ConfigError(f"unknown input dtype {name!r} (use one of float32, float16, bfloat16, float64, int64, int32)")
    return getattr(torch, _DTYPES[key])


def parse_dtypes(text: str | None) -> dict[str | None, str]:
    """``"int64"`` -> ``{None: "int64"}`` (every input); ``"input_ids=int64,mask=bool"``
    -> one dtype per keyword input. Unknown dtypes are a :class:`ConfigError`."""
    out: dict[str | None, str] = {}
    for part in (p.strip() for p in (text or "").split(",")):
        if not part:
            continue
        name, _, dtype = part.rpartition("=")
        parse_dtype(dtype)
        out[name.strip() or None] = dtype.strip()
    return out


def make_inputs(
    shapes: list[tuple[int, ...]],
    dtype: str | None,
    value_range: tuple[float, float] | None,
    model: Any = None,
) -> tuple[Any, dict[Any, tuple[float, float]]]:
    """Tensors of the given shapes; integer dtypes draw ids in ``value_range``.

    A shape with a ``name`` (``--input-shape input_ids=2,16``, see :func:`parse_shape`)
    is a keyword input; ``dtype`` may name one per keyword (``input_ids=int64``). Integer
    inputs without a range: ids below the first embedding's size, except keyword inputs
    named like masks (all ones) and ``token_type_ids`` (zeros).

    Floating inputs are N(0, 1), or uniform on the range when one is given, and the
    static pass is told the distribution they were drawn from (mean 0 and standard
    deviation 1, or (lo+hi)/2 and (hi-lo)/sqrt(12)), not one draw's statistics. A private generator is used:
    the global RNG state is not touched. Returns a tuple of positional inputs, or an
    :class:`~gradaudit.frontends.signature.ExampleCall` when some are keyword inputs,
    and the (mean, std) per input position or keyword.
    """
    import torch

    dtypes = parse_dtypes(dtype)
    widest = max((parse_dtype(d) for d in dtypes.values()), key=lambda t: t.itemsize, default=torch.float32)
    check_input_size(shapes, widest if widest.itemsize >= 4 else torch.float32)
    gen = torch.Generator().manual_seed(0)
    stats: dict[Any, tuple[float, float]] = {}
    args: list = []
    kwargs: dict = {}
    if value_range is not None and value_range[1] <= value_range[0]:
        raise ConfigError(f"--input-range {value_range[0]:g},{value_range[1]:g} is empty: the upper end must be larger")
    names = {getattr(s, "name", None) for s in shapes}
    for key in dtypes:
        if key is not None and key not in names:
            raise ConfigError(f"--input-dtype {key}=...: no --input-shape {key}=... to apply it to")
    for i, shape in enumerate(shapes):
        name = getattr(shape, "name", None)
        label = dtypes.get(name) or dtypes.get(None)
        torch_dtype = parse_dtype(label) if label else torch.float32
        key = name if name is not None else len(args)
        if torch_dtype.is_floating_point:
            if value_range is None:
                x = torch.randn(tuple(shape), generator=gen).to(torch_dtype)
                stats[key] = (0.0, 1.0)
            else:
                lo, hi = value_range
                x = (torch.rand(tuple(shape), generator=gen) * (hi - lo) + lo).to(torch_dtype)
                stats[key] = ((lo + hi) / 2.0, (hi - lo) / 12**0.5)
        elif torch_dtype == torch.bool:
            x = torch.ones(tuple(shape), dtype=torch.bool) if name and "mask" in name else torch.rand(tuple(shape), generator=gen) < 0.5
        elif value_range is None and name and "mask" in name:
            x = torch.ones(tuple(shape), dtype=torch_dtype)
        elif value_range is None and name == "token_type_ids":
            x = torch.zeros(tuple(shape), dtype=torch_dtype)
        else:
            if value_range is None:
                vocab = _embedding_size(model)
                if vocab is None:
                    raise ConfigError(f"--input-dtype {label} needs --input-range LO,HI for the integer values")
                lo, hi = 0, vocab
            else:
                lo, hi = int(value_range[0]), int(value_range[1])
            x = torch.randint(lo, hi, tuple(shape), generator=gen, dtype=torch_dtype)
        if name is None:
            args.append(x)
        else:
            kwargs[name] = x
    if kwargs:
        from gradaudit.frontends.signature import ExampleCall

        return ExampleCall(tuple(args), kwargs), stats
    return tuple(args), stats


#: Largest example input, all inputs together: the audit needs a small batch, and the
#: inputs are allocated (the probe runs them; the static pass traces with them).
MAX_INPUT_BYTES = 2**30


def check_input_size(shapes: list[tuple[int, ...]], dtype: Any) -> None:
    """:class:`ConfigError` naming the size and the limit when the inputs of ``shapes``
    would take more than :data:`MAX_INPUT_BYTES`: checked before anything is allocated."""
    import math

    itemsize = dtype.itemsize if hasattr(dtype, "itemsize") else 4
    total = sum(math.prod(shape) for shape in shapes) * itemsize
    if total > MAX_INPUT_BYTES:
        given = " ".join(f"--input-shape {','.join(map(str, s))}" for s in shapes)
        raise ConfigError(
            f"{given}: the inputs would take {total / 2**30:.3g} GiB ({str(dtype).replace('torch.', '')}), over the "
            f"{MAX_INPUT_BYTES / 2**30:g} GiB limit for example inputs; a batch of 2 at the real feature sizes "
            "is enough for the audit"
        )


def _embedding_size(model: Any) -> int | None:
    import torch.nn as nn

    if model is None:
        return None
    for m in model.modules():
        if isinstance(m, (nn.Embedding, nn.EmbeddingBag)):
            return int(m.num_embeddings)
    return None


def infer_inputs(model: Any) -> tuple[tuple, str]:
    """Example inputs from the first layer that consumes the model's input.

    Linear -> ``(2, in_features)``; ConvNd / ConvTransposeNd -> ``(2, C, 32, ...)``;
    Embedding -> int64 ids ``(2, 8)`` below ``num_embeddings``; LSTM / GRU / RNN and
    MultiheadAttention -> ``(2, 8, features)`` (``(8, 2, features)`` unless batch_first);
    BatchNormNd and LayerNorm from their feature sizes. The first consumer is found by a
    symbolic trace; when the model cannot be traced, by registration order. Raises
    :class:`LoadError` asking for ``--input-shape`` when nothing fits.
    """
    import torch

    framework = _framework_inputs(model)
    if framework is not None:
        return framework
    gen = torch.Generator().manual_seed(0)
    n_inputs = _required_inputs(model)
    if n_inputs != 1:
        raise LoadError(
            f"{type(model).__name__}.forward takes {n_inputs} inputs; give one --input-shape per input"
        )
    found = _first_consumer(model)
    if found is None:
        raise LoadError(
            f"cannot infer the input of {type(model).__name__} from its first layer; pass --input-shape "
            "(e.g. --input-shape 2,3,224,224) or define example_inputs in the model file"
        )
    name, layer = found
    shape, dtype, detail = _shape_for(layer)
    if dtype == torch.int64:
        x = torch.randint(0, int(layer.num_embeddings), shape, generator=gen, dtype=torch.int64)
    else:
        x = torch.randn(shape, generator=gen)
    named = f" '{name}'" if name else ""
    return (x,), f"inferred from {type(layer).__name__}{named} ({detail})"


def _framework_inputs(model: Any) -> tuple[Any, str] | None:
    """Inputs of a Hugging Face model (from its ``config`` and ``main_input_name``) or a
    timm model (from ``pretrained_cfg`` / ``default_cfg['input_size']``); None otherwise.

    Hugging Face: ``input_ids`` (2, 8) below ``vocab_size`` with an all-ones
    ``attention_mask``, plus ``decoder_input_ids`` for encoder-decoders; ``pixel_values``
    (2, C, S, S) from ``num_channels`` and ``image_size``; ``input_values`` (2, 1600) for
    speech encoders; ``input_features`` (2, mel bins, 2 * max_source_positions) for
    Whisper. ``use_cache=False`` where ``forward`` takes it: a generation cache is not an
    output to train on.
    """
    import torch

    gen = torch.Generator().manual_seed(0)
    config = getattr(model, "config", None)
    main = getattr(model, "main_input_name", None)
    if config is not None and isinstance(main, str):
        try:
            params = inspect.signature(model.forward).parameters
        except (TypeError, ValueError):
            params = {}
        kwargs: dict[str, Any] = {}
        detail = f"main_input_name={main}"
        if main == "input_ids":
            vocab = int(getattr(config, "vocab_size", 0) or 0) or (_embedding_size(model) or 2)
            kwargs["input_ids"] = torch.randint(0, vocab, (BATCH, SEQUENCE), generator=gen)
            if "attention_mask" in params:
                kwargs["attention_mask"] = torch.ones(BATCH, SEQUENCE, dtype=torch.long)
            if getattr(config, "is_encoder_decoder", False) and "decoder_input_ids" in params:
                kwargs["decoder_input_ids"] = torch.randint(0, vocab, (BATCH, SEQUENCE), generator=gen)
            detail += f", vocab_size={vocab}"
        elif main == "pixel_values":
            size = getattr(config, "image_size", SPATIAL)
            size = tuple(size) if isinstance(size, (tuple, list)) else (int(size), int(size))
            channels = int(getattr(config, "num_channels", 3))
            kwargs["pixel_values"] = torch.randn((BATCH, channels) + size, generator=gen)
            detail += f", image_size={list(size)}, num_channels={channels}"
        elif main == "input_values":
            kwargs["input_values"] = torch.randn(BATCH, 1600, generator=gen)
        elif main == "input_features":
            mels = int(getattr(config, "num_mel_bins", 80))
            frames = 2 * int(getattr(config, "max_source_positions", 1500))
            kwargs["input_features"] = torch.randn(BATCH, mels, frames, generator=gen)
            if getattr(config, "is_encoder_decoder", False) and "decoder_input_ids" in params:
                vocab = int(getattr(config, "vocab_size", 2))
                kwargs["decoder_input_ids"] = torch.randint(0, vocab, (BATCH, SEQUENCE), generator=gen)
            detail += f", num_mel_bins={mels}"
        else:
            return None
        if "use_cache" in params:
            kwargs["use_cache"] = False
        from gradaudit.frontends.signature import ExampleCall

        return ExampleCall((), kwargs), f"inferred from the Hugging Face config ({detail})"
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    if isinstance(cfg, dict) and isinstance(cfg.get("input_size"), (tuple, list)):
        size = tuple(int(d) for d in cfg["input_size"])
        x = torch.randn((BATCH,) + size, generator=gen)
        return (x,), f"inferred from the timm pretrained_cfg (input_size={list(size)})"
    return None


def _required_inputs(model: Any) -> int:
    try:
        sig = inspect.signature(model.forward)
    except (TypeError, ValueError):
        return 1
    required = [
        p for p in sig.parameters.values()
        if p.default is inspect.Parameter.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    return len(required) if required else 1


def _consumer_types():
    import torch.nn as nn

    return (
        nn.Linear, nn.Bilinear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
        nn.ConvTranspose3d, nn.Embedding, nn.EmbeddingBag, nn.RNNBase, nn.MultiheadAttention,
        nn.TransformerEncoderLayer, nn.TransformerDecoderLayer, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d,
        nn.LayerNorm,
    )


def _first_consumer(model: Any) -> tuple[str, Any] | None:
    import torch.fx as fx

    kinds = _consumer_types()
    if isinstance(model, kinds):
        return "", model

    class Tracer(fx.Tracer):
        def is_leaf_module(self, m, qualname):
            return isinstance(m, kinds) or super().is_leaf_module(m, qualname)

    try:
        graph = Tracer().trace(model)
        modules = dict(model.named_modules())
        for node in graph.nodes:
            if node.op == "call_module" and isinstance(modules.get(str(node.target)), kinds):
                return str(node.target), modules[str(node.target)]
    except Exception:  # untraceable: fall back to registration order
        pass
    for name, m in model.named_modules():
        if isinstance(m, kinds) and not _is_lazy(m):
            return name, m
    return None


def _is_lazy(m: Any) -> bool:
    from torch.nn.modules.lazy import LazyModuleMixin

    return isinstance(m, LazyModuleMixin)


def _shape_for(layer: Any) -> tuple[tuple[int, ...], Any, str]:
    import torch
    import torch.nn as nn

    if _is_lazy(layer):
        raise LoadError(f"cannot infer the input of a lazy {type(layer).__name__}; pass --input-shape")
    if isinstance(layer, nn.Linear):
        return (BATCH, layer.in_features), torch.float32, f"in_features={layer.in_features}"
    if isinstance(layer, nn.Bilinear):
        return (BATCH, layer.in1_features), torch.float32, f"in1_features={layer.in1_features}"
    if isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
        nd = len(layer.kernel_size)
        return (BATCH, layer.in_channels) + (SPATIAL,) * nd, torch.float32, f"in_channels={layer.in_channels}"
    if isinstance(layer, (nn.Embedding, nn.EmbeddingBag)):
        return (BATCH, SEQUENCE), torch.int64, f"num_embeddings={layer.num_embeddings}"
    if isinstance(layer, nn.RNNBase):
        shape = (BATCH, SEQUENCE, layer.input_size) if layer.batch_first else (SEQUENCE, BATCH, layer.input_size)
        return shape, torch.float32, f"input_size={layer.input_size}, batch_first={layer.batch_first}"
    if isinstance(layer, nn.MultiheadAttention):
        d = layer.embed_dim
        shape = (BATCH, SEQUENCE, d) if layer.batch_first else (SEQUENCE, BATCH, d)
        return shape, torch.float32, f"embed_dim={d}, batch_first={layer.batch_first}"
    if isinstance(layer, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
        d = layer.self_attn.embed_dim
        first = layer.self_attn.batch_first
        shape = (BATCH, SEQUENCE, d) if first else (SEQUENCE, BATCH, d)
        return shape, torch.float32, f"d_model={d}, batch_first={first}"
    if isinstance(layer, nn.BatchNorm1d):
        return (BATCH, layer.num_features), torch.float32, f"num_features={layer.num_features}"
    if isinstance(layer, (nn.BatchNorm2d, nn.BatchNorm3d)):
        nd = 2 if isinstance(layer, nn.BatchNorm2d) else 3
        return (BATCH, layer.num_features) + (SPATIAL,) * nd, torch.float32, f"num_features={layer.num_features}"
    if isinstance(layer, nn.LayerNorm):
        shape = tuple(layer.normalized_shape)
        return (BATCH,) + shape, torch.float32, f"normalized_shape={list(shape)}"
    raise LoadError(f"cannot infer the input of {type(layer).__name__}; pass --input-shape")


class Shape(tuple):
    """An input's shape; ``name`` is the keyword it is passed by (None: positional)."""

    name: str | None = None

    def __new__(cls, dims, name: str | None = None):
        out = super().__new__(cls, dims)
        out.name = name
        return out


def parse_shape(text: str) -> Shape:
    """``"2,3,224,224"`` (or ``2x3x224x224``) -> ``(2, 3, 224, 224)``; ``"input_ids=2,16"``
    -> the shape of keyword input ``input_ids``; :class:`ConfigError` if bad."""
    text = str(text).strip()
    name = None
    m = re.match(r"^([A-Za-z_]\w*)\s*=\s*(.*)$", text)
    if m:
        name, text = m.group(1), m.group(2)
    parts = [p for p in re.split(r"[,\s]+|(?<=\d)x(?=\d)", text.strip("()[]")) if p]
    try:
        dims = tuple(int(p) for p in parts)
    except ValueError:
        dims = ()
    if not dims or any(d <= 0 for d in dims):
        raise ConfigError(f"bad input shape {text!r}: expected positive integers like 2,3,224,224 (or name=2,16)")
    return Shape(dims, name)


def parse_range(text: str) -> tuple[float, float]:
    """``"0,30522"`` -> ``(0.0, 30522.0)``; :class:`ConfigError` if bad."""
    parts = [p for p in re.split(r"[,\s]+", str(text).strip().strip("()[]")) if p]
    try:
        lo, hi = (float(p) for p in parts)
    except ValueError:
        raise ConfigError(f"bad input range {text!r}: expected LO,HI like 0,30522") from None
    if not hi > lo:
        raise ConfigError(f"bad input range {text!r}: the upper end must be larger than the lower")
    return lo, hi
