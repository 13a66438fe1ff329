"""TRL's `VLLMClient` for scoring with a served teacher, with openkd's connection handling.

`get_sequence_logprobs` (the `/v1/completions` request with `prompt_logprobs` and its parsing)
is TRL's, unchanged. The constructor is not: TRL's waits up to a minute for the server, asks
for the first model it lists, sends no API key and retries with backoff for about a minute.
openkd has already checked the server (`openkd.teacher.served.probe`), names the model, sends
--teacher-serve's key, retries briefly, and turns a failed request into one line naming the
server (its exit code and log for --teacher-serve) and how to resume.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import requests
from requests.adapters import HTTPAdapter
from trl.generation.vllm_client import VLLMClient
from urllib3.util.retry import Retry

from openkd.errors import OpenkdError
from openkd.teacher.served import Endpoint

RETRIES = 3  # per request, on refused connections, broken answers and 502/503/504
BACKOFF = 1.0  # seconds, doubled per retry after the first
REQUEST_TIMEOUT = 600.0  # seconds for one scoring request (a large batch on a busy server)


class TeacherServerError(OpenkdError):
    """The teacher server failed a request during training or evaluation."""


class TeacherClient(VLLMClient):
    """Scores token sequences on a served teacher (`get_sequence_logprobs`, TRL's)."""

    def __init__(
        self, point: Endpoint, model: str, *, on_failure: Callable[[BaseException], str]
    ) -> None:
        # Not VLLMClient.__init__: see the module docstring.
        self.point = point
        self.base_url = point.url
        self.model = model
        self.on_failure = on_failure
        self.session = requests.Session()
        self.session.headers.update(point.headers())
        retry = Retry(
            total=RETRIES,
            connect=RETRIES,
            read=RETRIES,
            status=RETRIES,
            status_forcelist=[502, 503, 504],
            backoff_factor=BACKOFF,
            allowed_methods=["POST", "GET"],  # scoring is idempotent
            raise_on_status=False,
        )
        self.session.mount("http://", HTTPAdapter(max_retries=retry))
        self.session.mount("https://", HTTPAdapter(max_retries=retry))

    def _request(self, method: str, url: str, **kwargs: Any) -> dict:
        died = self.point.death()
        if died:  # --teacher-serve's server is gone: no point retrying
            raise TeacherServerError(self.on_failure(RuntimeError(died)))
        try:
            response = self.session.request(method, url, timeout=REQUEST_TIMEOUT, **kwargs)
        except requests.RequestException as exc:
            raise TeacherServerError(self.on_failure(exc)) from exc
        if response.status_code != 200:
            failure = RuntimeError(
                f"{method} {url} answered {response.status_code}: {response.text}"
            )
            raise TeacherServerError(self.on_failure(failure))
        return response.json()

    def _get(self, url: str, **kwargs: Any) -> dict:
        return self._request("GET", url, **kwargs)

    def _post(self, url: str, **kwargs: Any) -> dict:
        return self._request("POST", url, **kwargs)


def actual_logprobs(
    client: TeacherClient, sequences: list[list[int]], prompt_lengths: list[int], temperature: float
) -> list[list[float]]:
    """The teacher's log-probability of each completion token (after `prompt_lengths`)."""
    result = client.get_sequence_logprobs(
        sequences=sequences, prompt_lengths=prompt_lengths, top_logprobs=1, temperature=temperature
    )
    return [[values[0] for values in row] for row in result["actual_logprobs"]]
