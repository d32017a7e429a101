"""The ONNX frontend's op table against onnxruntime, and what the capture decides.

Every mapped ONNX op has a case (a test fails for a mapper without one): a one-node
model, captured, then computed by the IR's own callables (the torch functions and
modules the propagation evaluates) must equal what onnxruntime computes for the node.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto as T, helper  # noqa: E402

import gradaudit  # noqa: E402
from gradaudit.frontends import onnx as frontend, onnx_load  # noqa: E402
from gradaudit.frontends.onnx_ops import MAPPERS, OrtNode  # noqa: E402
from onnx_models import make_model, run_ir, run_ort, save, tensor  # noqa: E402

# they pass on the oldest supported torch too (no torchvision needed)
pytestmark = [pytest.mark.oldest, pytest.mark.usefixtures("one_thread")]
RNG = np.random.default_rng(0)


def normal(*shape, lo=None, hi=None):
    if lo is not None:
        return RNG.uniform(lo, hi, size=shape).astype(np.float32)
    return RNG.normal(size=shape).astype(np.float32)


def case(op, inputs, attrs=None, consts=None, opset=17, n_out=1, ir_op=None, outputs=None, out_shape=None):
    """One ``op`` node reading ``inputs`` ({name: array}, run-time) and ``consts``
    ({name: array}, initializers), in the order ``list(inputs) + list(consts)`` unless
    attrs give another as ``_order``; ``ir_op`` is the IR op it must become (default:
    the ONNX op type in lower case)."""
    attrs = dict(attrs or {})
    order = attrs.pop("_order", None) or list(inputs) + list(consts or {})
    outs = [f"y{k}" for k in range(n_out)]
    node = helper.make_node(op, order, outs, **attrs)
    infos = [(k, helper.np_dtype_to_tensor_dtype(v.dtype), list(v.shape)) for k, v in inputs.items()]
    graph_outs = [(o, T.FLOAT, out_shape) if out_shape else helper.make_value_info(o, onnx.TypeProto())
                  for o in outs[: outputs or n_out]]
    model = make_model([node], infos, graph_outs, [tensor(k, v) for k, v in (consts or {}).items()], opset=opset)
    return model, inputs, ir_op


def unary(op, lo=None, hi=None, ir_op=None, **attrs):
    return lambda: case(op, {"x": normal(2, 3, 4, lo=lo, hi=hi)}, attrs, ir_op=ir_op)


def binary(op, ir_op):
    return lambda: case(op, {"a": normal(2, 3, 4), "b": normal(2, 3, 4, lo=0.5, hi=2.0)}, ir_op=ir_op)


CASES = {
    "Relu": unary("Relu"), "Sigmoid": unary("Sigmoid"), "Tanh": unary("Tanh"), "Exp": unary("Exp"),
    "Log": unary("Log", 0.1, 3.0), "Sqrt": unary("Sqrt", 0.1, 3.0), "Reciprocal": unary("Reciprocal", 0.5, 2.0),
    "Neg": unary("Neg"), "Abs": unary("Abs"), "Erf": unary("Erf"), "Sin": unary("Sin"), "Cos": unary("Cos"),
    "Tan": unary("Tan", -1.0, 1.0), "Sinh": unary("Sinh"), "Cosh": unary("Cosh"), "Atan": unary("Atan"),
    "Asinh": unary("Asinh"), "Asin": unary("Asin", -0.9, 0.9), "Acos": unary("Acos", -0.9, 0.9),
    "Acosh": unary("Acosh", 1.1, 3.0), "Atanh": unary("Atanh", -0.9, 0.9), "Sign": unary("Sign"),
    "Floor": unary("Floor"), "Ceil": unary("Ceil"), "Round": unary("Round"), "Softsign": unary("Softsign"),
    "Softplus": unary("Softplus"), "HardSwish": unary("HardSwish"),
    "Mish": lambda: case("Mish", {"x": normal(2, 5)}, opset=18),
    "Identity": unary("Identity"),
    "LeakyRelu": unary("LeakyRelu", ir_op="leaky_relu", alpha=0.2), "Elu": unary("Elu", alpha=0.7), "Celu": unary("Celu", alpha=1.3),
    "Selu": unary("Selu"), "ThresholdedRelu": unary("ThresholdedRelu", ir_op="threshold", alpha=0.4),
    "HardSigmoid": unary("HardSigmoid", alpha=0.3, beta=0.4), "Shrink": unary("Shrink", ir_op="softshrink", bias=0.5, lambd=0.5),
    "Gelu": lambda: case("Gelu", {"x": normal(3, 4)}, {"approximate": "tanh"}, opset=20),
    "Swish": lambda: case("Swish", {"x": normal(3, 4)}, {"alpha": 1.5}, opset=24),
    "Clip": lambda: case("Clip", {"x": normal(3, 4) * 8}, consts={"lo": np.array(0.0, np.float32),
                                                               "hi": np.array(6.0, np.float32)}, ir_op="relu6"),
    "Add": binary("Add", "add"), "Sub": binary("Sub", "sub"), "Mul": binary("Mul", "mul"), "Div": binary("Div", "div"),
    "Pow": lambda: case("Pow", {"x": normal(2, 3, lo=0.5, hi=2.0)}, consts={"p": np.array(3.0, np.float32)}),
    "Sum": lambda: case("Sum", {"a": normal(2, 3), "b": normal(2, 3), "c": normal(2, 3)}, ir_op="add"),
    "Mean": lambda: case("Mean", {"a": normal(2, 3), "b": normal(2, 3)}, ir_op="mul"),
    "Max": lambda: case("Max", {"a": normal(2, 3), "b": normal(2, 3)}, ir_op="maximum"),
    "Min": lambda: case("Min", {"a": normal(2, 3), "b": normal(2, 3)}, ir_op="minimum"),
    "MatMul": lambda: case("MatMul", {"x": normal(2, 5, 4)}, consts={"w": normal(4, 6)}, ir_op="linear"),
    "Gemm": lambda: case("Gemm", {"x": normal(4, 3)}, {"transA": 1, "alpha": 0.5, "beta": 2.0},
                         consts={"w": normal(4, 5), "c": normal(5)}, ir_op="linear"),
    "Conv": lambda: case("Conv", {"x": normal(2, 4, 9, 9)}, {"strides": [2, 1], "pads": [0, 1, 1, 2], "group": 2},
                         consts={"w": normal(6, 2, 3, 3), "b": normal(6)}, ir_op="conv"),
    "ConvTranspose": lambda: case("ConvTranspose", {"x": normal(2, 4, 5, 5)}, {"strides": [2, 2], "pads": [1, 1, 1, 1],
                                                                             "output_padding": [1, 1]},
                                  consts={"w": normal(4, 3, 3, 3)}, ir_op="conv_transpose"),
    "BatchNormalization": lambda: case(
        "BatchNormalization", {"x": normal(4, 3, 5, 5) * 2 + 1}, {"training_mode": 1},
        consts={"s": normal(3), "b": normal(3), "m": np.zeros(3, np.float32), "v": np.ones(3, np.float32)},
        opset=15, n_out=3, outputs=1, ir_op="batch_norm"),
    "InstanceNormalization": lambda: case("InstanceNormalization", {"x": normal(2, 3, 6)},
                                          consts={"s": normal(3), "b": normal(3)}, ir_op="instance_norm"),
    "LayerNormalization": lambda: case("LayerNormalization", {"x": normal(2, 3, 8)}, {"axis": -1},
                                       consts={"s": normal(8), "b": normal(8)}, ir_op="layer_norm"),
    "RMSNormalization": lambda: case("RMSNormalization", {"x": normal(2, 3, 8)}, {"axis": -1},
                                     consts={"s": normal(8)}, opset=23, ir_op="rms_norm"),
    "GroupNormalization": lambda: case("GroupNormalization", {"x": normal(2, 6, 5)}, {"num_groups": 3},
                                       consts={"s": normal(6), "b": normal(6)}, opset=21, ir_op="group_norm",
                                       out_shape=[2, 6, 5]),
    "LRN": lambda: case("LRN", {"x": normal(2, 6, 4, 4)}, {"size": 3, "alpha": 1e-2, "beta": 0.75, "bias": 2.0},
                        ir_op="local_response_norm"),
    "PRelu": lambda: case("PRelu", {"x": normal(2, 3, 4, 4)}, consts={"s": normal(3, 1, 1)}, ir_op="prelu"),
    "Gather": lambda: case("Gather", {"ids": RNG.integers(0, 10, (2, 5)).astype(np.int64)},
                           {"_order": ["table", "ids"]}, consts={"table": normal(10, 4)}, ir_op="embedding"),
    "Reshape": lambda: case("Reshape", {"x": normal(2, 3, 4)}, consts={"s": np.array([0, -1], np.int64)}),
    "Flatten": lambda: case("Flatten", {"x": normal(2, 3, 4, 5)}, {"axis": 2}),
    "Squeeze": lambda: case("Squeeze", {"x": normal(2, 1, 4)}, consts={"a": np.array([1], np.int64)}),
    "Unsqueeze": lambda: case("Unsqueeze", {"x": normal(2, 4)}, consts={"a": np.array([1, 3], np.int64)}),
    "Transpose": lambda: case("Transpose", {"x": normal(2, 3, 4)}, {"perm": [2, 0, 1]}, ir_op="permute"),
    "Expand": lambda: case("Expand", {"x": normal(3, 1)}, consts={"s": np.array([2, 3, 4], np.int64)}),
    "Tile": lambda: case("Tile", {"x": normal(2, 3)}, consts={"r": np.array([2, 2], np.int64)}),
    "Concat": lambda: case("Concat", {"a": normal(2, 3), "b": normal(2, 5)}, {"axis": 1}, ir_op="cat"),
    "Split": lambda: case("Split", {"x": normal(2, 7)}, {"axis": 1}, consts={"s": np.array([3, 4], np.int64)},
                          n_out=2),
    "Slice": lambda: case("Slice", {"x": normal(4, 6)}, consts={"st": np.array([1, 0], np.int64),
                                                               "en": np.array([3, 100], np.int64),
                                                               "ax": np.array([0, 1], np.int64),
                                                               "sp": np.array([1, 2], np.int64)}, ir_op="getitem"),
    "Pad": lambda: case("Pad", {"x": normal(2, 3, 4)}, {"mode": "reflect"},
                        consts={"p": np.array([0, 0, 1, 0, 0, 2], np.int64)}),
    "Cast": lambda: case("Cast", {"x": normal(2, 3)}, {"to": T.DOUBLE}, ir_op="to"),
    "CastLike": lambda: case("CastLike", {"x": normal(2, 3), "like": np.zeros(1, np.float64)}, ir_op="to"),
    "DepthToSpace": lambda: case("DepthToSpace", {"x": normal(1, 8, 2, 3)}, {"blocksize": 2, "mode": "CRD"},
                                 ir_op="pixel_shuffle"),
    "SpaceToDepth": lambda: case("SpaceToDepth", {"x": normal(1, 2, 4, 6)}, {"blocksize": 2}, ir_op="pixel_unshuffle"),
    "MaxPool": lambda: case("MaxPool", {"x": normal(2, 3, 7, 7)}, {"kernel_shape": [3, 3], "strides": [2, 2],
                                                                  "pads": [1, 1, 1, 1]}, ir_op="max_pool"),
    "AveragePool": lambda: case("AveragePool", {"x": normal(2, 3, 6, 6)}, {"kernel_shape": [2, 2], "strides": [2, 2]},
                                ir_op="avg_pool"),
    "GlobalAveragePool": lambda: case("GlobalAveragePool", {"x": normal(2, 3, 4, 5)}, ir_op="adaptive_avg_pool"),
    "GlobalMaxPool": lambda: case("GlobalMaxPool", {"x": normal(2, 3, 4, 5)}, ir_op="adaptive_max_pool"),
    "Softmax": lambda: case("Softmax", {"x": normal(2, 3, 5)}, {"axis": 1}),
    "LogSoftmax": lambda: case("LogSoftmax", {"x": normal(2, 5)}, ir_op="log_softmax"),
    "ReduceMean": lambda: case("ReduceMean", {"x": normal(2, 3, 4)}, consts={"a": np.array([1, 2], np.int64)},
                               opset=18, ir_op="mean"),
    "ReduceSum": lambda: case("ReduceSum", {"x": normal(2, 3, 4)}, {"keepdims": 0},
                              consts={"a": np.array([0], np.int64)}, ir_op="sum"),
    "Dropout": lambda: case("Dropout", {"x": normal(2, 3)}, consts={"r": np.array(0.0, np.float32)}),
    "Resize": lambda: case("Resize", {"x": normal(1, 2, 3, 4)}, {"mode": "linear"},
                           consts={"roi": np.zeros(0, np.float32), "sc": np.array([1, 1, 2, 2], np.float32)},
                           ir_op="interpolate"),
    "Upsample": lambda: case("Upsample", {"x": normal(1, 2, 3, 4)}, {"mode": "nearest"},
                             consts={"sc": np.array([1, 1, 2, 3], np.float32)}, opset=9, ir_op="interpolate"),
    "Einsum": lambda: case("Einsum", {"a": normal(2, 3, 4), "b": normal(2, 4, 5)}, {"equation": "bij,bjk->bik"}),
    "Attention": lambda: case("Attention", {"q": normal(2, 3, 5, 4), "k": normal(2, 3, 5, 4), "v": normal(2, 3, 5, 4)},
                              {"is_causal": 1, "scale": 0.3}, opset=23, ir_op="scaled_dot_product_attention"),
    "RNN": lambda: _recurrent("RNN", 1, activations=["Relu"]),
    "LSTM": lambda: _recurrent("LSTM", 4, direction="bidirectional"),
    "GRU": lambda: _recurrent("GRU", 3, linear_before_reset=1),
}


def _recurrent(op, gates, **attrs):
    hidden, dirs = 5, 2 if attrs.get("direction") == "bidirectional" else 1
    consts = {"W": normal(dirs, gates * hidden, 3) * 0.5, "R": normal(dirs, gates * hidden, hidden) * 0.5,
              "B": normal(dirs, 2 * gates * hidden) * 0.5}
    n_out = 3 if op == "LSTM" else 2
    return case(op, {"x": normal(4, 2, 3)}, {"hidden_size": hidden, **attrs}, consts=consts, n_out=n_out,
                ir_op=op.lower())


def test_every_mapped_op_has_a_case():
    assert set(MAPPERS) == set(CASES)


@pytest.mark.parametrize("op", sorted(CASES))
def test_mapping_computes_what_onnxruntime_computes(op, tmp_path):
    model, inputs, ir_op = CASES[op]()
    m = onnx_load.load(str(save(model, tmp_path / "m.onnx")))
    tensors = tuple(torch.from_numpy(v) for v in inputs.values())
    graph = frontend.capture(m, tensors)
    computed = [n for n in graph.nodes if n.op not in ("input", "param", "output")]
    assert computed and not any(isinstance(n.fn, OrtNode) for n in computed), [n.op for n in computed]
    assert any(n.op == (ir_op or op.lower()) for n in computed), [n.op for n in computed]
    got = run_ir(graph, list(tensors))
    want = run_ort(model, inputs)
    assert set(got) == {k for k in want if k in got} and got
    for name, value in got.items():
        np.testing.assert_allclose(np.asarray(value, dtype=np.float64), want[name].astype(np.float64),
                                   rtol=2e-4, atol=2e-5, err_msg=name)


# --------------------------------------------------------------------------- what the capture decides
def test_constant_of_shape_weights_are_folded(tmp_path):
    """The light zoo's convention: weights computed by ConstantOfShape from graph inputs
    that have an initializer (constants, not inputs)."""
    nodes = [helper.make_node("ConstantOfShape", ["w_shape"], ["w"], value=helper.make_tensor("v", T.FLOAT, [1], [0.25])),
             helper.make_node("Gemm", ["x", "w", "c"], ["y"], transB=1)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", T.FLOAT, [2, 4]),
                                           helper.make_tensor_value_info("w_shape", T.INT64, [2]),
                                           helper.make_tensor_value_info("c", T.FLOAT, [3])],
                              [helper.make_tensor_value_info("y", T.FLOAT, [2, 3])],
                              [tensor("w_shape", np.array([3, 4], np.int64)), tensor("c", np.zeros(3, np.float32))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)])
    model.ir_version = 3
    m = onnx_load.load(str(save(model, tmp_path / "m.onnx")))
    assert [i.name for i in m.input_infos()] == ["x"]
    report = gradaudit.audit(m)
    (layer,) = report.layers
    assert layer.op == "linear" and report.inputs == [{"shape": [2, 4], "dtype": "float32"}]
    # E[y^2] = 4 * 0.25^2 * E[x^2] = 0.25 for N(0, 1) inputs
    assert math.isclose(layer.predicted.act_rms, 0.5, rel_tol=1e-6)


def test_matmul_and_bias_add_are_one_linear_layer(tmp_path):
    nodes = [helper.make_node("MatMul", ["x", "fc.w"], ["h"]), helper.make_node("Add", ["h", "fc.b"], ["y"])]
    model = make_model(nodes, [("x", T.FLOAT, [2, 3, 4])], [("y", T.FLOAT, [2, 3, 5])],
                       [tensor("fc.w", normal(4, 5)), tensor("fc.b", normal(5))])
    graph = frontend.capture(onnx_load.load(str(save(model, tmp_path / "m.onnx"))), (torch.randn(2, 3, 4),))
    (linear,) = [n for n in graph.nodes if n.kind == "call_module"]
    assert linear.op == "linear" and linear.module == "fc" and set(linear.params) == {"weight", "bias"}
    assert graph.params_of[linear.name] == {"weight": "fc.w", "bias": "fc.b"}


def test_input_shape_override_reaches_the_shapes(cli, tmp_path):
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])]
    model = make_model(nodes, [("x", T.FLOAT, ["n", 3, "h", "w"])], [("y", T.FLOAT, ["n", 4, "h", "w"])],
                       [tensor("w", normal(4, 3, 3, 3))])
    path = save(model, tmp_path / "m.onnx")
    m = onnx_load.load(str(path))
    (x,), source, _ = onnx_load.example_inputs(m)
    assert tuple(x.shape) == (2, 3, 32, 32) and "n=2, h=32, w=32" in source
    import json

    result = cli("check", str(path), "--input-shape", "1,3,10,12", "--format", "json")
    data = json.loads(result.stdout)
    assert data["inputs"] == [{"shape": [1, 3, 10, 12], "dtype": "float32"}] and data["input_source"] == "--input-shape"


def test_unmapped_op_is_estimated_through_onnxruntime(tmp_path):
    """``Hardmax`` has no mapping: onnxruntime computes it and the Monte Carlo measures
    its gains by forward differences -- zero here, as Hardmax is piecewise constant --,
    and a gain-9 ``Mul`` hidden in a custom-domain function estimates to 9."""
    nodes = [helper.make_node("Hardmax", ["x"], ["y"], axis=-1)]
    model = make_model(nodes, [("x", T.FLOAT, [4, 6])], [("y", T.FLOAT, [4, 6])])
    report = gradaudit.audit(str(save(model, tmp_path / "m.onnx")))
    assert [(e["op"], e["ok"]) for e in report.estimated_ops] == [("Hardmax", True)]


def test_forward_difference_gains_match_autograd():
    """The Monte Carlo's gains for an op without autograd (montecarlo._difference_gains)
    against the same op with autograd: y = 3 x (gain 9) and y = x^2 (gain 4 E[x^2])."""
    from gradaudit.propagation import montecarlo

    x = torch.randn(64, 512, generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(1)
    (g_lin,) = montecarlo._difference_gains(lambda t: 3 * t, (x,), {}, [("x", 0, x)], [3 * x], gen)
    assert g_lin[:3] == ("x", 0, 0) and math.isclose(g_lin[3], 9.0, rel_tol=0.05)
    (g_sq,) = montecarlo._difference_gains(lambda t: t * t, (x,), {}, [("x", 0, x)], [x * x], gen)
    assert math.isclose(g_sq[3], float(4 * x.pow(2).mean()), rel_tol=0.1)


def test_node_names_modules_and_source_lines(tmp_path):
    """TorchScript scopes and dynamo metadata give module names; the dynamo exporter's
    stack trace gives the user's line."""
    from onnx_models import dynamo_available, export
    from probe_models import small_models

    model, (x,) = small_models()["conv_bn_dropout"]
    path = export(model, (x,), tmp_path / "ts.onnx")
    report = gradaudit.audit(str(path), (x,))
    assert [(layer.module, layer.op) for layer in report.layers] == [("conv", "conv"), ("bn", "batch_norm"),
                                                                     ("fc", "linear")]
    assert report.layers[0].node == "/conv/Conv"
    if dynamo_available():
        path = export(model, (x,), tmp_path / "dy.onnx", dynamo=True)
        report = gradaudit.audit(str(path), (x,))
        assert [layer.module for layer in report.layers] == ["conv", "bn", "fc"]
        assert report.layers[0].location["path"].endswith("probe_models.py")
        assert report.layers[0].location["line"] == 101


def test_audit_accepts_paths_protos_and_loaded_models(tmp_path):
    nodes = [helper.make_node("Gemm", ["x", "w"], ["y"], transB=1)]
    model = make_model(nodes, [("x", T.FLOAT, [2, 4])], [("y", T.FLOAT, [2, 3])], [tensor("w", normal(3, 4))])
    path = save(model, tmp_path / "m.onnx")
    reports = [gradaudit.audit(str(path)), gradaudit.audit(model), gradaudit.audit(onnx_load.load(str(path)))]
    assert len({r.layers[0].predicted.act_rms for r in reports}) == 1
    from gradaudit.errors import ConfigError

    with pytest.raises(ConfigError, match="nn.Module or an ONNX model"):
        gradaudit.audit(object())


def test_erf_gelu_pattern_fuses_into_one_activation(tmp_path):
    """x * 0.5 * (1 + erf(x / sqrt 2)) as exporters write GELU: scalar constants become
    Python numbers, the chain fuses onto x and is integrated exactly: E[gelu(z)^2] =
    0.42522 and E[gelu'(z)^2] = 0.45585 for z ~ N(0, 1) (ORACLES.md)."""
    c = {"sqrt2": np.array(math.sqrt(2), np.float32), "one": np.array(1.0, np.float32),
         "half": np.array(0.5, np.float32)}
    nodes = [helper.make_node("Div", ["x", "sqrt2"], ["d"]), helper.make_node("Erf", ["d"], ["e"]),
             helper.make_node("Add", ["e", "one"], ["a"]), helper.make_node("Mul", ["x", "a"], ["m"]),
             helper.make_node("Mul", ["m", "half"], ["g"]),
             helper.make_node("MatMul", ["g", "w"], ["y"])]
    model = make_model(nodes, [("x", T.FLOAT, [64, 8])], [("y", T.FLOAT, [64, 8])],
                       [tensor(k, v) for k, v in c.items()] + [tensor("w", np.eye(8, dtype=np.float32))])
    report = gradaudit.audit(str(save(model, tmp_path / "gelu.onnx")))
    (layer,) = report.layers
    assert math.isclose(layer.predicted.act_rms ** 2, 0.42522, rel_tol=2e-3)
    assert report.estimated_ops == []
    graph = frontend.capture(onnx_load.load(str(tmp_path / "gelu.onnx")), (torch.randn(64, 8),))
    from gradaudit.propagation.engine import propagate

    analysis = propagate(graph)
    x_name = graph.input_names[0]
    assert math.isclose(analysis.stat(x_name).grad_rms ** 2, 0.45585, rel_tol=2e-3)


def test_constant_sequences_fold_into_weights(tmp_path):
    """The dynamo exporter splits nn.MultiheadAttention's packed weight with
    SplitToSequence / SequenceAt: both fold, and the pieces are the layers' weights."""
    w = normal(8, 6)
    nodes = [helper.make_node("SplitToSequence", ["w", "two"], ["seq"], axis=1),
             helper.make_node("SequenceAt", ["seq", "i0"], ["w0"]), helper.make_node("SequenceAt", ["seq", "i1"], ["w1"]),
             helper.make_node("MatMul", ["x", "w0"], ["a"]), helper.make_node("MatMul", ["x", "w1"], ["b"]),
             helper.make_node("Add", ["a", "b"], ["y"])]
    consts = [tensor("w", w), tensor("two", np.array(3, np.int64)), tensor("i0", np.array(0, np.int64)),
              tensor("i1", np.array(1, np.int64))]
    model = make_model(nodes, [("x", T.FLOAT, [5, 8])], [("y", T.FLOAT, [5, 3])], consts)
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(0))
    graph = frontend.capture(onnx_load.load(str(save(model, tmp_path / "seq.onnx"))), (x,))
    linears = [n for n in graph.nodes if n.op == "linear"]
    assert len(linears) == 2 and not any(isinstance(n.fn, OrtNode) for n in graph.nodes)
    assert [n.op_type for n in graph.folded.graph.node] == ["MatMul", "MatMul", "Add"]
    np.testing.assert_allclose(run_ir(graph, [x])["y"].numpy(), x.numpy() @ w[:, :3] + x.numpy() @ w[:, 3:], rtol=1e-5)
