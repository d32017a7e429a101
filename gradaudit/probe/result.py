"""What the probe measured: per-layer second moments accumulated over draws, and the
whole result the probe-stage rules read and the report shows."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from gradaudit.probe.loss import LossMeasure
    from gradaudit.probe.nonfinite import NonFinite
    from gradaudit.probe.units import UnitStats


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
class ProbeResult:
    """Everything the probe measured; probe-stage rules read it.

    ``layers``, ``grad_norms`` and ``agreement`` come from DESIGN.md's loss
    L = sum <y, g>, g ~ N(0, 1), the loss the prediction is made for; ``loss`` holds the
    measurements with the user's own loss, when one was given.
    """

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
    #: The user's loss, measured (:class:`~gradaudit.probe.loss.LossMeasure`), or None.
    loss: LossMeasure | None = None

    @property
    def total_grad_norm(self) -> float:
        """Mean over draws of ||dL/dtheta|| with the synthetic loss L."""
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
        return clean(
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
                "synthetic_loss": SYNTHETIC,
                "loss": self.loss.to_json() if self.loss is not None else None,
            }
        )


#: The loss of the prediction and of ``grad_norms`` / ``agreement``, as the report states it.
SYNTHETIC = "L = sum over floating outputs y of <y, g>, g ~ N(0, 1)"


def _fraction_within_2x(rows: list[dict], key: str) -> float | None:
    if not rows:
        return None
    return sum(1 for r in rows if abs(r[key]) <= math.log10(2)) / len(rows)


def clean(obj: Any) -> Any:
    """JSON-safe: inf/nan floats become strings, floats keep 6 significant digits."""
    if isinstance(obj, float):
        if obj != obj:
            return "nan"
        if math.isinf(obj):
            return "inf" if obj > 0 else "-inf"
        return float(f"{obj:.6g}")
    if isinstance(obj, dict):
        return {k: clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean(v) for v in obj]
    return obj
