"""Words and table columns for the gradient over time, shared by the text and HTML
reports (they only format :class:`gradaudit.propagation.over_time.OverTime` records).

A record's curves are the RMS of dL/dx_t for a loss on the last step only, relative to
that step (``predicted_h``: of dL/dh_t); "steps back" k is T - 1 - t.
"""

from __future__ import annotations

from typing import Any

from gradaudit.report.common import fmt_num

#: How the per-step statistics of each family are named in the report.
GATE_LABELS = {
    "forget_mean": "forget gate mean",
    "input_mean": "input gate mean",
    "output_mean": "output gate mean",
    "cell_tanh_prime_rms": "RMS tanh' of the cell input",
    "update_mean": "update gate mean",
    "reset_mean": "reset gate mean",
    "new_tanh_prime_rms": "RMS tanh' of the candidate",
    "phi_prime_rms": "RMS phi' of the pre-activations",
    "forget_rms": "RMS forget gate",
}
#: The statistics quoted in the one-line summary, per family.
KEY_GATES = {"lstm": ("forget_mean",), "gru": ("update_mean",), "rnn_tanh": ("phi_prime_rms",),
             "rnn_relu": ("phi_prime_rms",)}


def title(record: Any) -> str:
    """``'lstm' (LSTM, 80 steps)`` / a loop: ``'cell' (LSTMCell, a loop of 40 calls)``."""
    name = record.module or record.node
    what = f"a loop of {record.steps} calls" if record.nodes else f"{record.steps} steps"
    return f"'{name}' ({record.module_type or record.op}, {what})"


def horizon_text(curve: Any, steps: int) -> str:
    """``falls below 1e-3 after 13.1 steps back`` (``extrapolated past the 80 steps``)."""
    if curve is None:
        return "-"
    if curve.horizon is None:
        return f"stays within 1e-3 to 1e3 over {steps} steps"
    verb = "falls below 1e-3" if curve.direction == "vanishing" else "rises above 1e3"
    past = f" (extrapolated past the {len(curve.values)} steps)" if curve.extrapolated else ""
    return f"{verb} after {fmt_num(curve.horizon)} steps back{past}"


def horizons_text(record: Any) -> str:
    """The predicted horizon, and the measured one when the probe ran."""
    text = horizon_text(record.predicted, record.steps) + " predicted"
    if record.measured is not None:
        text += "; " + horizon_text(record.measured, record.steps) + " measured"
    return text


def hidden_text(record: Any) -> str:
    """``dL/dh_t: per-step gain 0.583, falls below 1e-3 after 10 steps back predicted``:
    the total gradient at the hidden state, whose horizon is the memory the layer can
    learn at this initialisation (predicted only: the probe measures dL/dx_t)."""
    curve = record.predicted_h
    gain = f"per-step gain {fmt_num(curve.gain)}, " if curve.gain is not None else ""
    return f"dL/dh_t: {gain}{horizon_text(curve, record.steps)} predicted"


def columns(record: Any) -> tuple[list[int], list[str], list[str] | None]:
    """Steps back to show, and the predicted and measured values there (formatted)."""
    n = max(len(record.predicted.values), len(record.measured.values) if record.measured is not None else 0)
    lags = lag_columns(n)
    measured = at_lags(record.measured.values, lags) if record.measured is not None else None
    return lags, at_lags(record.predicted.values, lags), measured


def gates_text(record: Any, every: bool = False) -> str:
    """The gates' statistics (only the one that sets the time scale unless ``every``) and
    the recurrent weights' singular values."""
    keys = record.gates if every else KEY_GATES.get(record.family, ())
    parts = [f"{GATE_LABELS.get(k, k)} {fmt_num(record.gates[k])}" for k in keys if k in record.gates]
    parts.append(f"W_hh largest singular value {fmt_num(record.sigma_max)} (RMS {fmt_num(record.sigma_rms)})")
    parts.append(f"mean-field gain {fmt_num(record.mean_field_gain)} per step")
    return "; ".join(parts)


def gain_text(record: Any) -> str:
    """``per-step gain 0.598 predicted, 0.598 measured``."""
    text = f"per-step gain {fmt_num(record.predicted.gain)} predicted"
    if record.measured is not None:
        text += f", {fmt_num(record.measured.gain)} measured"
    return text


def lag_columns(n: int) -> list[int]:
    """Steps back to show for a curve of ``n`` steps: 0, 1, 2, 5, 10, 20, 50, ... and the
    first step (n - 1)."""
    out = []
    for decade in (1, 10, 100, 1000, 10000):
        for m in (1, 2, 5):
            if m * decade < n - 1:
                out.append(m * decade)
    return [0] + out + ([n - 1] if n > 1 else [])


def at_lags(values: list[float] | None, lags: list[int]) -> list[str]:
    """The curve's values (time order) at the given steps back, formatted; ``-`` where it
    has none."""
    if values is None:
        return ["-"] * len(lags)
    n = len(values)
    return [fmt_num(values[n - 1 - k]) if k < n else "-" for k in lags]
