"""Where the probe runs: ``--device`` resolution and moving the model there and back.

The model is moved, never copied: parameter objects stay the same, their storage moves to
the device for the run and comes back bitwise afterwards; the CUDA generator's state is
kept as found (it is initialised on first use).
"""

from __future__ import annotations

from gradaudit.errors import ConfigError


def resolve_device(device: str | None) -> str:
    """``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (CUDA when available, else CPU)."""
    import torch

    device = (device or "cpu").strip().lower()
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return "cpu"
    if device == "cuda" or device.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {device}: CUDA is not available on this machine (use --device cpu or auto)")
        if ":" in device:
            index = device.split(":", 1)[1]
            if not index.isdigit() or int(index) >= torch.cuda.device_count():
                raise ConfigError(f"--device {device}: no such CUDA device ({torch.cuda.device_count()} present)")
        return device
    raise ConfigError(f"--device must be cpu, cuda or auto (got {device!r})")


class on_device:
    """Move the model to ``device`` for the run and back afterwards (no copy: parameter
    objects stay the same; their storage moves and comes back bitwise)."""

    def __init__(self, model, device: str) -> None:
        self.model = model
        self.device = device
        self.original = None
        self.fork = None

    def __enter__(self):
        import torch

        first = next(iter(self.model.parameters()), None)
        if first is None:
            first = next(iter(self.model.buffers()), None)
        self.original = first.device if first is not None else torch.device("cpu")
        if self.device.startswith("cuda"):
            # the CUDA generator is initialised on first use: keep its state as found
            index = torch.device(self.device).index or 0
            self.fork = torch.random.fork_rng(devices=[index])
            self.fork.__enter__()
        if torch.device(self.device) != self.original:
            self.model.to(self.device)
        return self

    def __exit__(self, *exc):
        import torch

        try:
            if torch.device(self.device) != self.original:
                self.model.to(self.original)
        finally:
            if self.fork is not None:
                self.fork.__exit__(None, None, None)
        return False


def seed_draw(seed: int, device: str):
    """Seed one probe draw: the RNGs the model's own random ops read (dropout: the CPU
    generator, and the CUDA ones on a CUDA device), and a private generator on ``device``
    for the draw's cotangents, returned. The CPU generator is seeded directly:
    ``torch.manual_seed`` also seeds every lazily initialised backend, which costs
    milliseconds per call. The caller restores the RNG states afterwards."""
    import torch

    torch.default_generator.manual_seed(seed)
    if device.startswith("cuda"):
        torch.cuda.manual_seed_all(seed)
    return torch.Generator(device=device).manual_seed(seed)
