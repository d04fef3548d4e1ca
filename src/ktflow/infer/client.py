"""Client for any OpenAI-compatible chat server: bounded concurrency, timeouts and retries.

Plain httpx (already a dependency through LLaMA-Factory) rather than the ``openai``
package: ktflow needs only ``/models`` and ``/chat/completions``, and owning the retry
loop lets it ask a managed server whether it is still alive before each retry.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from ktflow.errors import KtflowInputError
from ktflow.infer.base import InferenceBackend, InferenceError, Request, Sampling

if TYPE_CHECKING:  # httpx (and the rich it imports) loads only when a client is made: the
    # backend registry is imported when the Snakefile is parsed, on every job of a cluster run.
    import httpx

log = logging.getLogger(__name__)

# Worth another try: the server is busy, restarting or briefly unreachable.
RETRY_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})
MAX_BACKOFF_S = 30.0
Outcome = tuple[Request, str | None, Exception | None]
# The inference settings the client reads (all operational: they never change a prediction).
CLIENT_KEYS = frozenset({"concurrency", "request_timeout_s", "retries", "api_key_env"})


class Cancelled(InferenceError):
    """Another request already failed the run; this one stopped early."""


def client_options(spec: dict[str, Any], sampling: Sampling) -> dict[str, Any]:
    """OpenAIClient's keyword arguments from the config's inference block."""
    return {
        "concurrency": spec.get("concurrency", sampling.batch_size),
        "timeout_s": float(spec.get("request_timeout_s", 600)),
        "retries": spec.get("retries", 3),
        "api_key": os.environ.get(spec["api_key_env"]) if spec.get("api_key_env") else None,
    }


def check_base_url(base_url: str, field: str = "inference.base_url") -> str:
    parts = urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise KtflowInputError(
            "config", field, f"{base_url!r} is not an http(s) URL like http://host:port/v1"
        )
    return base_url.rstrip("/") + "/"


class OpenAIClient(InferenceBackend):
    """Sends each request to ``/chat/completions``; ``model_names`` maps an adapter name to the
    request's ``model`` field (None -> the base model), so the server applies the adapter."""

    name = "openai"

    def __init__(
        self,
        base_url: str,
        sampling: Sampling,
        model_names: dict[str | None, str] | None = None,
        concurrency: int = 8,
        timeout_s: float = 600.0,
        retries: int = 3,
        backoff_s: float = 1.0,
        api_key: str | None = None,
        alive: Callable[[], None] | None = None,
    ) -> None:
        self.sampling = sampling
        self.concurrency = concurrency
        self.retries = retries
        self.backoff_s = backoff_s
        self.alive = alive
        self.generated_tokens = 0
        self.retried = 0
        self._workers: list[threading.Thread] = []
        self._lock = threading.Lock()
        import httpx

        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http: httpx.Client = httpx.Client(
            base_url=check_base_url(base_url),
            timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, 10.0)),
            limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency),
            headers=headers,
            trust_env=False,  # a proxy from the environment must never sit between us and loopback
        )
        self.model_names = dict(model_names or {})
        if None not in self.model_names:
            self.model_names[None] = self.served_models()[0]

    @property
    def base_url(self) -> str:
        return str(self.http.base_url)

    @base_url.setter
    def base_url(self, value: str) -> None:
        self.http.base_url = check_base_url(value)

    def served_models(self) -> list[str]:
        response = self._send("GET", "models", None, threading.Event())
        names = [card["id"] for card in response.get("data", []) if isinstance(card, dict) and "id" in card]
        if not names:
            raise InferenceError(f"{self.base_url}models lists no model")
        return names

    def body(self, request: Request) -> dict[str, Any]:
        sampling = self.sampling
        if request.adapter not in self.model_names:
            raise KtflowInputError(
                "config", "inference.adapter_model", f"no served name for {request.adapter}"
            )
        body: dict[str, Any] = {
            "model": self.model_names[request.adapter],
            "messages": request.messages,
            "max_tokens": sampling.max_new_tokens,
            "seed": sampling.seed,
            "stream": False,
            # temperature 0 is greedy for SGLang, vLLM and LLaMA-Factory's api alike.
            "temperature": sampling.temperature if sampling.do_sample else 0.0,
        }
        if sampling.do_sample:
            body["top_p"] = sampling.top_p
        body.update(sampling.extra)
        return body

    def complete(self, request: Request, stop: threading.Event) -> str:
        reply = self._send("POST", "chat/completions", self.body(request), stop)
        try:
            choice = reply["choices"][0]
            text = choice["message"]["content"] or ""
        except (KeyError, IndexError, TypeError) as error:
            raise InferenceError(
                f"request {request.id}: reply has no choices[0].message: {reply!r:.300}"
            ) from error
        usage = reply.get("usage") or {}
        with self._lock:
            self.generated_tokens += int(usage.get("completion_tokens") or 0)
        return str(text).strip()

    def _send(self, method: str, path: str, body: dict[str, Any] | None, stop: threading.Event) -> Any:
        """One call with bounded retries and exponential backoff on transport errors and 5xx/429."""
        import httpx

        for attempt in range(self.retries + 1):
            if stop.is_set():
                raise Cancelled("stopped: another request failed")
            try:
                response = self.http.request(method, path, json=body)
            except httpx.TransportError as error:
                problem: str = f"{type(error).__name__}: {error}"
            else:
                if response.status_code < 400:
                    try:
                        return response.json()
                    except ValueError as error:
                        raise InferenceError(
                            f"{method} {path}: reply is not JSON: {response.text:.300}"
                        ) from error
                problem = f"HTTP {response.status_code}: {response.text:.300}"
                if response.status_code not in RETRY_STATUS:
                    raise InferenceError(f"{method} {self.base_url}{path}: {problem}")
            if self.alive is not None:
                self.alive()  # a dead managed server raises ServerDied here instead of being retried
            if attempt == self.retries:
                break
            delay = min(self.backoff_s * 2**attempt, MAX_BACKOFF_S)
            log.warning("%s %s failed (%s); retry %d/%d in %.1fs", method, path, problem, attempt + 1,
                        self.retries, delay)  # fmt: skip
            with self._lock:
                self.retried += 1
            stop.wait(delay)
        raise InferenceError(
            f"{method} {self.base_url}{path}: gave up after {self.retries} retries: {problem}"
        )

    def _work(self, todo: queue.SimpleQueue[Request | None], done: queue.SimpleQueue[Outcome],
              stop: threading.Event) -> None:  # fmt: skip
        while (request := todo.get()) is not None:
            if stop.is_set():
                done.put((request, None, Cancelled("stopped: another request failed")))
                continue
            try:
                done.put((request, self.complete(request, stop), None))
            except Exception as error:
                done.put((request, None, error))

    def generate(self, requests: list[Request]) -> Iterator[tuple[Request, str]]:
        """Up to ``concurrency`` requests in flight; the first failure stops the rest, and every
        request that finished before it, or was already in flight, is still yielded.

        Daemon threads rather than a ThreadPoolExecutor: on Ctrl-C the process must not wait
        (at exit) for requests still in flight on a server that is being stopped.
        """
        stop = threading.Event()
        todo: queue.SimpleQueue[Request | None] = queue.SimpleQueue()
        done: queue.SimpleQueue[Outcome] = queue.SimpleQueue()
        for request in requests:
            todo.put(request)
        count = min(self.concurrency, len(requests))
        for _ in range(count):
            todo.put(None)
        self._workers = [
            threading.Thread(
                target=self._work, args=(todo, done, stop), daemon=True, name=f"ktflow-infer-{n}"
            )
            for n in range(count)
        ]
        for worker in self._workers:
            worker.start()
        error: Exception | None = None
        try:
            for _ in requests:
                request, text, failure = done.get()
                if failure is None and text is not None:
                    yield request, text
                elif error is None and not isinstance(failure, Cancelled):
                    error = failure
                    stop.set()
        finally:
            stop.set()
        if error is not None:
            raise error

    def facts(self) -> dict[str, Any]:
        names = {str(key) if key else "base": value for key, value in self.model_names.items()}
        return {"base_url": self.base_url, "models": names, "retries_used": self.retried}

    def close(self) -> None:
        # A socket closed under a thread still reading it can leave that thread waiting on a
        # reused descriptor; workers left behind by Ctrl-C end with the process instead.
        if not any(worker.is_alive() for worker in self._workers):
            self.http.close()
