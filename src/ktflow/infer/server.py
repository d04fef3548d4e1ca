"""Inference servers ktflow launches itself: start, wait for health, watch, always stop.

One ``ManagedServer`` subclass per server backend (in ``ktflow.infer.backends``);
``ManagedBackend`` pairs a server with the OpenAI client and restarts the server, up to a
configured count, when it dies mid-run. Servers listen on 127.0.0.1 only and run in ktflow's
process group, so a Ctrl-C or a scheduler's group kill reaches them too; ktflow also ends the
whole process tree itself on any exit, and on Linux the server gets SIGTERM if ktflow is killed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shlex
import socket
import subprocess
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from ktflow.errors import KtflowInputError
from ktflow.infer.base import InferenceBackend, InferenceError, Request, Sampling, ServerDied
from ktflow.infer.client import OpenAIClient, client_options
from ktflow.lifetime import tied_to_parent

if TYPE_CHECKING:  # loaded when a server runs, not when the backend registry is imported
    import psutil

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
# The inference settings every managed server reads (all operational: they never change a prediction).
MANAGED_KEYS = frozenset({"python", "server", "startup_timeout_s", "restarts"})
STOP_GRACE_S = 20.0
_FLAG = re.compile(r"^[a-z][a-z0-9_]*$")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        return int(probe.getsockname()[1])


def flag_args(flags: dict[str, Any], dashes: bool = True, field: str = "inference.server") -> list[str]:
    """``{"tp_size": 4, "enable_x": True}`` -> ``--tp-size 4 --enable-x`` (SGLang's argparse style:
    True is a bare flag, False/None leave it out); ``dashes=False`` gives HfArgumentParser's
    ``--tp_size 4 --enable_x true``."""
    args: list[str] = []
    for key, value in flags.items():
        if not _FLAG.match(key):
            raise KtflowInputError("config", f"{field}.{key}", "flag names are lower_snake_case, without --")
        flag = "--" + (key.replace("_", "-") if dashes else key)
        if value is None or (dashes and value is False):
            continue
        if dashes and value is True:
            args.append(flag)
        elif isinstance(value, list):
            args += [flag, *map(str, value)]
        else:
            args += [flag, str(value).lower() if isinstance(value, bool) else str(value)]
    return args


def process_tree(pid: int) -> list[psutil.Process]:
    import psutil

    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def stop_tree(
    process: subprocess.Popen[bytes], known: list[psutil.Process], grace_s: float = STOP_GRACE_S
) -> None:
    """SIGTERM the server and every process it started, SIGKILL what outlives the grace period.

    ``known`` is the tree seen while the server was up: if the server itself died, its
    workers (SGLang's scheduler and detokenizer, holding GPU memory) are no longer its
    children, but are still found (psutil checks create times, so a reused pid is skipped).
    """
    import psutil

    tree = {proc.pid: proc for proc in [*known, *process_tree(process.pid)] if proc.is_running()}
    for proc in tree.values():
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.terminate()
    _, alive = psutil.wait_procs(list(tree.values()), timeout=grace_s)
    for proc in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(alive, timeout=5)
    process.poll()


class ManagedServer(ABC):
    """One server process: ``start()`` returns the ``/v1`` base URL once it is healthy."""

    name: str
    health_path = "v1/models"
    reserved: tuple[str, ...] = ()

    def __init__(
        self,
        model_dir: Path,
        spec: dict[str, Any],
        adapter: tuple[str, Path] | None = None,
        log_path: Path | None = None,
    ) -> None:
        self.model_dir = Path(model_dir).resolve()
        self.spec = spec
        self.adapter = adapter
        self.log_path = log_path
        self.python = str(spec.get("python") or sys.executable)
        self.flags: dict[str, Any] = dict(spec.get("server") or {})
        for key in self.reserved:
            if key in self.flags:
                raise KtflowInputError("config", f"inference.server.{key}", "ktflow sets this itself")
        self.served_name = self.model_dir.name.replace(":", "_")
        self.process: subprocess.Popen[bytes] | None = None
        self.port: int | None = None
        self.command_line: list[str] = []
        self.startups: list[float] = []
        self.tree: list[psutil.Process] = []

    @abstractmethod
    def command(self, port: int) -> list[str]:
        """The server's argv."""

    def environment(self, port: int) -> dict[str, str]:
        return dict(os.environ)

    def model_names(self) -> dict[str | None, str]:
        """Request ``model`` field per adapter name (None = the base model)."""
        return {None: self.served_name}

    def preflight(self) -> None:
        """Fail before a long start-up when the server cannot run here."""

    def start(self) -> str:
        self.port = free_port()
        self.command_line = self.command(self.port)
        log.info("starting the %s server: %s", self.name, shlex.join(self.command_line))
        output: IO[bytes] | None = open(self.log_path, "ab") if self.log_path else None  # noqa: SIM115
        try:
            self.process = subprocess.Popen(
                tied_to_parent(self.command_line),  # told to stop even if ktflow is SIGKILLed
                env=self.environment(self.port),
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT if output else None,
            )
        finally:
            if output is not None:
                output.close()  # the child holds its own descriptor
        log.info("%s server pid %d on port %d", self.name, self.process.pid, self.port)
        self._wait_ready(float(self.spec.get("startup_timeout_s", 1800)))
        return f"http://{HOST}:{self.port}/v1"

    def _wait_ready(self, timeout_s: float) -> None:
        started = time.monotonic()
        import httpx

        url = f"http://{HOST}:{self.port}/{self.health_path}"
        with httpx.Client(timeout=5.0, trust_env=False) as http:
            while True:
                self.check_alive()
                try:
                    if http.get(url).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() - started > timeout_s:
                    raise InferenceError(f"the {self.name} server was not healthy within {timeout_s:.0f}s")
                time.sleep(0.5)
        self.startups.append(round(time.monotonic() - started, 3))
        self.tree = process_tree(self.process.pid) if self.process is not None else []
        log.info("%s server ready after %.1fs", self.name, self.startups[-1])

    def check_alive(self) -> None:
        if self.process is None:
            raise ServerDied(f"the {self.name} server is not running")
        code = self.process.poll()
        if code is not None:
            raise ServerDied(
                f"the {self.name} server (pid {self.process.pid}) exited with code {code}{self._tail()}"
            )

    def _tail(self, chars: int = 3000) -> str:
        if self.log_path is None or not self.log_path.is_file():
            return " (its output is in this log above)"
        with open(self.log_path, "rb") as handle:
            handle.seek(max(0, self.log_path.stat().st_size - chars))
            return f"; last output ({self.log_path}):\n" + handle.read().decode("utf-8", "replace")

    def stop(self) -> None:
        if self.process is not None and self.process.returncode is None:
            log.info("stopping the %s server (pid %d)", self.name, self.process.pid)
        if self.process is not None:
            stop_tree(self.process, self.tree)


class ManagedBackend(InferenceBackend):
    """A launched server plus the OpenAI client; restarts a dead server up to ``restarts`` times,
    sending only the requests that have no completion yet."""

    def __init__(self, server: ManagedServer, sampling: Sampling, client_options: dict[str, Any],
                 restarts: int = 0) -> None:  # fmt: skip
        self.name = server.name
        self.server = server
        self.restarts_left = restarts
        self.restarts = 0
        server.preflight()
        try:
            base_url = server.start()
            self.client = OpenAIClient(
                base_url, sampling, server.model_names(), alive=server.check_alive, **client_options
            )
        except BaseException:
            server.stop()
            raise

    def generate(self, requests: list[Request]) -> Iterator[tuple[Request, str]]:
        pending = {request.id: request for request in requests}
        while True:
            try:
                for request, text in self.client.generate(list(pending.values())):
                    del pending[request.id]
                    self.generated_tokens = self.client.generated_tokens
                    yield request, text
                return
            except ServerDied as died:
                if self.restarts_left <= 0:
                    raise
                self.restarts_left -= 1
                self.restarts += 1
                log.warning("%s; restart %d, %d requests to go", died, self.restarts, len(pending))
                self.server.stop()
                self.client.base_url = self.server.start()

    def facts(self) -> dict[str, Any]:
        return {
            **self.client.facts(),
            "server": self.server.name,
            "server_command": shlex.join(self.server.command_line),
            "server_startup_s": self.server.startups,
            "restarts": self.restarts,
        }

    def close(self) -> None:
        # The server first: requests still in flight then fail at once instead of holding the client.
        try:
            self.server.stop()
        finally:
            self.client.close()


def managed_backend(server: ManagedServer, spec: dict[str, Any], sampling: Sampling) -> ManagedBackend:
    """Start ``server`` (stopped again on any failure) and talk to it through the OpenAI client."""
    return ManagedBackend(server, sampling, client_options(spec, sampling), restarts=spec.get("restarts", 0))
