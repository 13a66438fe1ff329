"""A teacher behind an OpenAI-compatible vLLM server, before it scores: the URL check, the
endpoint (URL, key, a managed server) and the pre-flight that it answers and serves the teacher.

Shared by `openkd train --teacher-base-url/--teacher-serve` and `openkd eval
--on-policy-teacher-base-url`; the scoring requests are `openkd.teacher.client`'s.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from openkd.errors import OpenkdError, brief

if TYPE_CHECKING:
    from openkd.generate.vllm.server import ManagedServer

# How --teacher-serve's server reaches processes started by `accelerate launch`.
ENDPOINT_ENV = "OPENKD_TEACHER_ENDPOINT"
PROBE_TIMEOUT = 10.0  # seconds for the pre-flight's requests


def url_problem(url: str) -> str | None:
    """What is wrong with a server URL, or None (`http://host:port[/v1]`)."""
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        return "not an http(s) URL; pass the server's address, e.g. http://localhost:8000/v1"
    try:
        parsed.port  # noqa: B018 (raises on a bad port)
    except ValueError:
        return "its port is not a number from 0 to 65535"
    if parsed.query or parsed.fragment:
        return "drop the ?query or #fragment; pass the server's address, e.g. http://host:8000/v1"
    return None


def api_root(url: str) -> str:
    """The server's root (`http://host:8000`), from it or from its OpenAI base URL (`.../v1`)."""
    root = url.rstrip("/")
    return root[: -len("/v1")] if root.endswith("/v1") else root


@dataclass(frozen=True)
class Endpoint:
    """A teacher server to score with."""

    url: str  # the root, without /v1
    api_key: str | None = None
    server: ManagedServer | None = None  # --teacher-serve's, in this process
    label: str = "--teacher-base-url"  # the flag that named the URL, for messages

    @property
    def flag(self) -> str:
        return "--teacher-serve" if self.managed else f"{self.label} {self.url}"

    @property
    def managed(self) -> bool:
        return self.server is not None or ENDPOINT_ENV in os.environ

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def death(self) -> str | None:
        """Why --teacher-serve's server is gone (its exit code and last log line), or None."""
        server = self.server
        if server is None:
            return None
        code = server.exited()
        if code is None:
            return None
        return (
            f"the teacher's vLLM server (--teacher-serve, pid {server.pid}) exited with code "
            f"{code}: {server.last_log_line()} (full log: {server.log_path})"
        )


def probe(point: Endpoint, teacher: str) -> tuple[str, list[str], list[str]]:
    """Pre-flight: the server answers and serves --teacher. Returns (the model id to ask for,
    lines that passed, warnings)."""
    import httpx

    fix = (
        f"start the teacher's server first (e.g. `vllm serve {teacher}`) or fix the URL"
        if not point.managed
        else "see the server log"
    )
    try:
        response = httpx.get(
            f"{point.url}/v1/models", headers=point.headers(), timeout=PROBE_TIMEOUT
        )
    except httpx.HTTPError as exc:
        raise OpenkdError(
            f"{point.flag}: the teacher server at {point.url} cannot be reached ({brief(exc)}); "
            f"{fix}"
        ) from exc
    if response.status_code != 200:
        hint = (
            "it wants an API key: openkd sends none to --teacher-base-url; start it without "
            "--api-key on a private network"
            if response.status_code == 401
            else fix
        )
        raise OpenkdError(
            f"{point.flag}: GET {point.url}/v1/models answered {response.status_code} "
            f"({response.text[:200]!r}); {hint}"
        )
    try:
        ids = [str(m["id"]) for m in response.json()["data"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise OpenkdError(
            f"{point.flag}: {point.url}/v1/models did not answer an OpenAI model list "
            f"({brief(exc)}); point it at an OpenAI-compatible vLLM server"
        ) from exc
    if teacher in ids:
        return teacher, [f"the teacher server at {point.url} serves {teacher}"], []
    if len(ids) == 1:
        return (
            ids[0],
            [f"the teacher server at {point.url} answers"],
            [
                f"the teacher server serves {ids[0]!r}, not --teacher {teacher!r}: the tokenizer "
                f"check used {teacher}'s tokenizer; make sure it is the same model"
            ],
        )
    raise OpenkdError(
        f"{point.flag}: the server at {point.url} serves {', '.join(ids) or 'no model'}, not "
        f"--teacher {teacher}; pass --teacher as the served model's name (and path: its "
        "tokenizer is checked against the student's)"
    )
