"""Error types whose message is a complete one-line explanation for the user."""


class SdrtError(Exception):
    """Base of every error sdrt reports to a user; the CLI prints it without a traceback."""


class InputError(SdrtError, ValueError):
    """A generation or command argument is out of range or malformed."""


class ModelError(SdrtError):
    """A model folder is missing, incomplete, or does not match what the runtime expects."""


class ExportError(SdrtError):
    """Exporting a model failed or its graphs disagree with the source model."""


class QuantizeError(SdrtError):
    """A precision variant could not be made, or failed its fidelity gate and was not listed."""


class GenerationError(SdrtError):
    """A generation produced unusable output (NaN/Inf) or was stopped."""


def first_line(exc: BaseException) -> str:
    """The first line of a library exception's message (its type's name if empty)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
