"""The on-policy teacher behind a vLLM server: `--teacher-base-url URL` or `--teacher-serve`.

The server scores the student's samples through `/v1/completions` with `prompt_logprobs`
(TRL's `VLLMClient.get_sequence_logprobs`, `openkd.train.onpolicy.client`); the loss is then
TRL's server distillation: the divergence over the sampled token plus one tail bucket.

Here, what needs no torch: the URL check of the config, the endpoint (URL, key, the managed
server), the reachability and model check before the student's weights load, and
`--teacher-serve`'s server, started with `openkd generate --serve`'s lifecycle (health wait,
log beside the output, always stopped) and shared with launched workers by environment.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from openkd import console
from openkd.errors import OpenkdError, brief

if TYPE_CHECKING:
    from openkd.generate.vllm.server import ManagedServer
    from openkd.train.config import TrainConfig

# How --teacher-serve's server reaches processes started by `accelerate launch`.
ENDPOINT_ENV = "OPENKD_TEACHER_ENDPOINT"
PROBE_TIMEOUT = 10.0  # seconds for the pre-flight's requests
SERVED_KL = "top-1+tail estimate"  # what the reverse KL is over with a served teacher
LOCAL_KL = "exact"


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


def endpoint(cfg: TrainConfig, managed: Endpoint | None = None) -> Endpoint:
    """The endpoint of a served teacher: --teacher-base-url, this process's --teacher-serve
    server, or the one a launching parent started (by environment)."""
    if cfg.teacher_base_url:
        return Endpoint(url=api_root(cfg.teacher_base_url))
    if managed is not None:
        return managed
    shared = os.environ.get(ENDPOINT_ENV)
    if not shared:
        raise OpenkdError("--teacher-serve: no server was started for this process (internal)")
    data = json.loads(shared)
    return Endpoint(url=data["url"], api_key=data.get("api_key"))


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


def server_log(cfg: TrainConfig) -> Path:
    """--teacher-serve's log, beside --output-dir (which --overwrite may clear)."""
    out = Path(cfg.output_dir)
    return out.parent / f"{out.name}.teacher.server.log"


@contextlib.contextmanager
def teacher_server(cfg: TrainConfig, student: str) -> Iterator[Endpoint | None]:
    """--teacher-serve: `vllm serve --teacher` for the length of the run (None otherwise, and in
    launched workers, which use their parent's). Always stopped, the environment restored.
    The teacher's tokenizer is checked against the student's first: a server takes minutes."""
    if not (cfg.on_policy and cfg.teacher_serve) or ENDPOINT_ENV in os.environ:
        yield None
        return
    from openkd.generate.backends.spec import TeacherSpec
    from openkd.generate.vllm.server import start_vllm_server
    from openkd.train.onpolicy.teacher import check_teacher
    from openkd.train.student import load_tokenizer

    assert cfg.teacher is not None  # the config requires it
    tokenizer = load_tokenizer(
        student, trust_remote_code=cfg.trust_remote_code, chat_template=cfg.chat_template
    )
    check_teacher(
        cfg.teacher, student, tokenizer, trust_remote_code=cfg.trust_remote_code, served=True
    )
    spec = TeacherSpec(
        backend="openai",
        teacher=cfg.teacher,
        serve=True,
        max_new_tokens=1,  # the server only scores
        trust_remote_code=cfg.trust_remote_code,
        seed=cfg.seed,
        server_log=server_log(cfg),
        serve_args=cfg.teacher_serve_args,
    )
    served = start_vllm_server(spec)
    point = Endpoint(url=api_root(served.base_url), api_key=served.api_key, server=served.server)
    os.environ[ENDPOINT_ENV] = json.dumps({"url": point.url, "api_key": point.api_key})
    try:
        yield point
    finally:
        os.environ.pop(ENDPOINT_ENV, None)
        served.server.stop()
        console.info("stopped the teacher's vLLM server (--teacher-serve)")


def describe_failure(point: Endpoint, exc: BaseException, output_dir: Any) -> str:
    """The one line for a teacher server that stopped answering during training."""
    resume = (
        f"the checkpoints in {output_dir} are kept: rerun the same command to resume from the "
        "newest"
    )
    died = point.death()
    if died:
        return f"{died}; {resume}"
    return (
        f"the teacher server at {point.url} stopped answering during training ({brief(exc)}); "
        f"restart it, then {resume}"
    )
