"""The on-policy teacher behind a vLLM server: `--teacher-base-url URL` or `--teacher-serve`.

The server scores the student's samples through `/v1/completions` with `prompt_logprobs`
(TRL's `VLLMClient.get_sequence_logprobs`, `openkd.teacher.client`); the loss is then
TRL's server distillation: the divergence over the sampled token plus one tail bucket.

Here, for training: the endpoint a run scores with (`openkd.teacher.served` has the URL check,
the endpoint and its pre-flight, shared with eval), and `--teacher-serve`'s server, started with
`openkd generate --serve`'s lifecycle (health wait, log beside the output, always stopped) and
shared with launched workers by environment.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from openkd import console
from openkd.errors import OpenkdError, brief
from openkd.teacher.served import ENDPOINT_ENV, Endpoint, api_root

if TYPE_CHECKING:
    from openkd.train.config import TrainConfig

SERVED_KL = "top-1+tail estimate"  # what the reverse KL is over with a served teacher
LOCAL_KL = "exact"


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
    from openkd.teacher.check import check_teacher
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
