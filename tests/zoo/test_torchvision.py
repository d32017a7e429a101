"""Every classification model of ``torchvision.models``, audited at default init.

Inputs are 2 x 3 x 64 x 64 except where the architecture needs more (measured: the
constructor or the forward raises below these sizes): ``inception_v3`` 299 x 299 (in
training mode its auxiliary classifier pools the 17 x 17 map of ``Mixed_6e`` with a 5 x 5
window, stride 3, then applies a 5 x 5 convolution: any smaller input leaves that
convolution a map under 5 x 5), ``maxvit_t`` 224 x 224 (its blocks
partition the map into 7 x 7 windows at every stage). The ViTs are built for 64 x 64
with their ``image_size`` argument (``vit_h_14`` for 56 x 56: its 14 x 14 patches must
divide the image).
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

torchvision = pytest.importorskip("torchvision")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from harness import audit_zoo, check  # noqa: E402

pytestmark = [pytest.mark.zoo, pytest.mark.usefixtures("one_thread")]

MODELS = torchvision.models.list_models(module=torchvision.models)
SIZE = {"inception_v3": 299, "maxvit_t": 224, "vit_h_14": 56}


def test_every_classification_model_is_listed():
    assert len(MODELS) >= 80


def _build(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    kwargs = {"image_size": SIZE.get(name, 64)} if name.startswith("vit_") else {}
    return torchvision.models.get_model(name, **kwargs)


def case(name: str):
    """The model at its default init and its example inputs."""
    size = SIZE.get(name, 64)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    return _build(name), (x,)


@pytest.mark.parametrize("name", MODELS)
def test_torchvision_model(name):
    # the model is no local of this frame: a failure's traceback must not keep it alive
    check(audit_zoo(f"torchvision/{name}", *case(name)))
