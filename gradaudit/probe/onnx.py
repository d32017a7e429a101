"""The ONNX probe: gradients of a graph that has no autograd, by directional finite
differences through onnxruntime.

It measures the same quantities as the torch probe (:mod:`gradaudit.probe.gradients`),
for the same layers, into the same ``measured`` blocks; with L as in DESIGN.md,

    L = sum over every floating output y of <y, g>,   g ~ N(0, 1) drawn per element,

- ``act_rms`` = sqrt(E[y^2]) of each layer's output: read off a forward run, exact;
- ``grad_rms`` = sqrt(E[(dL/dy)^2]) over the layer output's n elements;
- the weight-gradient RMS sqrt(||dL/dW||^2 / n_W) over the layer's parameters (weight and
  bias together, as the torch probe sums them) and ||dL/dW|| / ||W||.

For a direction v on the unit sphere of R^n, E_v[<u, v>^2] = ||u||^2 / n (E[v v^T] = I/n).
With u = dL/dy = J^T g (J the Jacobian of the outputs with respect to y), the expectation
over the cotangent is taken in closed form, E_g[<J^T g, v>^2] = ||J v||^2, so

    grad_rms^2 = E_g[||J^T g||^2] / n = E_v[||J v||^2],

and J v -- how all the outputs move when y moves along v -- is a forward difference,
(f(y + h v) - f(y)) / h, against the unperturbed run. For the output gradient the probe graph adds
a zero input to each layer's output (``y + delta``) and moves that input; for the weight
gradient it feeds the layer's parameters, moved along a direction of their joint space.
The torch probe draws g and averages ``draws`` draws; here the expectation over g is
exact, and ``draws`` only changes the dropout masks (drawn once per draw).

Each estimate averages K directions (normalised Gaussian vectors). Per direction the
relative spread of ||J v||^2 is about sqrt(2 / r), r the effective rank of J^T J (up to
the number of output elements), so a model with many outputs needs few directions and one
with few outputs many. Every estimate gets :data:`K_MIN`; further directions go to the
estimate whose standard error, as a fraction of the RMS (se / (2 mean)), is largest,
until all are within :data:`TARGET` with at least :data:`K_TRUST` directions (a spread
measured on fewer is itself too uncertain to stop on: where J has a small effective
rank, as through a saturated softmax, ||J v||^2 is heavy-tailed and four directions
can agree closely on half the true value), or :data:`K_MAX`, or
the extra runs would pass :data:`BUDGET` floating-point operations (counted, not timed:
the result does not depend on the machine). The reached uncertainty is reported per
layer. Each direction runs only the sub-graph below the layer, from a base run's values.
The step h moves the tensor by :data:`STEP` of its norm: 1e-3 in float32, 1e-6 in
float64. The forward difference is off by O(h) -- about 1e-3 relative where the graph
bends (BatchNorm, saturating activations), nothing where it is piecewise linear (ReLU
away from its kinks) -- and float32 rounding costs about 1e-4 relative at that step;
both are far below the sampling error above. The perturbed and unperturbed runs compute
every unperturbed node bitwise alike (the same kernels on the same values), so only the
perturbation's own effect differs. The probe runs in float64 when onnxruntime has
float64 kernels for every op of the graph, else float32.

BatchNormalization runs with batch statistics as in training (decomposed into its
reductions, since the exported node may be in inference mode) and dropout as a fixed
mask per draw, like the torch probe's training-mode runs.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

from gradaudit.errors import CaptureError, ConfigError
from gradaudit.probe.agreement import agreement, input_rms
from gradaudit.probe.gradients import SEED
from gradaudit.probe.nonfinite import NonFinite, tensor_summary
from gradaudit.probe.result import LayerMeasure, ProbeResult, clean
from gradaudit.probe.thresholds import threshold
from gradaudit.probe.units import SATURATING, ZERO_REGION, UnitStats
from gradaudit.probe.inputs import first_line
from gradaudit.progress import progress

#: Relative step h / ||tensor|| per precision.
STEP = {"float64": 1e-6, "float32": 1e-3}
#: Directions per estimate: every estimate gets K_MIN; more go, most uncertain first, to
#: estimates above TARGET relative standard error of the RMS (or with fewer than K_TRUST), up to
#: K_MAX each, while the extra directions fit in BUDGET floating-point operations.
K_MIN, K_TRUST, K_MAX, TARGET = 2, 8, 256, 0.05
#: About 170 forward passes of ResNet-18 on a 2x3x224x224 batch (3.6e9 each); each run
#: also counts RUN_COST for the fixed cost of a call (about half a millisecond).
BUDGET, RUN_COST = 6e11, 2.5e7
_PREFIX = "__gradaudit_"


@dataclass
class Estimate:
    """Samples of ||J v||^2 along random unit directions: their mean estimates a mean
    square gradient; ``rel_err`` is the standard error of its square root, relative."""

    samples: list[float] = field(default_factory=list)

    @property
    def mean(self) -> float:
        return sum(self.samples) / len(self.samples) if self.samples else float("nan")

    @property
    def rel_err(self) -> float:
        k = len(self.samples)
        if k < 2:
            return float("inf")
        m = self.mean
        if not math.isfinite(m):
            return float("nan")
        if m <= 0:
            return 0.0
        var = sum((s - m) ** 2 for s in self.samples) / (k - 1)
        return math.sqrt(var / k) / (2 * m)

    def wants_more(self) -> bool:
        if len(self.samples) >= K_MAX:
            return False
        return len(self.samples) < K_TRUST or not self.rel_err <= TARGET


@dataclass
class Layer:
    node: str
    module: str | None
    tensor: str
    params: list[str]
    grad: Estimate = field(default_factory=Estimate)
    weight_grad: Estimate = field(default_factory=Estimate)

    @property
    def delta(self) -> str:
        return f"{_PREFIX}delta_{self.node}"

    @property
    def pre(self) -> str:
        return f"{self.tensor}{_PREFIX}pre"


@dataclass
class OnnxProbeResult(ProbeResult):
    """A :class:`ProbeResult` plus the finite-difference estimator's per-layer detail."""

    estimator: dict[str, Any] = field(default_factory=dict)

    def layer_extra(self, node: str) -> dict[str, Any]:
        return self.estimator.get("layers", {}).get(node, {})

    def to_json(self) -> dict:
        out = super().to_json()
        out["estimator"] = clean(self.estimator)
        return out


def probe(model, inputs: tuple, analysis, *, draws: int = 2, device: str = "cpu", dtype: str = "fp32",
          settings: Any = None, loss_fn=None, loss_batches=None) -> OnnxProbeResult:
    """Measure ``analysis``'s layers on the ONNX model (see the module docstring)."""
    if loss_fn is not None:
        raise ConfigError("loss_fn differentiates a loss of the PyTorch model's outputs; the ONNX probe measures "
                          "the synthetic loss only")
    if dtype != "fp32":
        raise ConfigError("--dtype fp16/bf16 runs the torch probe under autocast; the ONNX probe runs the graph as "
                          "stored (use --dtype fp32)")
    if device.startswith("cuda"):
        raise ConfigError("the ONNX probe runs on onnxruntime's CPU provider (use --device cpu)")
    import numpy as np

    started = time.perf_counter()
    graph = analysis.graph
    runner = ProbeGraph(model, graph, analysis, inputs)
    layers = runner.layers
    result_layers = {n.name: LayerMeasure(n.name, n.module) for n in analysis.layers()}
    gen = np.random.default_rng(SEED)
    masks = [runner.masks(np.random.default_rng(SEED + d)) for d in range(draws)]
    bases = [runner.run(m, kind="observe") for m in masks]
    notes: list[str] = []
    nonfinite = None
    if not all(np.isfinite(b[o]).all() for b in bases for o in runner.outputs):
        nonfinite = runner.first_nonfinite(masks[0])
    units = runner.units(bases[0], settings) if nonfinite is None else []
    for base in bases:
        for layer in layers:
            m = result_layers.get(layer.node)
            if layer.pre in base and m is not None:
                m.act_sq += float(np.mean(np.square(base[layer.pre], dtype=np.float64)))
                m.draws += 1
    if nonfinite is None:
        _measure(runner, masks, bases, gen)
    grad_sq = 0.0
    detail: dict[str, dict] = {}
    for layer in layers:
        m = result_layers.get(layer.node)
        if m is None:
            continue
        n_theta, w_sq = runner.param_size(layer)
        if layer.grad.samples:
            m.grad_sq, m.grad_draws = layer.grad.mean * draws, draws
        if layer.weight_grad.samples:
            m.weight_numel, m.weight_sq = n_theta, w_sq
            m.weight_grad_sq = layer.weight_grad.mean * n_theta * draws
            grad_sq += layer.weight_grad.mean * n_theta
        detail[layer.node] = {
            "grad_rms_rel_uncertainty": layer.grad.rel_err if layer.grad.samples else None,
            "grad_directions": len(layer.grad.samples),
            "weight_grad_rms_rel_uncertainty": layer.weight_grad.rel_err if layer.weight_grad.samples else None,
            "weight_grad_directions": len(layer.weight_grad.samples),
        }
    errs = [e for d in detail.values() for e in (d["grad_rms_rel_uncertainty"], d["weight_grad_rms_rel_uncertainty"])
            if e is not None and math.isfinite(e)]
    seconds = time.perf_counter() - started
    notes.append(
        f"{draws} draw(s) on CPU (onnxruntime, {runner.precision}); gradients by forward differences along "
        f"{K_MIN} to {K_MAX} random directions per layer and quantity, step {STEP[runner.precision]:g} of the "
        f"tensor's norm; L = sum over floating outputs of <y, g>, expectation over g ~ N(0, 1) in closed form"
    )
    result = OnnxProbeResult(
        draws=draws,
        device="cpu",
        dtype=dtype,
        layers=result_layers,
        grad_norms=[math.sqrt(grad_sq)] * draws if nonfinite is None else [float("nan")] * draws,
        units=units,
        nonfinite=nonfinite,
        seconds_per_draw=seconds / max(draws, 1),
        notes=notes,
        estimator={
            "method": "forward differences along random unit directions (onnxruntime)",
            "precision": runner.precision,
            "step": STEP[runner.precision],
            "runs": runner.runs,
            "max_rel_uncertainty": max(errs) if errs else None,
            "median_rel_uncertainty": sorted(errs)[len(errs) // 2] if errs else None,
            "layers": detail,
        },
    )
    result.inputs = input_rms(analysis, inputs)
    result.agreement = agreement(analysis, result)
    return result


def _measure(runner: "ProbeGraph", masks: list[dict], bases: list[dict], gen) -> None:
    """K_MIN directions for every estimate, then more where the uncertainty is largest,
    as long as the total fits in :data:`BUDGET` (a deterministic schedule: no clock
    involved)."""
    jobs = [(layer, q) for layer in runner.layers for q in ("grad", "weight") if q == "grad" or layer.params]
    spent = 0.0
    with progress(len(jobs), "probe: finite differences per layer") as step:
        for layer, q in jobs:
            for _ in range(K_MIN):
                runner.direction(layer, q, masks, bases, gen)
                spent += runner.flops(layer)
            step()
    open_jobs = list(jobs)
    while open_jobs:
        open_jobs = [j for j in open_jobs if _estimate(*j).wants_more()]
        if not open_jobs:
            break
        layer, q = max(open_jobs, key=lambda j: (_priority(_estimate(*j)), -runner.layers.index(j[0])))
        cost = runner.flops(layer)
        if spent + cost > BUDGET:
            open_jobs.remove((layer, q))
            continue
        runner.direction(layer, q, masks, bases, gen)
        spent += cost


def _estimate(layer: Layer, quantity: str) -> Estimate:
    return layer.grad if quantity == "grad" else layer.weight_grad


def _priority(est: Estimate) -> float:
    e = est.rel_err
    return math.inf if not math.isfinite(e) else e + (1.0 if len(est.samples) < K_TRUST else 0.0)


class ProbeGraph:
    """The folded ONNX graph rewritten for measurement, and its onnxruntime sessions.

    Rewrites: every layer's output gets ``+ delta`` (a zero input unless moved); every
    layer's parameters and every large constant become inputs; BatchNormalization runs
    on batch statistics; Dropout multiplies by a mask input.
    """

    def __init__(self, model, graph, analysis, inputs: Any) -> None:
        import numpy as np
        import onnx

        self.graph = graph
        self.analysis = analysis
        self.onnx = onnx
        self.by_tensor = {t: n for n, t in graph.tensor_of.items()}
        self.runs = 0
        proto = onnx.ModelProto()
        proto.CopyFrom(graph.folded)
        self.proto = proto
        self.opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 1)
        g = proto.graph
        self.feeds: dict[str, Any] = {}
        from gradaudit.frontends.onnx_load import ordered_inputs

        tensors, _ = ordered_inputs(model, inputs)
        for info, x in zip(g.input, tensors):
            value = x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)
            declared = info.type.tensor_type.elem_type
            self.feeds[info.name] = value.astype(onnx.helper.tensor_dtype_to_np_dtype(declared)) if declared else value
        self.outputs = [o.name for o in g.output if _is_float(o)]
        self.layers = [
            Layer(n.name, n.module, graph.tensor_of[n.name], sorted(set(graph.params_of.get(n.name, {}).values())))
            for n in analysis.layers() if n.name in graph.tensor_of
        ]
        self._constants_as_inputs(np)
        self.dropouts: list[tuple[str, float, tuple]] = []
        self._rewrite_nodes(np)
        self._add_deltas(np)
        self.observe = [layer.pre for layer in self.layers] + self._unit_tensors()
        self.precision = "float32"
        self.sessions: dict[str, Any] = {}
        self.steps: dict[tuple[str, str], float] = {}
        self.costs: dict[str, float] = {}
        self._choose_precision(np)

    # -- rewriting ------------------------------------------------------------------
    def _constants_as_inputs(self, np) -> None:
        """Large constants (stubs in the folded graph) and every layer parameter become
        inputs fed from the folded values."""
        g = self.proto.graph
        params = {p for layer in self.layers for p in layer.params}
        keep = []
        for t in g.initializer:
            stub = not (t.raw_data or any(len(getattr(t, f)) for f in ("float_data", "int32_data", "int64_data",
                                                                      "double_data", "uint64_data", "string_data")))
            stub = stub and math.prod(t.dims) > 0
            if stub or t.name in params:
                value = self.graph.consts[t.name]
                g.input.append(self.onnx.helper.make_tensor_value_info(t.name, t.data_type, list(value.shape)))
                self.feeds[t.name] = np.ascontiguousarray(value)
            else:
                keep.append(t)
        g.ClearField("initializer")
        g.initializer.extend(keep)

    def _rewrite_nodes(self, np) -> None:
        from onnx import helper

        g = self.proto.graph
        nodes = []
        for k, node in enumerate(g.node):
            if node.op_type == "BatchNormalization" and node.domain in ("", "ai.onnx"):
                nodes.extend(self._batch_norm(node, k, np))
            elif node.op_type == "Dropout" and node.domain in ("", "ai.onnx"):
                mask = f"{_PREFIX}mask_{k}"
                p = self._dropout_ratio(node)
                shape = _shape_of(self.graph, node.input[0])
                if shape is None:
                    raise CaptureError(f"the ONNX probe needs the shape of '{node.input[0]}'")
                self.dropouts.append((mask, p, shape))
                g.input.append(helper.make_tensor_value_info(mask, self._elem(node.input[0]), list(shape)))
                nodes.append(helper.make_node("Mul", [node.input[0], mask], [node.output[0]], name=f"{node.name}/mask"))
            else:
                nodes.append(node)
        g.ClearField("node")
        g.node.extend(nodes)

    def _dropout_ratio(self, node) -> float:
        """The drop probability the frontend read for this Dropout node."""
        ir = self.by_tensor.get(node.output[0])
        if ir is None or self.graph[ir].op != "dropout":
            raise CaptureError(f"the ONNX probe cannot fix the mask of dropout node '{node.name}' (computed ratio)")
        return float(self.graph[ir].args[1])

    def _batch_norm(self, node, k: int, np) -> list:
        """y = (x - mean) / sqrt(var + eps) * scale + bias with batch mean and (biased)
        variance over every axis but the channels', as training computes it."""
        from onnx import helper, numpy_helper

        shape = _shape_of(self.graph, node.input[0])
        if shape is None:
            raise CaptureError(f"the ONNX probe needs the shape of '{node.input[0]}'")
        eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
        axes = [0] + list(range(2, len(shape)))
        p = f"{_PREFIX}bn{k}_"
        elem = self._elem(node.input[0])
        dtype = helper.tensor_dtype_to_np_dtype(elem)
        g = self.proto.graph
        g.initializer.append(numpy_helper.from_array(np.array(eps, dtype=dtype), p + "eps"))
        g.initializer.append(numpy_helper.from_array(np.array([1, shape[1]] + [1] * (len(shape) - 2), np.int64),
                                                     p + "shape"))
        if self.opset >= 18:
            g.initializer.append(numpy_helper.from_array(np.array(axes, np.int64), p + "axes"))
            mean = [helper.make_node("ReduceMean", [node.input[0], p + "axes"], [p + "mean"], keepdims=1)]
            var = [helper.make_node("ReduceMean", [p + "sq", p + "axes"], [p + "var"], keepdims=1)]
        else:
            mean = [helper.make_node("ReduceMean", [node.input[0]], [p + "mean"], axes=axes, keepdims=1)]
            var = [helper.make_node("ReduceMean", [p + "sq"], [p + "var"], axes=axes, keepdims=1)]
        return mean + [
            helper.make_node("Sub", [node.input[0], p + "mean"], [p + "d"]),
            helper.make_node("Mul", [p + "d", p + "d"], [p + "sq"]),
            *var,
            helper.make_node("Add", [p + "var", p + "eps"], [p + "ve"]),
            helper.make_node("Sqrt", [p + "ve"], [p + "sd"]),
            helper.make_node("Div", [p + "d", p + "sd"], [p + "xhat"]),
            helper.make_node("Reshape", [node.input[1], p + "shape"], [p + "scale"]),
            helper.make_node("Reshape", [node.input[2], p + "shape"], [p + "bias"]),
            helper.make_node("Mul", [p + "xhat", p + "scale"], [p + "scaled"]),
            helper.make_node("Add", [p + "scaled", p + "bias"], [node.output[0]], name=node.name),
        ]

    def _add_deltas(self, np) -> None:
        """``y`` becomes ``y_pre + delta``: the producer writes ``y_pre``, every reader
        (and the graph output) still reads ``y``."""
        from onnx import helper

        g = self.proto.graph
        producers = {o: n for n in g.node for o in n.output}
        extra = []
        for layer in self.layers:
            node = producers.get(layer.tensor)
            shape = _shape_of(self.graph, layer.tensor)
            if node is None or shape is None:
                raise CaptureError(f"the ONNX probe cannot find the output '{layer.tensor}' of layer '{layer.node}'")
            outs = list(node.output)
            outs[outs.index(layer.tensor)] = layer.pre
            node.ClearField("output")
            node.output.extend(outs)
            extra.append(helper.make_node("Add", [layer.pre, layer.delta], [layer.tensor], name=f"{layer.node}/delta"))
            g.input.append(helper.make_tensor_value_info(layer.delta, self._elem(layer.tensor), list(shape)))
            self.feeds[layer.delta] = np.zeros(shape, dtype=helper.tensor_dtype_to_np_dtype(self._elem(layer.tensor)))
        ordered = []
        for node in list(g.node):
            ordered.append(node)
            ordered.extend(a for a in extra if a.input[0] in node.output)
        g.ClearField("node")
        g.node.extend(ordered)

    def _elem(self, tensor: str) -> int:
        """The ONNX element type of ``tensor`` (float when nothing says otherwise)."""
        import numpy as np
        from onnx import helper

        elem = self.graph.shapes.get(tensor, (None, 0))[1]
        if elem:
            return elem
        v = self.graph.consts.get(tensor)
        return helper.np_dtype_to_tensor_dtype(v.dtype) if isinstance(v, np.ndarray) else 1

    def _ir_name(self, tensor: str) -> str | None:
        """The IR node whose output is ONNX tensor ``tensor``."""
        return self.by_tensor.get(tensor)

    def _unit_tensors(self) -> list[str]:
        """Activation outputs (dead units) and saturating activations' inputs."""
        out = []
        for n in self.graph:
            if n.op in ZERO_REGION and n.name in self.graph.tensor_of:
                out.append(self.graph.tensor_of[n.name])
            elif n.op in SATURATING and n.args and hasattr(n.args[0], "name"):
                src = self.graph.tensor_of.get(n.args[0].name)
                if src is not None:
                    out.append(src)
        return list(dict.fromkeys(out))

    # -- sessions -------------------------------------------------------------------
    def _choose_precision(self, np) -> None:
        """float64 when onnxruntime runs every op of the graph in float64, else float32;
        then the value types of every tensor, for the per-layer sub-graphs."""
        double = self.onnx.ModelProto()
        double.CopyFrom(self.proto)
        _to_double(double, self.onnx)
        trial = self.onnx.ModelProto()
        trial.CopyFrom(double)
        feeds = {k: v.astype(np.float64) if v.dtype == np.float32 else v for k, v in self.feeds.items()}
        feeds.update({name: np.ones(shape) for name, _, shape in self.dropouts})
        try:  # some kernels exist only for float32, which session creation or the first run says
            session, inputs, _ = self._create(trial, self.outputs)
            session.run(None, {k: feeds[k] for k in inputs})
            self.proto, self.precision, self.feeds = double, "float64", feeds
            for name, _, _ in self.dropouts:
                self.feeds.pop(name)
        except Exception:  # an op without float64 kernels (Conv, LSTM...): float32
            self.precision = "float32"
        inferred = self.onnx.shape_inference.infer_shapes(self.proto)
        g = inferred.graph
        self.types = {v.name: v for v in list(g.input) + list(g.value_info) + list(g.output)}
        self.inits = {t.name: t for t in self.proto.graph.initializer}
        nodes = list(self.proto.graph.node)
        self.consumers: dict[str, list[int]] = {}
        for i, n in enumerate(nodes):
            for t in n.input:
                if t:
                    self.consumers.setdefault(t, []).append(i)
        self.cuts = {layer.node: self._cut(layer, nodes) for layer in self.layers}
        inputs = {i.name for i in self.proto.graph.input}
        boundary = {t for cut in self.cuts.values() for t in cut[1] if t not in inputs and t not in self.inits}
        self.observe = list(dict.fromkeys(self.observe + sorted(boundary)))

    def _cut(self, layer: Layer, nodes: list) -> tuple[list[int], list[str]]:
        """The nodes a change of the layer's parameters or output reaches (in order), and
        the tensors they read from outside themselves."""
        start = {i for p in layer.params for i in self.consumers.get(p, [])}
        start |= set(self.consumers.get(layer.delta, []))
        reach, todo = set(start), list(start)
        while todo:
            for t in nodes[todo.pop()].output:
                for j in self.consumers.get(t, []):
                    if j not in reach:
                        reach.add(j)
                        todo.append(j)
        order = sorted(reach)
        made = {t for i in order for t in nodes[i].output}
        reads = list(dict.fromkeys(t for i in order for t in nodes[i].input if t and t not in made))
        return order, reads

    def _create(self, model, outputs: list[str]):
        import onnxruntime as ort

        from gradaudit.frontends.onnx_load import session_options

        g = model.graph
        g.ClearField("value_info")
        g.ClearField("output")
        for name in outputs:
            g.output.append(self.onnx.helper.make_value_info(name, self.onnx.TypeProto()))
        try:
            session = ort.InferenceSession(model.SerializeToString(), session_options(),
                                           providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime's Fail / InvalidGraph / NotImplemented
            raise CaptureError(f"onnxruntime cannot run the model for the probe: {first_line(exc)}") from exc
        return session, [i.name for i in session.get_inputs()], outputs

    def _session(self, kind: str):
        """``lean`` (the model's outputs), ``observe`` (plus layer outputs, activations
        and the tensors the per-layer sub-graphs read), ``all`` (every float tensor), or
        a layer's name: the sub-graph downstream of that layer."""
        if kind in self.sessions:
            return self.sessions[kind]
        model = self.onnx.ModelProto()
        if kind in self.cuts:
            order, reads = self.cuts[kind]
            src = self.proto
            model.ir_version = src.ir_version
            model.opset_import.extend(src.opset_import)
            model.functions.extend(src.functions)
            g = model.graph
            g.name = src.graph.name
            nodes = list(src.graph.node)
            g.node.extend(nodes[i] for i in order)
            for t in reads:
                if t in self.inits:
                    g.initializer.append(self.inits[t])
                elif t in self.types:
                    g.input.append(self.types[t])
                else:
                    g.input.append(self.onnx.helper.make_tensor_value_info(t, self._elem(t), None))
            made = {t for i in order for t in nodes[i].output}
            outputs = [o for o in self.outputs if o in made]
        else:
            model.CopyFrom(self.proto)
            extra = self.observe if kind == "observe" else self._all_tensors() if kind == "all" else []
            outputs = list(dict.fromkeys(self.outputs + extra))
        self.sessions[kind] = self._create(model, outputs)
        return self.sessions[kind]

    def _all_tensors(self) -> list[str]:
        return [t for n in self.proto.graph.node for t in n.output if t in self.types
                and self.types[t].type.tensor_type.elem_type in (1, 10, 11, 16)]

    def run(self, extra: dict[str, Any], *, kind: str = "lean", given: dict | None = None) -> dict:
        """One run; ``extra`` overrides the base feeds, ``given`` supplies the values a
        sub-graph reads from a base run. Returns the outputs by name."""
        session, inputs, outputs = self._session(kind)
        feeds = {}
        for name in inputs:
            if name in extra:
                feeds[name] = extra[name]
            elif given is not None and name in given:
                feeds[name] = given[name]
            else:
                feeds[name] = self.feeds[name]
        self.runs += 1
        try:
            values = session.run(None, feeds)
        except Exception as exc:
            raise CaptureError(f"onnxruntime failed running the model for the probe: {first_line(exc)}") from exc
        return dict(zip(outputs, values))

    def masks(self, rng) -> dict[str, Any]:
        import numpy as np

        dtype = np.float64 if self.precision == "float64" else np.float32
        out = {}
        for name, p, shape in self.dropouts:
            keep = rng.random(shape) >= p
            out[name] = (keep / (1.0 - p) if p < 1 else np.zeros(shape)).astype(dtype)
        return out

    # -- estimation -----------------------------------------------------------------
    def param_size(self, layer: Layer) -> tuple[int, float]:
        import numpy as np

        arrays = [self.feeds[p] for p in layer.params]
        return sum(a.size for a in arrays), float(sum(np.sum(np.square(a, dtype=np.float64)) for a in arrays))

    def direction(self, layer: Layer, quantity: str, masks: list[dict], bases: list[dict], gen) -> None:
        """One more sample of ``quantity`` (``grad``: the layer's output; ``weight``: its
        parameters): ||J v||^2 for a random unit direction v, J v a forward difference of
        the outputs the layer reaches, run on the sub-graph below it from a base run's
        values (draw k mod draws: its dropout masks and its base)."""
        import numpy as np

        est = _estimate(layer, quantity)
        names = [layer.delta] if quantity == "grad" else layer.params
        start = [bases[0][layer.pre]] if quantity == "grad" else [self.feeds[p] for p in names]
        key = (layer.node, quantity)
        if key not in self.steps:
            norm = math.sqrt(sum(float(np.sum(np.square(b, dtype=np.float64))) for b in start))
            size = sum(b.size for b in start)
            self.steps[key] = STEP[self.precision] * (norm if norm > 0 else math.sqrt(size))
        h = self.steps[key]
        d = len(est.samples) % len(masks)
        v = [gen.standard_normal(b.shape) for b in start]
        scale = h / math.sqrt(sum(float(np.sum(x * x)) for x in v))
        extra = dict(masks[d])
        for name, x in zip(names, v):
            origin = self.feeds[name]
            extra[name] = (origin + scale * x).astype(origin.dtype)
        moved = self.run(extra, kind=layer.node, given=bases[d])
        sq = 0.0
        for name, y in moved.items():
            jv = (y.astype(np.float64) - bases[d][name].astype(np.float64)) / h
            sq += float(np.sum(jv * jv))
        est.samples.append(sq)

    def flops(self, layer: Layer) -> float:
        """Floating-point operations of one run of the sub-graph below ``layer`` (plus
        :data:`RUN_COST`)."""
        if layer.node not in self.costs:
            nodes = list(self.proto.graph.node)
            self.costs[layer.node] = RUN_COST + sum(self._node_flops(nodes[i]) for i in self.cuts[layer.node][0])
        return self.costs[layer.node]

    def _node_flops(self, node) -> float:
        out = self._numel(node.output[0]) if node.output else 0
        if node.op_type in ("Conv", "ConvTranspose") and len(node.input) > 1:
            shape = self._dims(node.input[1])
            return 2.0 * out * math.prod(shape[1:]) if shape else out
        if node.op_type in ("MatMul", "Gemm") and node.input:
            shape = self._dims(node.input[0])
            return 2.0 * out * (shape[-1] if shape else 1)
        return float(out)

    def _dims(self, tensor: str) -> list[int] | None:
        if tensor in self.feeds:
            return list(self.feeds[tensor].shape)
        info = self.types.get(tensor)
        if info is None or not info.type.tensor_type.HasField("shape"):
            return None
        return [d.dim_value for d in info.type.tensor_type.shape.dim]

    def _numel(self, tensor: str) -> int:
        dims = self._dims(tensor)
        return math.prod(dims) if dims else 1

    # -- units and non-finite values ------------------------------------------------------
    def units(self, observed: dict, settings: Any) -> list[UnitStats]:
        import numpy as np

        out = []
        limit = threshold(settings, "saturation_abs")
        dead_at = threshold(settings, "dead_fraction")
        for n in self.graph:
            if n.op in ZERO_REGION and self.graph.tensor_of.get(n.name) in observed:
                y = observed[self.graph.tensor_of[n.name]]
                if y.ndim < 2:
                    continue
                axis = 1 if y.ndim >= 3 else y.ndim - 1
                per_unit = np.moveaxis(y == 0, axis, 0).reshape(y.shape[axis], -1)
                zero = per_unit.mean(axis=1)
                dead = int((zero >= dead_at).sum())
                out.append(UnitStats(n.name, n.op, "dead", dead / max(zero.size, 1), int(zero.size), dead,
                                     int(per_unit.shape[1])))
            elif n.op in SATURATING and n.args and hasattr(n.args[0], "name"):
                x = observed.get(self.graph.tensor_of.get(n.args[0].name, ""))
                if x is None or x.size == 0:
                    continue
                count = int((np.abs(x) >= limit).sum())
                out.append(UnitStats(n.name, n.op, "saturated", count / x.size, int(x.size), count))
        return out

    def first_nonfinite(self, mask: dict) -> NonFinite | None:
        """The first node, in execution order, whose output is not finite."""
        import numpy as np
        import torch

        values = self.run(mask, kind="all")
        for node in self.proto.graph.node:
            for t in node.output:
                v = values.get(t)
                if v is None or np.isfinite(v).all():
                    continue
                name = self._ir_name(t.replace(f"{_PREFIX}pre", "")) or node.name
                ir = self.graph[name] if name in {n.name for n in self.graph} else None
                kind = ("nan and inf" if np.isnan(v).any() and np.isinf(v).any()
                        else "nan" if np.isnan(v).any() else "inf")
                ins = [s for s in (tensor_summary(i, torch.from_numpy(np.asarray(values[i])))
                                   for i in node.input if i in values) if s]
                return NonFinite(
                    phase="forward", node=name, op=ir.op if ir else node.op_type,
                    module=ir.module if ir else None,
                    location=ir.location.to_json() if ir is not None and ir.location else None,
                    value=kind, inputs=ins,
                )
        return None


def _is_float(info) -> bool:
    return info.type.tensor_type.elem_type in (1, 10, 11, 16)


def _shape_of(graph, tensor: str) -> tuple | None:
    shape = graph.shapes.get(tensor, (None, 0))[0]
    if shape is None and tensor in graph.consts:
        shape = tuple(graph.consts[tensor].shape)
    return shape


def _to_double(model, onnx) -> None:
    """Every float32 tensor, input, output, typed value, constant and cast of ``model`` in float64."""
    from onnx import numpy_helper

    f, d = onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE
    g = model.graph
    for info in list(g.input) + list(g.output) + list(g.value_info):  # the dynamo exporter types its weights
        if info.type.tensor_type.elem_type == f:
            info.type.tensor_type.elem_type = d
    for k, t in enumerate(g.initializer):
        if t.data_type == f:
            g.initializer[k].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype("float64"), t.name))
    for node in g.node:
        for a in node.attribute:
            if a.name in ("to", "dtype") and a.type == onnx.AttributeProto.INT and a.i == f:
                a.i = d
            if a.type == onnx.AttributeProto.TENSOR and a.t.data_type == f:
                a.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(a.t).astype("float64"), a.t.name))
