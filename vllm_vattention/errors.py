"""Typed errors. Every message names the offending value and the fix."""


class VattnError(RuntimeError):
    """Base class of every error this package raises on purpose."""


class ConfigError(VattnError, ValueError):
    """A setting (environment variable, vLLM option, model) we cannot serve."""


class DriverError(VattnError):
    """A CUDA driver call failed. `code` is the CUresult, `name` its symbol."""

    def __init__(self, call: str, code: int, name: str, detail: str = ""):
        self.call, self.code, self.name = call, code, name
        msg = f"{call} failed with {name} ({code})"
        super().__init__(f"{msg}: {detail}" if detail else msg)


class OutOfPagesError(VattnError):
    """No physical page is free; the caller should wait or preempt, not crash."""


class OutOfAddressSpaceError(VattnError):
    """The virtual range we need cannot be reserved."""


class MappingError(VattnError):
    """A mapping request that violates the manager's invariants (a bug upstream of us)."""
