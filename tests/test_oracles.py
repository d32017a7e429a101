"""Published figures (ORACLES.md) that gradaudit's math must reproduce.

- The activation table: E[phi^2], Var[phi] and E[phi'^2] at unit-variance Gaussian input
  (numerical integration of the published definitions; NFNet's gamma table agrees).
- He et al. 2015: a 30-layer ReLU MLP with Xavier init shrinks the forward variance by
  2^-29; with He init it keeps it (~1).
- PyTorch's default Linear init (Var[w] = 1/(3 fan_in)) shrinks the variance 6x per ReLU
  layer; with its default bias the length map settles at q* = 2 / (5 fan_in).

Each network figure is checked twice: on gradaudit's prediction (``gradaudit.audit``)
and on a real forward/backward pass (tests/measure.py), with the log-scale tolerance
ORACLES.md gives for finite networks (+-1.5 in log2), averaged over a few weight draws.
"""

from __future__ import annotations

import math
import os
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from measure import measure  # noqa: E402

import gradaudit  # noqa: E402
from gradaudit.propagation.moments import expectations  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------- activation table
#: ORACLES.md "Activation moments at unit-variance Gaussian input": (E[phi^2], Var[phi], E[phi'^2]).
TABLE = {
    "relu": (F.relu, 0.5000, 0.34085, 0.5000),
    "tanh": (torch.tanh, 0.39429, 0.39429, 0.46440),
    "sigmoid": (torch.sigmoid, 0.29338, 0.04338, 0.04484),
    "gelu": (F.gelu, 0.42522, 0.34564, 0.45585),
    "silu": (F.silu, 0.35578, 0.31308, 0.37948),
    "selu": (F.selu, 1.0000, 1.0000, 1.07157),
    "softplus": (F.softplus, 0.92125, 0.27151, 0.29338),
}
QUANTITIES = ("E[phi^2]", "Var[phi]", "E[phi'^2]")


def _digits(value: float) -> float:
    """Half a unit in the last printed digit (the table has 5 significant decimals)."""
    return 0.5e-5 if value < 1 else 0.5e-4


@pytest.mark.parametrize("quantity", QUANTITIES)
@pytest.mark.parametrize("phi", sorted(TABLE))
def test_activation_moments(phi, quantity):
    fn, m2, var, d2 = TABLE[phi]
    e = expectations(fn, 0.0, 1.0)
    got = {"E[phi^2]": e.m2, "Var[phi]": e.m2 - e.mean**2, "E[phi'^2]": e.d2}[quantity]
    want = {"E[phi^2]": m2, "Var[phi]": var, "E[phi'^2]": d2}[quantity]
    # to the printed digits, or 2e-4 relative where the printed rounding is coarser
    tol = max(_digits(want) + 1e-6, 2e-4 * want)
    assert abs(got - want) <= tol, f"{phi} {quantity}: gradaudit {got:.6f}, ORACLES.md {want}"


# --------------------------------------------------------------------------- deep ReLU MLPs
WIDTH = 256
DEPTH = 30
SEEDS = (0, 1, 2)


def relu_mlp(init: str, seed: int, depth: int = DEPTH, width: int = WIDTH) -> nn.Sequential:
    """``depth`` Linear(width, width) layers with ReLU between (none after the last)."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i in range(depth):
        layer = nn.Linear(width, width)
        if init == "xavier":
            nn.init.xavier_normal_(layer.weight)
            nn.init.zeros_(layer.bias)
        elif init == "he":
            nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
            nn.init.zeros_(layer.bias)
        elif init == "default-no-bias":
            nn.init.zeros_(layer.bias)
        elif init != "default":
            raise ValueError(init)
        layers.append(layer)
        if i < depth - 1:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def _layer_m2(model: nn.Module, inputs: tuple) -> tuple[list[float], list[float]]:
    """Predicted and measured E[y^2] of every Linear output, in order."""
    report = gradaudit.audit(model, inputs)
    meas = measure(model, inputs, draws=2)
    pred = [layer.predicted.act_rms**2 for layer in report.layers]
    real = [meas[layer.node][0] ** 2 for layer in report.layers]
    return pred, real


def _log2_ratio(init: str, depth: int = DEPTH) -> tuple[float, float]:
    """log2 of E[y_depth^2] / E[y_1^2], averaged over weight draws: (predicted, measured)."""
    preds, reals = [], []
    for seed in SEEDS:
        pred, real = _layer_m2(relu_mlp(init, seed, depth), (torch.randn(128, WIDTH),))
        preds.append(math.log2(pred[-1] / pred[0]))
        reals.append(math.log2(real[-1] / real[0]))
    return sum(preds) / len(preds), sum(reals) / len(reals)


@pytest.mark.parametrize(
    "init, depth, want, source",
    [
        ("xavier", DEPTH, -29.0, "He et al. 2015: Xavier halves the variance per ReLU layer, 2^-29 over 30 layers"),
        ("he", DEPTH, 0.0, "He et al. 2015: He init keeps the variance, ratio ~1"),
        ("default-no-bias", 10, -9 * math.log2(6.0), "PyTorch default Linear init: variance / 6 per ReLU layer"),
    ],
)
def test_forward_variance_ratio(init, depth, want, source):
    pred, real = _log2_ratio(init, depth)
    msg = f"{source}: log2 ratio over {depth} layers predicted {pred:.2f}, measured {real:.2f}, published {want:.2f}"
    print(msg)
    assert abs(pred - want) <= 1.5, msg
    assert abs(real - want) <= 1.5, msg


def test_default_init_bias_fixed_point():
    """ORACLES "Initialisation": with PyTorch's default weight *and* bias init, q_l =
    (1/3)(1/2) q_{l-1} + 1/(3 fan_in) settles at q* = 2 / (5 fan_in), whatever the input.

    The realised bias variance of one layer (256 uniform draws) scatters by ~6%, so we
    average E[h^2] over the last 10 of 30 layers and over three weight draws, and require
    10% agreement, on the prediction and on the real network.
    """
    want = 2.0 / (5 * WIDTH)
    preds, reals = [], []
    for seed in SEEDS:
        pred, real = _layer_m2(relu_mlp("default", seed), (torch.randn(128, WIDTH),))
        preds += pred[-10:]
        reals += real[-10:]
    pred, real = sum(preds) / len(preds), sum(reals) / len(reals)
    msg = f"q* predicted {pred:.4g}, measured {real:.4g}, published 2/(5 fan_in) = {want:.4g}"
    print(msg)
    assert abs(pred / want - 1) <= 0.10, msg
    assert abs(real / want - 1) <= 0.10, msg


def test_xavier_gradient_mirror():
    """Backward mirror of He et al.: with Xavier, each ReLU layer also halves the gradient
    second moment toward the input (chi_1 = s_w^2 / 2 = 1/2): 2^-29 over 30 layers,
    predicted and measured within +-1.5 in log2 (averaged over weight draws)."""
    preds, reals = [], []
    for seed in SEEDS:
        model, inputs = relu_mlp("xavier", seed), (torch.randn(128, WIDTH),)
        report = gradaudit.audit(model, inputs)
        meas = measure(model, inputs, draws=2)
        first, last = report.layers[0], report.layers[-1]
        preds.append(2 * math.log2(first.predicted.grad_rms / last.predicted.grad_rms))
        reals.append(2 * math.log2(meas[first.node][1] / meas[last.node][1]))
    pred, real = sum(preds) / len(preds), sum(reals) / len(reals)
    msg = f"log2 gradient second-moment ratio first/last: predicted {pred:.2f}, measured {real:.2f}, published -29"
    print(msg)
    assert abs(pred + 29) <= 1.5, msg
    assert abs(real + 29) <= 1.5, msg
