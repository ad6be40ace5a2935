"""The error tree of model-surgery.

Every error is a ``SurgeryError`` and also the builtin a caller would catch for the same problem
(``FileNotFoundError``, ``ValueError``, ``KeyError``...). Messages say what is wrong, with which file or
tensor; ``hint`` says how to fix it. The CLI prints ``error: <message>`` and ``hint: <hint>``.
"""

from __future__ import annotations


class SurgeryError(Exception):
    """Base of every error this library raises on purpose."""

    def __init__(
        self, message: str, *, hint: str | None = None, path: str | None = None, tensor: str | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint  # how to fix it (the CLI prints it as `hint: ...`)
        self.path = path  # the file or folder concerned, when there is one
        self.tensor = tensor  # the tensor concerned, when there is one

    def __str__(self) -> str:  # KeyError would otherwise repr() the message
        return self.message


class InputNotFoundError(SurgeryError, FileNotFoundError):
    """A checkpoint, shard or file named by the user does not exist."""


class InputReadError(SurgeryError, OSError):
    """An input exists but could not be read (e.g. the network failed while streaming it by range)."""


class CorruptCheckpointError(SurgeryError, ValueError):
    """A safetensors file or index is malformed (bad header, offsets, truncated data)."""


class MissingTensorError(SurgeryError, KeyError):
    """A tensor needed by the plan is absent from an input."""


class IncompatibleTensorsError(SurgeryError, ValueError):
    """Inputs disagree on a tensor's shape or dtype, or integer tensors differ."""


class PlanError(SurgeryError, ValueError):
    """Several planning problems at once; ``problems`` lists each message."""

    def __init__(self, problems: list[str], *, hint: str | None = None) -> None:
        shown = "\n  - ".join(problems[:50])
        more = f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else ""
        super().__init__(
            f"the inputs cannot be merged ({len(problems)} problem(s)):\n  - {shown}{more}", hint=hint
        )
        self.problems = problems


class RecipeError(SurgeryError, ValueError):
    """A recipe, method name or parameter is invalid."""


class OutputError(SurgeryError, OSError):
    """The output folder cannot be used or written (input overlap, not empty, disk full)."""


class NonFiniteOutputError(SurgeryError, ArithmeticError):
    """Computed tensors hold inf or NaN although every input value was finite; ``tensors`` lists
    them in plan order (``tensor`` is the first)."""

    def __init__(self, message: str, *, tensors: list[str], hint: str | None = None) -> None:
        super().__init__(message, hint=hint, tensor=tensors[0])
        self.tensors = tensors


class InputNotADiffError(SurgeryError, ValueError):
    """``apply`` was given something that is not a diff or patch (for example a full model)."""


class DeviceError(SurgeryError, ValueError):
    """The requested compute device does not exist on this machine (or is not a device name)."""


class Interrupted(SurgeryError):
    """The run was stopped; the output folder holds a resumable partial run."""


class BackendError(SurgeryError, ConnectionError):
    """A distributed backend (Ray) could not be reached, or lost the run."""


class MemoryBudgetError(SurgeryError, MemoryError):
    """One unit of work (a matrix to factor) needs more memory than the budget allows."""
