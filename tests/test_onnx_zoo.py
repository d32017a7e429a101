"""The nine networks of onnx's light model zoo (shipped in the onnx wheel, old opsets,
weights computed by ``ConstantOfShape``, BatchNorm in inference mode where the network
has it) audit end to end: a report, never a load or internal error.

Every weight of these files is the constant 0.02 (GA204 symmetric-init). Every class
logit is then the same number, however large (1e31 at VGG-19's): the softmax is uniform,
its backward sums to zero along the row, and nothing below the last layer gets a
gradient (the rows of that layer being equal). The prediction says the same
(:mod:`gradaudit.propagation.rows`): GA101 is an error, GA204 names the cause, exit status 1."""

from __future__ import annotations

import pytest

pytest.importorskip("onnxruntime")

import gradaudit  # noqa: E402
from onnx_models import light_zoo  # noqa: E402

# they pass on the oldest supported torch too (no torchvision needed)
pytestmark = [pytest.mark.oldest, pytest.mark.usefixtures("one_thread")]

ZOO = light_zoo()
#: The networks of the zoo that normalise with BatchNorm (stored in inference mode).
WITH_BATCH_NORM = {"light_densenet121", "light_inception_v2", "light_resnet50", "light_shufflenet"}


def test_the_zoo_is_there():
    assert {p.stem for p in ZOO} >= WITH_BATCH_NORM | {"light_bvlc_alexnet", "light_vgg19", "light_squeezenet"}
    assert len(ZOO) == 9


@pytest.mark.parametrize("path", ZOO, ids=[p.stem for p in ZOO])
def test_audits_end_to_end(path):
    report = gradaudit.audit(str(path))
    assert report.frontend == "onnx"
    weight_layers = [layer for layer in report.layers if layer.depth is not None]
    assert weight_layers and all(layer.predicted is not None for layer in weight_layers)
    assert all(e["ok"] for e in report.estimated_ops)
    assert report.verdict != "incomplete" and not report.coverage.gaps
    assert any(f.rule == "GA204" for f in report.findings)
    assert any(f.rule == "GA101" and f.severity == "error" for f in report.findings)
    assert report.exit_code("error") == 1
    inference = [f for f in report.findings if f.rule == "GA304"]
    assert bool(inference) == (path.stem in WITH_BATCH_NORM)
    if inference:
        assert "inference mode" in inference[0].message and inference[0].severity == "info"


def test_exit_status_from_the_command_line(run):
    squeezenet = next(p for p in ZOO if p.stem == "light_squeezenet")
    result = run("check", str(squeezenet), "--format", "json")
    assert result.returncode == 1, result.stderr
    assert '"frontend": "onnx"' in result.stdout
