"""Model files written the way tutorials and popular repositories write them
(``tests/zoo/models``), loaded as ``gradaudit check FILE`` loads them and audited."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from harness import audit_zoo, check  # noqa: E402

from gradaudit.loading import load_target  # noqa: E402

pytestmark = [pytest.mark.zoo, pytest.mark.usefixtures("one_thread")]

MODELS = Path(__file__).parent / "models"
FILES = sorted(p.stem for p in MODELS.glob("*.py"))
#: Which capture each file needs, and why the cheaper ones cannot take it.
FRONTEND = {
    "gpt": "export",  # assert on the sequence length, is_cuda, int(size), zeros from sizes
    "einops_vit": "export",  # einops' layers and functions
    "data_dependent": "hooks",  # a branch on the data's value
}


def case(name: str):
    """The file's model and example inputs, loaded as ``gradaudit check FILE`` loads them."""
    torch.manual_seed(0)
    loaded = load_target(str(MODELS / f"{name}.py"))
    return loaded.model, loaded.inputs


@pytest.mark.parametrize("name", FILES)
def test_tutorial_model(name):
    # the model is no local of this frame: a failure's traceback must not keep it alive
    result = audit_zoo(f"tutorial/{name}", *case(name))
    assert result.frontend == FRONTEND.get(name, "fx")
    check(result)
