"""GA304 inference-export."""

from __future__ import annotations

from typing import Iterator

from gradaudit.rules.base import Finding, Rule, register
from gradaudit.rules.evidence.ops import NORMS
from gradaudit.rules.evidence.structure import is_residual_add

#: The export call that keeps BatchNorm as it trains.
EXPORT_FIX = (
    'torch.onnx.export(model, example_inputs, "model.onnx", '
    "training=torch.onnx.TrainingMode.TRAINING, do_constant_folding=False)"
)


@register
class InferenceExport(Rule):
    """An ONNX file exported for inference: its BatchNorm is folded or in inference mode.

    ## What it does
    For ONNX models only, reports (as information) when the file was evidently exported
    for inference, so that what it shows is not the network that training runs:

    - convolutions that absorbed a BatchNorm -- the exporter's optimizer says so
      (``FuseBatchNormIntoConv``), records a BatchNorm module as their source, or their
      weights were computed at export while the other weights kept their names;
    - a deep residual convolutional network with biases on every convolution and no
      normalization at all (the shape BatchNorm folding leaves behind);
    - ``BatchNormalization`` nodes in inference mode (running statistics), which the
      audit evaluates with batch statistics, as training does.

    ## Why is this bad?
    An inference export folds each BatchNorm into the preceding convolution (its scale
    into the weights, its shift into a bias): the graph then has no normalization, and
    the static pass predicts the un-normalised network -- typically exploding or
    collapsing activations that the real training-mode network, which normalises every
    batch, does not have. Running statistics are likewise not what a training step
    uses. Predictions about training need the training-mode graph.

    ## Example
    ```python
    model.eval()
    torch.onnx.export(model, example_inputs, "model.onnx")   # BatchNorm folded
    ```

    ## Use instead
    ```python
    model.train()
    torch.onnx.export(model, example_inputs, "model.onnx",
                      training=torch.onnx.TrainingMode.TRAINING, do_constant_folding=False)
    # or audit the PyTorch model itself: gradaudit check model.py
    ```

    ## References
    - Ioffe & Szegedy, "Batch Normalization: Accelerating Deep Network Training by
      Reducing Internal Covariate Shift", ICML 2015 (inference uses population statistics).
    - PyTorch, ``torch.onnx.export``: ``training`` (``TrainingMode.EVAL`` folds BatchNorm
      into convolutions; ``TRAINING`` keeps it).
    """

    code = "GA304"
    name = "inference-export"
    category = "normalization"
    default_severity = "info"

    def check(self, analysis) -> Iterator[Finding]:
        graph = analysis.graph
        facts = getattr(graph, "facts", None)
        if graph.frontend != "onnx" or facts is None:
            return
        folded = facts.get("bn_folded", [])
        if folded:
            node = graph[folded[0][0]]
            yield self.finding(
                f"{len(folded)} convolution(s) of this ONNX file carry a folded BatchNorm ('{node.module or node.name}': "
                f"{folded[0][1]}): it was exported for inference, so the prediction describes the network without "
                "its BatchNorm layers, not what training runs",
                node=node, fix=EXPORT_FIX, convolutions=len(folded),
            )
        elif self._looks_folded(analysis):
            convs = [n for n in analysis.weight_layers() if n.op == "conv"]
            yield self.finding(
                f"this ONNX file has {len(convs)} convolutions, all with biases, residual connections and no "
                "normalization at all: the pattern an inference export leaves when it folds BatchNorm into the "
                "convolutions; if the network trains with BatchNorm, the prediction describes it without",
                node=convs[0], fix=EXPORT_FIX, convolutions=len(convs),
            )
        inference = facts.get("bn_inference", [])
        if inference:
            node = next((n for n in graph if n.name == inference[0] or graph.tensor_of.get(n.name) == inference[0]),
                        None)
            yield self.finding(
                f"{len(inference)} BatchNormalization node(s) of this ONNX file are in inference mode (running "
                "statistics); the audit evaluates them with batch statistics, as a training step does",
                node=node, fix=EXPORT_FIX, nodes=len(inference),
            )

    @staticmethod
    def _looks_folded(analysis) -> bool:
        settings = analysis.config["settings"]
        nodes = list(analysis.graph)
        if any(n.op in NORMS for n in nodes):
            return False
        convs = [n for n in analysis.weight_layers() if n.op == "conv"]
        if len(convs) < settings.deep or not all(n.params.get("bias") is not None for n in convs):
            return False
        return any(n.op == "add" and is_residual_add(analysis, n) for n in nodes)
