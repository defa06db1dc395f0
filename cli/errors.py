"""How the commands report errors: sdrt's own (and a missing optional package) as one
`error: ...` line and exit 1; `sdrt -v` shows the traceback instead."""

from __future__ import annotations

import functools
import sys

import click

from sdrt.runtime.errors import SdrtError

# The pyproject extra that installs each optional package a command may import.
_EXTRA_OF = {"openvino": "openvino", "nncf": "openvino", "onnx": "quantize",
             "ray": "ray", "grpc": "ray",  # grpc: ray:// addresses (Ray Client)
             **dict.fromkeys(("fastapi", "starlette", "uvicorn", "prometheus_client"), "serve")}


def reports_errors(command):
    """Turn SdrtError (and a missing optional dependency) into `error: ...` and exit 1."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        verbose = click.get_current_context().find_root().params.get("verbose", False)
        try:
            return command(*args, **kwargs)
        except (SdrtError, ModuleNotFoundError) as exc:
            if verbose:
                raise
            message = str(exc)
            if isinstance(exc, ModuleNotFoundError):
                message = missing_package(exc.name or "")
            click.echo(f"error: {message}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)

    return wrapper


def missing_package(module: str) -> str:
    """What to install when an optional dependency is missing."""
    package = module.split(".")[0]
    extra = _EXTRA_OF.get(package, "export")
    torch_first = "torch==2.13.0 " if extra == "export" else ""
    return (f"this command needs the '{package}' package; install the extra: "
            f"pip install {torch_first}'sdrt[{extra}]'")
