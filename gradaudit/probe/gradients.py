"""The gradient probe: real forward/backward passes that measure what was predicted.

Each draw runs the user's model once forward and once backward in training mode, as
training runs (BatchNorm uses batch statistics, dropout is active; the modes are restored
afterwards), with the loss of DESIGN.md

    L = sum over every floating output y of <y, g>,   g ~ N(0, 1) drawn per element,

and measures at every layer of the report (calls of modules owning parameters)

    act_rms  = sqrt(E[y^2])           over the node's output elements,
    grad_rms = sqrt(E[(dL/dy)^2])     over the same elements,

second moments averaged over draws, plus the RMS of the layer's weight gradient and
||dL/dW|| / ||W||. The run walks the torch.fx graph of the audit (the same trace, the same
node names, the same module objects; nothing is copied), so every node — functional
``torch.log`` as well as ``nn.Linear`` — can be observed; observation is a forward read
of the output and a tensor hook for its gradient. Gradients are taken with
``torch.autograd.grad``, so no ``.grad`` is written; buffers, modes and RNG states are
restored by :func:`gradaudit.state.preserved`.

Dead units (DeepDiagnosis; AUTOTRAINER): a unit of a ReLU-family activation is dead when
its output is exactly 0 for at least 70% of the batch. Saturated units: a sigmoid/tanh
whose pre-activations have |x| >= 5 for more than 50% of the entries.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Any

from gradaudit.errors import CaptureError, ConfigError
from gradaudit.probe.inputs import first_line
from gradaudit.progress import progress

#: Base seed of the draws: draw d seeds torch with SEED + d (dropout masks) and draws g
#: from a generator seeded with SEED + d.
SEED = 20130617

#: Activations whose output is exactly 0 on a whole half-line: "dead" is measurable.
ZERO_REGION = frozenset({"relu", "relu6", "threshold", "hardswish", "hardshrink", "softshrink"})
#: Saturating activations checked for |pre-activation| >= 5.
SATURATING = frozenset({"sigmoid", "tanh", "hardtanh", "hardsigmoid", "softsign", "logsigmoid"})

#: Defaults of the thresholds read from ``Settings.extra``.
DEFAULTS = {
    "dead_fraction": 0.7,  # a unit is dead when zero for >= this fraction of the batch
    "dead_units_min": 0.5,  # report a layer when >= this fraction of its units is dead
    "saturation_abs": 5.0,  # |pre-activation| counted as saturated
    "saturation_fraction": 0.5,  # report when > this fraction of entries is saturated
    "disagree_factor": 2.0,  # predicted vs measured ratio reported as a disagreement
    "dead_min_samples": 32,  # observations per unit below which dead units are not judged
    "underflow_fraction": 0.01,  # gradient entries lost to underflow worth reporting
}


def threshold(settings: Any, key: str) -> float:
    extra = getattr(settings, "extra", None) or {}
    value = extra.get(key, DEFAULTS[key])
    try:
        return float(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"threshold {key} must be a number (got {value!r})") from exc


# --------------------------------------------------------------------------------------
# result data


@dataclass
class LayerMeasure:
    """Second moments of one layer accumulated over draws."""

    node: str
    module: str | None
    act_sq: float = 0.0
    grad_sq: float = 0.0
    weight_grad_sq: float | None = None
    weight_sq: float | None = None
    weight_numel: int = 0
    draws: int = 0
    grad_draws: int = 0
    #: Mean cosine similarity between the batch's samples of the layer's input (draw 0).
    input_batch_cosine: float | None = None

    @property
    def act_rms(self) -> float:
        return math.sqrt(self.act_sq / self.draws) if self.draws else float("nan")

    @property
    def grad_rms(self) -> float:
        return math.sqrt(self.grad_sq / self.grad_draws) if self.grad_draws else float("nan")

    @property
    def weight_grad_rms(self) -> float | None:
        if self.weight_grad_sq is None or not self.weight_numel or not self.draws:
            return None
        return math.sqrt(self.weight_grad_sq / self.draws / self.weight_numel)

    @property
    def grad_weight_ratio(self) -> float | None:
        """||dL/dW|| / ||W|| (the update-to-weight scale of one SGD step at lr 1)."""
        if self.weight_grad_sq is None or not self.weight_sq or not self.draws:
            return None
        return math.sqrt(self.weight_grad_sq / self.draws) / math.sqrt(self.weight_sq)


@dataclass
class UnitStats:
    """Dead or saturated units of one activation node (draw 0)."""

    node: str
    op: str
    kind: str  # "dead" | "saturated"
    fraction: float  # dead: fraction of units dead; saturated: fraction of entries
    units: int
    count: int
    #: Observations behind each unit's figure (batch x positions); dead units only.
    samples: int = 0


@dataclass
class NonFinite:
    """Where a forward value or a backward gradient first stopped being finite."""

    phase: str  # "forward" | "backward"
    node: str
    op: str
    module: str | None
    location: dict | None
    value: str  # "nan", "inf", "nan and inf"
    inputs: list[dict] = field(default_factory=list)
    weights: list[dict] = field(default_factory=list)
    #: backward: the node whose gradient is non-finite (the culprit's input).
    gradient_of: str | None = None
    cause: str = "nan"  # "nan" | "overflow"
    dtype: str | None = None

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class ProbeResult:
    """Everything the probe measured; probe-stage rules read it."""

    draws: int
    device: str
    dtype: str
    layers: dict[str, LayerMeasure]
    grad_norms: list[float]
    units: list[UnitStats] = field(default_factory=list)
    nonfinite: NonFinite | None = None
    precision: dict[str, Any] | None = None
    seconds_per_draw: float = 0.0
    notes: list[str] = field(default_factory=list)
    agreement: list[dict] = field(default_factory=list)
    #: Per floating input: its measured RMS and the RMS the prediction assumed.
    inputs: list[dict] = field(default_factory=list)

    @property
    def total_grad_norm(self) -> float:
        finite = [g for g in self.grad_norms if math.isfinite(g)]
        return sum(finite) / len(finite) if finite else float("nan")

    def agreement_summary(self) -> dict[str, Any]:
        rows = [r for r in self.agreement if r.get("grad_log10_error") is not None]
        both = [r for r in self.agreement if r.get("within_2x") is not None]
        acts = [r for r in self.agreement if r.get("act_log10_error") is not None]
        return {
            "layers": len(self.agreement),
            "fraction_within_2x": (sum(1 for r in both if r["within_2x"]) / len(both)) if both else None,
            "fraction_act_within_2x": _fraction_within_2x(acts, "act_log10_error"),
            "fraction_grad_within_2x": _fraction_within_2x(rows, "grad_log10_error"),
        }

    def to_json(self) -> dict:
        return _clean(
            {
                "draws": self.draws,
                "device": self.device,
                "dtype": self.dtype,
                "total_grad_norm": self.total_grad_norm,
                "grad_norms": self.grad_norms,
                "seconds_per_draw": round(self.seconds_per_draw, 6),
                "agreement": self.agreement,
                "agreement_summary": self.agreement_summary(),
                "units": [u.__dict__ for u in self.units],
                "nonfinite": self.nonfinite.to_json() if self.nonfinite else None,
                "precision": self.precision,
                "notes": self.notes,
                "inputs": self.inputs,
            }
        )


def _fraction_within_2x(rows: list[dict], key: str) -> float | None:
    if not rows:
        return None
    return sum(1 for r in rows if abs(r[key]) <= math.log10(2)) / len(rows)


def _clean(obj: Any) -> Any:
    """JSON-safe: inf/nan floats become strings, floats keep 6 significant digits."""
    if isinstance(obj, float):
        if obj != obj:
            return "nan"
        if math.isinf(obj):
            return "inf" if obj > 0 else "-inf"
        return float(f"{obj:.6g}")
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


# --------------------------------------------------------------------------------------
# the graph runner


def resolve_device(device: str | None) -> str:
    """``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (CUDA when available, else CPU)."""
    import torch

    device = (device or "cpu").strip().lower()
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return "cpu"
    if device == "cuda" or device.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {device}: CUDA is not available on this machine (use --device cpu or auto)")
        if ":" in device:
            index = device.split(":", 1)[1]
            if not index.isdigit() or int(index) >= torch.cuda.device_count():
                raise ConfigError(f"--device {device}: no such CUDA device ({torch.cuda.device_count()} present)")
        return device
    raise ConfigError(f"--device must be cpu, cuda or auto (got {device!r})")


def graph_module(model):
    """The model traced with the audit's tracer: same leaves, same node names, and the
    model's own submodules (no copy)."""
    import torch.fx as fx

    from gradaudit.frontends.fx import _Tracer

    tracer = _Tracer()
    try:
        graph = tracer.trace(model)
    except Exception as exc:  # the static audit traced it already; defensive
        raise CaptureError(f"the probe could not trace the model: {exc}") from exc
    return fx.GraphModule(tracer.root, graph)


def tensor_summary(name: str, t: Any) -> dict | None:
    """min / max / abs-max and the non-finite count of a tensor (for NaN reports)."""
    import torch

    if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.numel() == 0:
        return None
    d = t.detach()
    finite = torch.isfinite(d)
    n_bad = int((~finite).sum())
    vals = d[finite].double()
    if vals.numel():
        lo, hi, amax = float(vals.min()), float(vals.max()), float(vals.abs().max())
    else:
        lo = hi = amax = float("nan")
    return _clean(
        {
            "name": name,
            "shape": list(d.shape),
            "dtype": str(d.dtype).replace("torch.", ""),
            "min": lo,
            "max": hi,
            "absmax": amax,
            "nonfinite": n_bad,
        }
    )


def _kind(t) -> str:
    import torch

    nan = bool(torch.isnan(t).any())
    inf = bool(torch.isinf(t).any())
    return "nan and inf" if nan and inf else ("nan" if nan else "inf")


def _leaves(val: Any, out: list) -> None:
    import torch

    if isinstance(val, (tuple, list)):
        for v in val:
            _leaves(v, out)
    elif isinstance(val, dict):
        for v in val.values():
            _leaves(v, out)
    elif isinstance(val, torch.Tensor) and val.is_floating_point():
        out.append(val)


@dataclass
class DrawRecord:
    """What one forward/backward run observed (tensors are reduced to floats)."""

    act_sq: dict[str, float] = field(default_factory=dict)
    grad_sq: dict[str, float] = field(default_factory=dict)
    grad_zero: dict[str, int] = field(default_factory=dict)
    weight_grad_sq: dict[str, float] = field(default_factory=dict)
    weight_grad_zero: dict[str, int] = field(default_factory=dict)
    grad_norm: float = float("nan")
    cosine: dict[str, float] = field(default_factory=dict)
    units: list[UnitStats] = field(default_factory=list)
    first_forward: NonFinite | None = None
    first_backward: NonFinite | None = None
    absmax: dict[str, float] = field(default_factory=dict)
    out_dtype: dict[str, str] = field(default_factory=dict)
    finite: bool = True
    seconds: float = 0.0


class Runner:
    """Runs the fx graph of a model node by node, observing chosen nodes.

    ``layers`` maps layer node names to their module names; ``acts`` maps activation node
    names to their op. The runner calls the model's own submodules and functions, so
    forward hooks, backward hooks and in-place ops behave as in ``model(x)``.
    """

    def __init__(self, model, gm, ir_graph, layers: dict[str, str | None], acts: dict[str, str], settings: Any) -> None:
        self.model = model
        self.gm = gm
        self.ir = ir_graph
        self.nodes = list(gm.graph.nodes)
        self.modules = dict(gm.named_modules())
        self.layers = layers
        self.acts = acts
        self.settings = settings
        self.conv_inputs = {
            n.name for n in self.nodes if any(self._ir_op(getattr(a, "name", "")) == "conv" for a in n.all_input_nodes)
        }
        last_use: dict[str, int] = {}
        for i, n in enumerate(self.nodes):
            for a in n.all_input_nodes:
                last_use[a.name] = i
        self.free_after: dict[int, list[str]] = {}
        for name, i in last_use.items():
            self.free_after.setdefault(i, []).append(name)
        self.all_params = list(model.parameters())
        # the parameters of each layer module (a module called twice shares them)
        self.layer_params: dict[str, list] = {}
        for node_name, mod_name in layers.items():
            mod = self.modules.get(mod_name) if mod_name is not None else None
            self.layer_params[node_name] = list(mod.parameters()) if mod is not None else []

    def _ir_op(self, name: str) -> str | None:
        node = self._ir_node(name)
        return node.op if node is not None else None

    def _ir_node(self, name: str):
        try:
            return self.ir[name]
        except KeyError:
            return None

    # ---------------------------------------------------------------------------------
    def run(
        self,
        inputs: tuple,
        *,
        seed: int,
        device: str,
        autocast_dtype=None,
        units: bool = False,
        check_all: bool = False,
        zeros: bool = False,
        cosine: bool = False,
    ) -> DrawRecord:
        """One draw. ``check_all`` checks every node's output (forward) and gradient
        (backward) for non-finite values and records abs-max and dtype per node."""
        import torch
        import torch.fx as fx

        rec = DrawRecord()
        started = time.perf_counter()
        # the CPU generator directly: torch.manual_seed also seeds every lazily
        # initialised backend, which costs milliseconds per call
        torch.default_generator.manual_seed(seed)
        if device.startswith("cuda"):
            torch.cuda.manual_seed_all(seed)
        gen = torch.Generator(device=device).manual_seed(seed)
        leaves = []
        args_in = []
        for x in inputs:
            if isinstance(x, torch.Tensor):
                x = x.detach().to(device)
                if x.is_floating_point():
                    x = x.clone().requires_grad_(True)
                    leaves.append(x)
            args_in.append(x)
        params = [p for p in self.all_params if p.requires_grad]
        env: dict[str, Any] = {}
        pending: list[tuple[str, Any, int]] = []  # (layer node, 2-norm of its output, numel)
        hooks: list = []
        grad_slots: dict[str, Any] = {}
        backward_order: list[tuple[str, bool, Any]] = []
        placeholder = iter(args_in)
        ctx = torch.autocast(device_type=device.split(":")[0], dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
        outputs = None
        grads: Any = []
        try:
            with torch.enable_grad(), ctx:
                for i, n in enumerate(self.nodes):
                    if n.op == "placeholder":
                        try:
                            value = next(placeholder)
                        except StopIteration:
                            value = n.args[0] if n.args else None
                    elif n.op == "output":
                        outputs = fx.node.map_arg(n.args[0], lambda a: env[a.name])
                        break
                    else:
                        value = self._step(n, env, rec, units, cosine, check_all, autocast_dtype)
                        if value is _STOP:
                            break
                        # gradient hooks go on right away: a later in-place op (ReLU(inplace=True))
                        # must not change which value the hook sees the gradient of
                        if check_all:
                            ts: list = []
                            _leaves(value, ts)
                            slots = grad_slots if n.name in self.layers else None
                            for t in ts:
                                if t.requires_grad:
                                    hooks.append(t.register_hook(_order(backward_order, n.name, slots, zeros)))
                        if n.name in self.layers:
                            out = value[0] if isinstance(value, (tuple, list)) else value
                            if isinstance(out, torch.Tensor) and out.is_floating_point():
                                pending.append((n.name, _sumsq(out), out.numel()))
                                if out.requires_grad and not check_all:
                                    hooks.append(out.register_hook(_grab(grad_slots, n.name, zeros)))
                    env[n.name] = value
                    if not check_all:
                        for dead in self.free_after.get(i, ()):
                            if dead != n.name:
                                env.pop(dead, None)
                if outputs is None:
                    rec.finite = False
                    rec.seconds = time.perf_counter() - started
                    return rec
                outs: list = []
                _leaves(outputs, outs)
                ys = [y for y in outs if y.requires_grad]
                cots = [
                    torch.randn(y.shape, generator=gen, device=y.device, dtype=torch.float32).to(y.dtype) for y in ys
                ]
                if ys:
                    grads = torch.autograd.grad(ys, params + leaves, cots, allow_unused=True)
        finally:
            for h in hooks:
                h.remove()
        present = [(p, g) for p, g in zip(params, grads[: len(params)]) if g is not None]
        sq_of = dict(zip((id(p) for p, _ in present), _sums_of_squares([g for _, g in present])))
        for name, norm, numel in pending:
            rec.act_sq[name] = float(norm) ** 2 / max(numel, 1)
        for name, (norm, numel, zero) in grad_slots.items():
            rec.grad_sq[name] = float(norm) ** 2 / max(numel, 1)
            if zero is not None:
                rec.grad_zero[name] = int(zero)
        norm_sq = sum(sq_of.values())
        rec.grad_norm = math.sqrt(norm_sq) if math.isfinite(norm_sq) else float("nan")
        pgrad = dict((id(p), g) for p, g in present) if zeros else {}
        for name, ps in self.layer_params.items():
            own = [id(p) for p in ps if id(p) in sq_of]
            if own:
                rec.weight_grad_sq[name] = sum(sq_of[i] for i in own)
                if zeros:
                    rec.weight_grad_zero[name] = sum(int((pgrad[i] == 0).sum()) for i in own)
        if check_all and rec.first_forward is None:
            self._first_backward(backward_order, env, rec)
        values = list(rec.act_sq.values()) + list(rec.grad_sq.values()) + [rec.grad_norm]
        rec.finite = all(math.isfinite(v) for v in values) and all(bool(torch.isfinite(y).all()) for y in outs)
        if rec.first_forward is not None or rec.first_backward is not None:
            rec.finite = False
        rec.seconds = time.perf_counter() - started
        return rec

    # ---------------------------------------------------------------------------------
    def _step(self, n, env, rec: DrawRecord, units: bool, cosine: bool, check_all: bool, autocast_dtype):
        import torch
        import torch.fx as fx

        args = fx.node.map_arg(n.args, lambda a: env[a.name])
        kwargs = fx.node.map_arg(n.kwargs, lambda a: env[a.name])
        if units and n.name in self.acts:
            self._unit_pre(n, args, rec)
        if cosine and n.name in self.layers and args and isinstance(args[0], torch.Tensor):
            rec.cosine[n.name] = _batch_cosine(args[0])
        try:
            value = self._call(n, args, kwargs)
        except Exception as exc:
            if rec.first_forward is not None:
                return _STOP  # non-finite values made a later op fail: report the first
            where = self._ir_node(n.name)
            loc = f" at {where.location}" if where is not None and where.location else ""
            raise CaptureError(f"the probe's forward failed at node '{n.name}'{loc}: {first_line(exc)}") from exc
        if check_all:
            self._check_forward(n, args, value, rec, autocast_dtype)
        if units and n.name in self.acts:
            self._unit_post(n, args, value, rec)
        return value

    def _call(self, n, args, kwargs):
        if n.op == "call_module":
            return self.modules[str(n.target)](*args, **kwargs)
        if n.op == "call_function":
            return n.target(*args, **kwargs)
        if n.op == "call_method":
            self_obj, *rest = args
            return getattr(self_obj, str(n.target))(*rest, **kwargs)
        if n.op == "get_attr":
            obj: Any = self.gm
            for part in str(n.target).split("."):
                obj = getattr(obj, part)
            return obj
        raise CaptureError(f"the probe cannot run fx node kind {n.op!r}")

    def describe_inputs(self, n, args, kwargs) -> tuple[list[dict], list[dict]]:
        import torch

        ins: list[dict] = []
        flat: list = []
        _leaves((args, kwargs), flat)
        names = [a.name for a in n.all_input_nodes]
        for k, t in enumerate(flat):
            s = tensor_summary(names[k] if k < len(names) else f"arg{k}", t)
            if s:
                ins.append(s)
        weights: list[dict] = []
        if n.op == "call_module":
            mod = self.modules[str(n.target)]
            for pname, p in mod.named_parameters():
                s = tensor_summary(f"{n.target}.{pname}", p)
                if s:
                    weights.append(s)
        for k, a in enumerate(n.args):
            if isinstance(a, torch.Tensor):
                s = tensor_summary(f"constant{k}", a)
                if s:
                    weights.append(s)
        return ins, weights

    def _nonfinite(self, phase: str, n, args, kwargs, t, gradient_of=None) -> NonFinite:
        node = self._ir_node(n.name)
        ins, weights = self.describe_inputs(n, args, kwargs) if args is not None else ([], [])
        return NonFinite(
            phase=phase,
            node=n.name,
            op=node.op if node is not None else str(n.target),
            module=node.module if node is not None else None,
            location=node.location.to_json() if node is not None and node.location else None,
            value=_kind(t),
            inputs=ins,
            weights=weights,
            gradient_of=gradient_of,
            dtype=str(t.dtype).replace("torch.", ""),
        )

    def _check_forward(self, n, args, value, rec: DrawRecord, autocast_dtype) -> None:
        import torch

        ts: list = []
        _leaves(value, ts)
        for t in ts:
            d = t.detach()
            if d.numel() == 0:
                continue
            fin = torch.isfinite(d)
            rec.out_dtype[n.name] = str(d.dtype).replace("torch.", "")
            amax = float(d[fin].abs().max()) if bool(fin.any()) else float("nan")
            rec.absmax[n.name] = max(rec.absmax.get(n.name, 0.0), amax) if math.isfinite(amax) else amax
            if not bool(fin.all()) and rec.first_forward is None:
                rec.first_forward = self._nonfinite("forward", n, args, {}, d)
                break

    def _first_backward(self, order: list, env: dict, rec: DrawRecord) -> None:
        """The first gradient, in backward execution order, that is not finite; blame the
        op whose backward produced it: a user of that node whose own gradients were finite."""
        import torch.fx as fx

        bad_at: dict[str, Any] = {}
        first = None
        for name, finite, g in order:
            if not finite and name not in bad_at:
                bad_at[name] = g
                if first is None:
                    first = name
        if first is None:
            return
        src = next(n for n in self.nodes if n.name == first)
        culprit = None
        for user in src.users:
            if user.op == "output":
                continue
            if user.name not in bad_at:
                culprit = user
                break
        g = bad_at[first]
        target = culprit if culprit is not None else src
        args = fx.node.map_arg(target.args, lambda a: env.get(a.name))
        kwargs = fx.node.map_arg(target.kwargs, lambda a: env.get(a.name))
        nf = self._nonfinite("backward", target, args, kwargs, g, gradient_of=first)
        rec.first_backward = nf

    def _unit_pre(self, n, args, rec: DrawRecord) -> None:
        """Saturation: |pre-activation| >= threshold for the activation's input."""
        import torch

        op = self.acts[n.name]
        if op not in SATURATING or not args or not isinstance(args[0], torch.Tensor):
            return
        x = args[0].detach()
        if not x.is_floating_point() or x.numel() == 0:
            return
        limit = threshold(self.settings, "saturation_abs")
        count = int((x.abs() >= limit).sum())
        rec.units.append(UnitStats(n.name, op, "saturated", count / x.numel(), x.numel(), count))

    def _unit_post(self, n, args, value, rec: DrawRecord) -> None:
        """Dead units: per unit, the fraction of the batch where the output is exactly 0."""
        import torch

        op = self.acts[n.name]
        if op not in ZERO_REGION or not isinstance(value, torch.Tensor) or value.dim() < 2:
            return
        y = value.detach()
        unit_dim = 1 if (y.dim() >= 4 or n.name in self.conv_inputs or self._feeds_from_conv(n)) else y.dim() - 1
        zero = (y == 0).movedim(unit_dim, 0).reshape(y.shape[unit_dim], -1).float().mean(dim=1)
        dead = int((zero >= threshold(self.settings, "dead_fraction")).sum())
        units = int(zero.numel())
        samples = y.numel() // max(units, 1)
        rec.units.append(UnitStats(n.name, op, "dead", dead / max(units, 1), units, dead, samples))

    def _feeds_from_conv(self, n) -> bool:
        """Whether the activation's input comes (through norms) from a convolution."""
        seen = 0
        cur = n
        while cur is not None and seen < 4:
            ins = cur.all_input_nodes
            if not ins:
                return False
            cur = ins[0]
            op = self._ir_op(cur.name)
            if op in ("conv", "conv_transpose"):
                return True
            if op not in ("batch_norm", "group_norm", "instance_norm", "add", "dropout", "identity"):
                return False
            seen += 1
        return False


_STOP = object()


def _sumsq(t):
    """The 2-norm of ``t`` as a 0-dim tensor (square it for the sum of squares),
    accumulated in float32 at least (float64 for float64 input)."""
    import torch

    d = t.detach()
    if d.dtype in (torch.float16, torch.bfloat16):
        return torch.linalg.vector_norm(d, 2, dtype=torch.float32)
    return torch.linalg.vector_norm(d, 2)


def _sums_of_squares(tensors: list) -> list[float]:
    """Sum of squares of each tensor, with one fused norm kernel when available."""
    import torch

    if not tensors:
        return []
    try:
        norms = torch._foreach_norm(
            [t.detach().float() if t.dtype in (torch.float16, torch.bfloat16) else t.detach() for t in tensors]
        )
    except (AttributeError, RuntimeError):
        norms = [_sumsq(t) for t in tensors]
    return [v * v for v in torch.stack(list(norms)).double().tolist()]


def _batch_cosine(x) -> float:
    """Mean cosine similarity between distinct samples (dim 0) of ``x``."""
    import torch

    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 2 or x.shape[0] < 2:
        return float("nan")
    v = x.detach().reshape(x.shape[0], -1).float()
    norms = v.norm(dim=1, keepdim=True).clamp_min(1e-30)
    u = v / norms
    s = u.sum(dim=0)
    b = x.shape[0]
    return float((s.dot(s) - b) / (b * (b - 1)))


def _reduce(g, zeros: bool) -> tuple:
    """What is kept of a gradient: its sum of squares, size and (optionally) zero count.
    Reduced inside the hook, so no gradient tensor outlives the backward pass."""
    d = g.detach()
    return _sumsq(d), d.numel(), (d == 0).sum() if zeros else None


def _grab(slots: dict, name: str, zeros: bool):
    def hook(g):
        if name not in slots:
            slots[name] = _reduce(g, zeros)
        return None

    return hook


def _order(order: list, name: str, slots: dict | None, zeros: bool):
    import torch

    def hook(g):
        finite = bool(torch.isfinite(g).all())
        order.append((name, finite, None if finite else g.detach().clone()))
        if slots is not None and name not in slots:
            slots[name] = _reduce(g, zeros)
        return None

    return hook


# --------------------------------------------------------------------------------------
# the probe


def probe(
    model,
    inputs: tuple,
    analysis,
    *,
    draws: int = 2,
    device: str = "cpu",
    dtype: str = "fp32",
    settings: Any = None,
) -> ProbeResult:
    """Measure ``analysis``'s layers on the real model; leave the model as found."""
    from gradaudit.probe.precision import DTYPES, autocast_dtype, check_precision
    from gradaudit.state import preserved

    if dtype not in DTYPES:
        raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)} (got {dtype!r})")
    if not isinstance(draws, int) or isinstance(draws, bool) or draws < 1:
        raise ConfigError(f"--draws must be a positive integer (got {draws!r})")
    device = resolve_device(device)
    reduced = autocast_dtype(dtype)
    graph = analysis.graph
    layer_nodes = analysis.layers()
    layers = {n.name: n.module for n in layer_nodes}
    from gradaudit.propagation.engine import ACTIVATIONS

    acts = {n.name: n.op for n in graph if n.op in ACTIVATIONS}
    result_layers = {n.name: LayerMeasure(n.name, n.module) for n in layer_nodes}
    with preserved(model), _on_device(model, device):
        model.train()  # as training runs: batch statistics in BatchNorm, dropout active
        gm = graph_module(model)
        runner = Runner(model, gm, graph, layers, acts, settings)
        notes: list[str] = []
        grad_norms: list[float] = []
        units: list[UnitStats] = []
        first_draw: DrawRecord | None = None
        seconds = []
        finite = True
        with progress(draws, "probe: forward/backward draws") as step:
            for d in range(draws):
                kwargs = dict(seed=SEED + d, device=device, autocast_dtype=reduced, units=(d == 0), cosine=(d == 0))
                try:
                    rec = runner.run(
                        inputs, check_all=(d == 0 and reduced is not None), zeros=(d == 0 and reduced is not None), **kwargs
                    )
                except CaptureError:
                    # the forward raised: when a non-finite value came first, that is the finding
                    rec = runner.run(inputs, check_all=True, zeros=reduced is not None, **kwargs)
                seconds.append(rec.seconds)
                if d == 0:
                    first_draw = rec
                    units = rec.units
                finite = finite and rec.finite
                grad_norms.append(rec.grad_norm)
                _accumulate(result_layers, rec, runner, d == 0)
                step()
        nonfinite = None
        if first_draw is not None and (first_draw.first_forward or first_draw.first_backward):
            nonfinite = first_draw.first_forward or first_draw.first_backward
        elif not finite:
            loc = runner.run(inputs, seed=SEED, device=device, autocast_dtype=reduced, check_all=True)
            nonfinite = loc.first_forward or loc.first_backward
            if nonfinite is None:
                notes.append("non-finite values were measured but a checked re-run found none (nondeterministic op?)")
        precision = None
        if reduced is not None:
            reference = runner.run(inputs, seed=SEED, device=device, autocast_dtype=None, check_all=True, zeros=True)
            precision = check_precision(first_draw, reference, dtype, reduced, runner, settings)
            if nonfinite is not None and reference.first_forward is None and reference.first_backward is None:
                nonfinite.cause = "overflow"
        on = "CUDA" if device.startswith("cuda") else "CPU"
        notes.append(
            f"{draws} draw(s) on {on}, {'autocast ' + dtype if reduced is not None else 'float32'}; "
            "L = sum over floating outputs of <y, g>, g ~ N(0, 1)"
        )
    result = ProbeResult(
        draws=draws,
        device=device,
        dtype=dtype,
        layers=result_layers,
        grad_norms=grad_norms,
        units=units,
        nonfinite=nonfinite,
        precision=precision,
        seconds_per_draw=sorted(seconds)[len(seconds) // 2] if seconds else 0.0,
        notes=notes,
    )
    result.inputs = _input_rms(analysis, inputs)
    result.agreement = agreement(analysis, result)
    return result


def _input_rms(analysis, inputs: tuple) -> list[dict]:
    """Measured RMS of each floating input beside the RMS the prediction assumed."""
    import torch

    out = []
    names = analysis.graph.input_names
    for i, x in enumerate(inputs):
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or i >= len(names):
            continue
        s = analysis.stat(names[i])
        measured = float(x.detach().double().pow(2).mean().sqrt()) if x.numel() else float("nan")
        out.append({"input": names[i], "measured_rms": measured, "predicted_rms": s.act_rms if s else None})
    return out


def _accumulate(layers: dict[str, LayerMeasure], rec: DrawRecord, runner: Runner, first: bool) -> None:
    for name, m in layers.items():
        if name in rec.act_sq:
            m.act_sq += rec.act_sq[name]
            m.draws += 1
        if name in rec.grad_sq:
            m.grad_sq += rec.grad_sq[name]
            m.grad_draws += 1
        if name in rec.weight_grad_sq:
            m.weight_grad_sq = (m.weight_grad_sq or 0.0) + rec.weight_grad_sq[name]
        if first:
            ps = [p for p in runner.layer_params.get(name, []) if p.requires_grad]
            m.weight_numel = sum(p.numel() for p in ps)
            m.weight_sq = sum(_sums_of_squares(ps)) if ps else None
            c = rec.cosine.get(name)
            m.input_batch_cosine = c if c is not None and math.isfinite(c) else None


def agreement(analysis, result: ProbeResult) -> list[dict]:
    """Predicted vs measured per layer: log10(measured / predicted) of act and grad RMS.

    A layer agrees within 2x when both |log10 errors| <= log10 2. Disagreements beyond
    ``disagree_factor`` carry the reasons the prediction is unreliable there.
    """
    estimated = {e.node for e in analysis.estimates}
    rows = []
    upstream_bad = False
    for node in analysis.layers():
        s = analysis.stat(node.name)
        m = result.layers.get(node.name)
        if s is None or m is None:
            continue
        row = {
            "node": node.name,
            "module": node.module,
            "predicted_act_rms": s.act_rms,
            "measured_act_rms": m.act_rms,
            "predicted_grad_rms": s.grad_rms,
            "measured_grad_rms": m.grad_rms,
            "act_log10_error": _log_err(m.act_rms, s.act_rms),
            "grad_log10_error": _log_err(m.grad_rms, s.grad_rms),
        }
        errs = [e for e in (row["act_log10_error"], row["grad_log10_error"]) if e is not None]
        row["within_2x"] = all(abs(e) <= math.log10(2) for e in errs) if len(errs) == 2 else None
        row["estimated"] = node.name in estimated or any(p.name in estimated for p in _ancestors(analysis, node, 3))
        row["input_batch_cosine"] = m.input_batch_cosine
        row["inherited"] = upstream_bad
        if row["act_log10_error"] is not None and abs(row["act_log10_error"]) > 1:
            upstream_bad = True
        rows.append(row)
    return rows


def _ancestors(analysis, node, depth: int):
    out = []
    frontier = [node]
    for _ in range(depth):
        nxt = []
        for n in frontier:
            for name in n.inputs:
                src = analysis.graph[name]
                out.append(src)
                nxt.append(src)
        frontier = nxt
    return out


def _log_err(measured: float, predicted: float) -> float | None:
    """log10(measured / predicted). A prediction that is not finite, or 0 where the
    measurement is not (and the reverse), is the largest disagreement (+-inf), never a
    value to skip; None only when the measurement itself is not finite (GA601's case)."""
    if not math.isfinite(measured):
        return None
    if not math.isfinite(predicted):
        return math.inf
    if measured == predicted == 0:
        return 0.0
    if measured <= 0 or predicted <= 0:
        return math.inf if measured > predicted else -math.inf
    return math.log10(measured / predicted)


class _on_device:
    """Move the model to ``device`` for the run and back afterwards (no copy: parameter
    objects stay the same; their storage moves and comes back bitwise)."""

    def __init__(self, model, device: str) -> None:
        self.model = model
        self.device = device
        self.original = None
        self.fork = None

    def __enter__(self):
        import torch

        first = next(iter(self.model.parameters()), None)
        if first is None:
            first = next(iter(self.model.buffers()), None)
        self.original = first.device if first is not None else torch.device("cpu")
        if self.device.startswith("cuda"):
            # the CUDA generator is initialised on first use: keep its state as found
            index = torch.device(self.device).index or 0
            self.fork = torch.random.fork_rng(devices=[index])
            self.fork.__enter__()
        if torch.device(self.device) != self.original:
            self.model.to(self.device)
        return self

    def __exit__(self, *exc):
        import torch

        try:
            if torch.device(self.device) != self.original:
                self.model.to(self.original)
        finally:
            if self.fork is not None:
                self.fork.__exit__(None, None, None)
        return False
