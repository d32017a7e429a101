"""GA304 inference-export: ONNX files exported for inference (BatchNorm folded into the
convolutions, or left in inference mode)."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

pytest.importorskip("onnxruntime")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import gradaudit  # noqa: E402
from onnx_models import dynamo_available, export, make_model, save, tensor  # noqa: E402
from probe_models import small_models  # noqa: E402

pytestmark = pytest.mark.oldest
CODE = "GA304"


def conv_bn():
    model, (x,) = small_models()["conv_bn_dropout"]
    return model, x


def eval_export(path):
    """``model.eval()`` then the default export: the TorchScript exporter folds BN."""
    model, x = conv_bn()
    model.eval()
    import contextlib
    import io
    import warnings

    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(path), dynamo=False)
    return path, x


def dynamo_optimized(path):
    """The dynamo exporter's optimizer folds BN into the conv even in training mode."""
    model, x = conv_bn()
    import contextlib
    import io
    import warnings

    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(model.train(), (x,), str(path), dynamo=True, training=torch.onnx.TrainingMode.TRAINING)
    return path, x


def training_export(path):
    model, x = conv_bn()
    return export(model, (x,), path), x


def inference_mode_bn(path):
    """A BatchNormalization node without training_mode (opset 15: inference)."""
    from onnx import TensorProto as T, helper

    c = 4
    nodes = [helper.make_node("Conv", ["x", "w"], ["h"], pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["h", "bn.weight", "bn.bias", "bn.mean", "bn.var"], ["y"])]
    inits = [tensor("w", np.random.default_rng(0).normal(size=(c, 3, 3, 3)).astype(np.float32)),
             tensor("bn.weight", np.ones(c, np.float32)), tensor("bn.bias", np.zeros(c, np.float32)),
             tensor("bn.mean", np.zeros(c, np.float32)), tensor("bn.var", np.ones(c, np.float32))]
    model = make_model(nodes, [("x", T.FLOAT, [2, 3, 8, 8])], [("y", T.FLOAT, [2, c, 8, 8])], inits, opset=15)
    return save(model, path), torch.randn(2, 3, 8, 8)


class PlainResidual(nn.Module):
    """Biased 3x3 convs with identity shortcuts and no normalization: what folding leaves."""

    def __init__(self, blocks=6):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
                                    for _ in range(blocks))

    def forward(self, x):
        x = self.stem(x)
        for b in self.blocks:
            x = torch.relu(x + b(x))
        return x


def plain_residual(path, blocks=6):
    x = torch.randn(2, 3, 8, 8)
    return export(PlainResidual(blocks), (x,), path), x


def plain_mlp(path):
    model = nn.Sequential(*[m for _ in range(12) for m in (nn.Linear(16, 16), nn.ReLU())])
    x = torch.randn(4, 16)
    return export(model, (x,), path), x


CASES = [
    pytest.param(eval_export, ("conv", "info"), id="eval-export-folds-bn"),
    pytest.param(dynamo_optimized, ("conv", "info"), id="dynamo-optimizer-folds-bn",
                 marks=pytest.mark.skipif(not dynamo_available(), reason="needs onnxscript")),
    pytest.param(inference_mode_bn, ("bn", "info"), id="bn-in-inference-mode"),
    pytest.param(lambda p: plain_residual(p, 6), ("stem", "info"), id="biased-residual-convs-no-norm"),
    pytest.param(lambda p: plain_residual(p, 2), None, id="shallow-residual-convs"),
    pytest.param(training_export, None, id="training-export"),
    pytest.param(plain_mlp, None, id="mlp-without-convs"),
]


@pytest.mark.parametrize("build, expect", CASES)
def test_finding(build, expect, tmp_path):
    path, x = build(tmp_path / "model.onnx")
    report = gradaudit.audit(str(path), (x,), select=[CODE])
    found = [f for f in report.findings if f.rule == CODE]
    assert [(f.module, f.severity) for f in found] == ([expect] if expect else [])
    for f in found:
        compile(f.fix, "<fix>", "exec")
        assert "TrainingMode.TRAINING" in f.fix


def test_torch_models_never():
    model, x = conv_bn()
    report = gradaudit.audit(model.eval(), (x,), select=[CODE])
    assert report.findings == []
