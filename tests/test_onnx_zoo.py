"""The nine networks of onnx's light model zoo (shipped in the onnx wheel, old opsets,
weights computed by ``ConstantOfShape``, BatchNorm in inference mode where the network
has it) audit end to end: a report, never a load or internal error.

Every weight of these files is the constant 0.02 (GA204 symmetric-init). Without
normalization the activations then grow by fan-in x 0.02 per layer (to 1e31 at VGG-19's
logits, which the prediction follows: its squares are taken in float64), and every class
logit is the same number. Five of the plain networks (AlexNet, Inception v1, SqueezeNet,
VGG-19, ZFNet-512) end in an ``incomplete`` verdict (GA001): the moment model treats units as
independent, so the softmax sees logits spread by 1e11 or more, saturates, and passes
back exactly zero, where the real logits are equal, the softmax is uniform and its
gradient reaches the last layer (and, the rows of that layer being equal, nothing
below it). The same networks built in torch and audited through torch.fx do the same."""

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
#: The plain networks whose softmax the moment model saturates (see the module docstring).
INCOMPLETE = {"light_bvlc_alexnet", "light_inception_v1", "light_squeezenet", "light_vgg19", "light_zfnet512"}


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
    assert any(f.rule == "GA204" for f in report.findings)
    assert (report.verdict == "incomplete") == (path.stem in INCOMPLETE), report.verdict
    if report.verdict == "incomplete":
        assert all("exactly 0 on every parameterized layer" in g.reason for g in report.coverage.gaps)
    inference = [f for f in report.findings if f.rule == "GA304"]
    assert bool(inference) == (path.stem in WITH_BATCH_NORM)
    if inference:
        assert "inference mode" in inference[0].message and inference[0].severity == "info"


def test_exit_status_from_the_command_line(run):
    squeezenet = next(p for p in ZOO if p.stem == "light_squeezenet")
    result = run("check", str(squeezenet), "--format", "json")
    assert result.returncode not in (2, 3), result.stderr  # 4: incomplete (see the module docstring)
    assert '"frontend": "onnx"' in result.stdout
