"""ONNX models for the ONNX tests, all made by code: small graphs built with
``onnx.helper``, the repository's torch models exported with both torch exporters, and
the light model zoo the onnx wheel ships. Nothing here is a stored binary.

:func:`autograd_norms` is the probe tests' oracle: real autograd on the torch model,
sharing no code with gradaudit.
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
import warnings
from pathlib import Path

import torch
import torch.nn as nn


def light_zoo() -> list[Path]:
    """The nine networks of onnx's backend test data (``light_*.onnx``)."""
    import onnx

    folder = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
    return sorted(folder.glob("light_*.onnx"))


def make_model(nodes, inputs, outputs, initializers=(), opset: int = 17, ir_version: int | None = None):
    """A checked ModelProto from ``onnx.helper`` parts (inputs/outputs as (name, elem, shape))."""
    import onnx
    from onnx import helper

    def info(spec):
        return spec if not isinstance(spec, tuple) else helper.make_tensor_value_info(*spec)

    graph = helper.make_graph(list(nodes), "g", [info(i) for i in inputs], [info(o) for o in outputs],
                              list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    if ir_version is not None:
        model.ir_version = ir_version
    model = onnx.shape_inference.infer_shapes(model)  # types for outputs given without one
    onnx.checker.check_model(model)
    return model


def tensor(name: str, array):
    from onnx import numpy_helper

    import numpy as np

    return numpy_helper.from_array(np.asarray(array), name)


def save(model, path: Path) -> Path:
    path.write_bytes(model.SerializeToString())
    return path


def run_ir(graph, inputs: list) -> dict:
    """Compute the IR graph with its own callables (what the propagation evaluates):
    ``{ONNX output name: value}``."""
    from gradaudit.ir import callable_of, map_refs

    env: dict = {}
    feed = iter(inputs)
    for n in graph.nodes:
        if n.op == "input":
            env[n.name] = next(feed)
        elif n.op == "param":
            env[n.name] = n.params["value"]
        elif n.op != "output":
            args = map_refs(n.args, lambda r: env[r.name])
            kwargs = map_refs(n.kwargs, lambda r: env[r.name])
            with torch.no_grad():
                env[n.name] = callable_of(n)(*args, **kwargs)
    return {graph.tensor_of.get(n): env[n] for n in graph.output_refs}


def run_ort(model, inputs: dict) -> dict:
    """The model's outputs by onnxruntime, ``{name: array}`` (no graph optimisations:
    training-mode BatchNorm stays as it is)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, inputs)))


def export(model: nn.Module, inputs: tuple, path: Path, dynamo: bool = False, opset: int | None = None) -> Path:
    """``torch.onnx.export`` in training mode (BatchNorm kept as trained); the dynamo
    exporter without its optimizer, which folds BatchNorm into convolutions (``opset``:
    its opset, default the exporter's)."""
    model = copy.deepcopy(model).train()
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        if dynamo:
            torch.onnx.export(model, inputs, str(path), dynamo=True, training=torch.onnx.TrainingMode.TRAINING,
                              optimize=False, **({"opset_version": opset} if opset else {}))
        else:
            torch.onnx.export(model, inputs, str(path), dynamo=False, training=torch.onnx.TrainingMode.TRAINING,
                              do_constant_folding=False)
    return path


def dynamo_available() -> bool:
    try:
        import onnxscript  # noqa: F401
    except ImportError:
        return False
    return True


def _flat(value, out: list) -> None:
    if isinstance(value, (tuple, list)):
        for v in value:
            _flat(v, out)
    elif isinstance(value, torch.Tensor) and value.is_floating_point():
        out.append(value)


def autograd_norms(model: nn.Module, inputs: tuple, draws: int = 256, seed: int = 0) -> dict:
    """Mean squares of dL/dy and dL/dW by autograd, averaged over ``draws`` cotangents.

    L = sum over floating outputs of <y, g>, g ~ N(0, 1), the model in training mode
    (a deep copy: the model under test is untouched), dropout redrawn each draw, the
    inputs leaves that require grad. Returns ``{"grad": {(module, call): E[(dL/dy)^2]},
    "param": {name: E||dL/dp||^2}}`` -- layer outputs by forward hooks on every module
    that owns parameters, per call (the rest of the model reads a copy, so in-place ops
    downstream leave the captured output alone); frozen parameters are left out."""
    m = copy.deepcopy(model).train()
    named = {n: mod for n, mod in m.named_modules() if any(True for _ in mod.parameters(recurse=False))}
    params = dict(m.named_parameters())
    grad: dict = {}
    param: dict = {n: 0.0 for n, p in params.items() if p.requires_grad}
    gen = torch.Generator().manual_seed(seed)
    for d in range(draws):
        captured: list = []
        calls: dict = {}

        def hook(mod, args, out, name=None):
            k = calls.get(name, 0)
            calls[name] = k + 1
            y = out[0] if isinstance(out, tuple) else out
            captured.append(((name, k), y))
            if isinstance(out, torch.Tensor):
                # the model reads a copy: an in-place op after the layer (ReLU(inplace=True))
                # must not turn the captured tensor into its own output
                return out.clone()
            return None

        handles = [mod.register_forward_hook(lambda mod, a, o, name=n: hook(mod, a, o, name)) for n, mod in named.items()]
        xs = tuple(x.detach().clone().requires_grad_(True) if x.is_floating_point() else x for x in inputs)
        try:
            torch.manual_seed(seed + d)
            out = m(*xs)
        finally:
            for h in handles:
                h.remove()
        ys: list = []
        _flat(out, ys)
        gs = [torch.randn(y.shape, generator=gen) for y in ys]
        outs = [(key, y) for key, y in captured if y.requires_grad]
        trained = [(n, p) for n, p in params.items() if p.requires_grad]
        grads = torch.autograd.grad(ys, [y for _, y in outs] + [p for _, p in trained], gs, allow_unused=True)
        for (key, y), g in zip(outs, grads[: len(outs)]):
            if g is not None:
                grad[key] = grad.get(key, 0.0) + float(g.double().pow(2).mean()) / draws
        for (name, _), g in zip(trained, grads[len(outs):]):
            if g is not None:
                param[name] += float(g.double().pow(2).sum()) / draws
    return {"grad": grad, "param": param}


def layer_params(model: nn.Module, module: str) -> list[str]:
    """The torch parameter names behind a layer named ``module``: all the module's, its
    children's included (nn.MultiheadAttention's out-projection), as the probes count
    them; none for a name that is no module."""
    mods = dict(model.named_modules())
    if module not in mods:
        return []
    return [f"{module}.{n}" if module else n for n, _ in mods[module].named_parameters()]


def by_call(layers) -> dict:
    """``{(module, k): layer}`` for the k-th call of each module in a report's layers."""
    out: dict = {}
    for layer in layers:
        k = 0
        while (layer.module, k) in out:
            k += 1
        out[(layer.module, k)] = layer
    return out


def within(a: float, b: float, rel: float) -> bool:
    return math.isfinite(a) and math.isfinite(b) and abs(a - b) <= rel * abs(b)
