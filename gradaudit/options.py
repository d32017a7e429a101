"""What an audit should do beyond the static pass, validated once.

:func:`gradaudit.audit` takes these as keyword arguments (visible in its signature and in
``help(gradaudit.audit)``); the command line builds the same object from its flags.
Validation happens here, before any work: a bad value is a
:class:`~gradaudit.errors.ConfigError` (one line, exit 2 on the command line), an unknown
option is Python's own ``TypeError`` from the signature.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from gradaudit.errors import ConfigError

#: Probe dtypes: fp32 runs as is, bf16 / fp16 run the forward under autocast.
DTYPES = ("fp32", "bf16", "fp16")
DEVICES = ("cpu", "cuda", "auto")


@dataclass(frozen=True)
class AuditOptions:
    """The measured stages of an audit (all off by default: a static audit).

    ``probe``: a short real forward/backward on the example inputs (``draws`` draws of the
    random cotangent), measured statistics beside the predicted ones. ``loss_fn`` /
    ``batch``: also differentiate the user's loss ``loss_fn(output, batch)`` on real
    batches (one batch; a callable called per draw; or an iterable such as a
    ``DataLoader``, one batch per draw), for gradient norms in the user's units (a
    ``loss_fn`` turns the probe on; :mod:`gradaudit.probe.loss` says what the model runs
    on). ``gradcheck``: numerically check custom backward code (``gradcheck_modules``
    narrows it to named modules and turns it on). ``dtype`` and
    ``device`` are the probe's. ``inputs_path``: a batch file (``.pt``, read with
    ``weights_only=True``, or ``.safetensors``) that replaces the example inputs.
    ``per_module_ignores``: glob over qualified module names -> rule codes not reported
    there.
    """

    probe: bool = False
    draws: int = 2
    loss_fn: Callable[..., Any] | None = None
    batch: Any = None
    gradcheck: bool = False
    gradcheck_modules: tuple[str, ...] = ()
    dtype: str = "fp32"
    device: str = "cpu"
    inputs_path: str | None = None
    per_module_ignores: dict[str, list[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.draws, bool) or not isinstance(self.draws, int) or self.draws < 1:
            raise ConfigError(f"draws must be a positive integer (got {self.draws!r})")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {', '.join(DTYPES)} (got {self.dtype!r})")
        if not isinstance(self.device, str) or not (self.device in DEVICES or self.device.startswith("cuda:")):
            raise ConfigError(f"device must be cpu, cuda, cuda:N or auto (got {self.device!r})")
        if self.loss_fn is not None and not callable(self.loss_fn):
            raise ConfigError(f"loss_fn must be callable as loss_fn(output, batch) (got {type(self.loss_fn).__name__})")
        if self.batch is not None and self.loss_fn is None:
            raise ConfigError("batch is the second argument of loss_fn(output, batch): pass loss_fn too")
        modules = self.gradcheck_modules
        if isinstance(modules, str):
            modules = (modules,)
        object.__setattr__(self, "gradcheck_modules", tuple(str(m) for m in modules or ()))
        if self.gradcheck_modules:
            object.__setattr__(self, "gradcheck", True)
        if self.loss_fn is not None:
            object.__setattr__(self, "probe", True)
        object.__setattr__(self, "probe", bool(self.probe))
        object.__setattr__(self, "gradcheck", bool(self.gradcheck))
        if self.inputs_path is not None:
            object.__setattr__(self, "inputs_path", str(self.inputs_path))
        object.__setattr__(self, "per_module_ignores", dict(self.per_module_ignores or {}))

    @property
    def measures(self) -> bool:
        """Whether any stage beyond the static pass runs."""
        return self.probe or self.gradcheck
