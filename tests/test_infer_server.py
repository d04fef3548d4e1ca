"""Inference through real servers on loopback.

The ``openai`` backend runs against LLaMA-Factory's own OpenAI-style api serving the tiny
model and an adapter, and must reproduce the in-process ``hf`` backend's greedy
predictions. Servers are killed mid-run to check that completed rows survive in
``.partial`` and that a rerun (or a managed restart) finishes the job, and that a
cancelled job leaves no server behind. SGLang itself needs a GPU host (marked gpu).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import httpx
import psutil
import pytest
from conftest import ktflow_env, run_ktflow

from ktflow.errors import KtflowInputError
from ktflow.infer.base import InferenceError, Request, Sampling

ROWS = 32
MAX_NEW = 24
HF_SPEC = {"backend": "hf", "dtype": "bfloat16", "max_new_tokens": MAX_NEW, "batch_size": 8, "seed": 42}
DEADLINE_S = 180.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_until(condition: Any, what: str, timeout_s: float = DEADLINE_S) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")


def read_rows(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def start_api(model: Path, adapter: Path, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    """``llamafactory-cli api`` (through ktflow.lf_launch) on a free loopback port, in its own group."""
    port = free_port()
    env = ktflow_env(API_HOST="127.0.0.1", API_PORT=str(port), API_MODEL_NAME="tiny-lora", API_VERBOSE="0")
    argv = [sys.executable, "-m", "ktflow.lf_launch", "api", "--model_name_or_path", str(model),
            "--adapter_name_or_path", str(adapter), "--infer_backend", "huggingface"]  # fmt: skip
    with open(log, "ab") as output:
        server = subprocess.Popen(
            argv, env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}/v1"

    def ready() -> bool:
        if server.poll() is not None:
            raise AssertionError(f"api exited ({server.returncode}):\n{log.read_text()[-3000:]}")
        try:
            return httpx.get(f"{url}/models", timeout=2, trust_env=False).status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_until(ready, "the LLaMA-Factory api")
    except BaseException:
        kill_group(server)
        raise
    return server, url


def kill_group(server: subprocess.Popen[bytes]) -> None:
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGKILL)
    server.wait(timeout=30)


class Job:
    """A ``ktflow infer`` run in the background, its stderr collected line by line."""

    def __init__(self, *args: str) -> None:
        self.lines: list[str] = []
        self.process = subprocess.Popen(
            [sys.executable, "-m", "ktflow", "infer", *args],
            env=ktflow_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.append(line)

    def wait_for(self, condition: Any, what: str, timeout_s: float = DEADLINE_S) -> Any:
        """Like wait_until, but a job that ends first fails at once with its stderr."""

        def met() -> Any:
            value = condition()
            if not value and self.process.poll() is not None:
                raise AssertionError(f"ktflow infer exited ({self.process.returncode}) before {what}:\n"
                                     f"{self.stderr[-4000:]}")  # fmt: skip
            return value

        return wait_until(met, what, timeout_s)

    def server_pids(self) -> list[int]:
        return [int(m.group(1)) for line in self.lines if (m := re.search(r"server pid (\d+)", line))]

    def finish(self, timeout_s: float = DEADLINE_S) -> int:
        code = self.process.wait(timeout=timeout_s)
        self._reader.join(timeout=10)
        return code

    @property
    def stderr(self) -> str:
        return "".join(self.lines)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)


def make_adapter(model_dir: Path, out: Path) -> Path:
    """A seeded LoRA adapter with non-zero B matrices, so it visibly changes what the model says."""
    import peft
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    config = peft.LoraConfig(r=8, lora_alpha=8, target_modules=["q_b_proj", "kv_b_proj", "o_proj"],
                             init_lora_weights=False)  # fmt: skip
    peft.get_peft_model(model, config).save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def adapter(tiny_bf16: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_adapter(tiny_bf16, tmp_path_factory.mktemp("lora") / "adapter")


@pytest.fixture(scope="module")
def test_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from ktflow.tiny.tasks import write_task

    root = tmp_path_factory.mktemp("prompts")
    write_task("style", root, seed=11, n_train=1, n_test=ROWS)
    return root / "test.json"


@pytest.fixture(scope="module")
def hf_predictions(tiny_bf16: Path, adapter: Path, test_file: Path, tmp_path_factory: pytest.TempPathFactory
                   ) -> dict[str, str]:  # fmt: skip
    out = tmp_path_factory.mktemp("hf") / "lora.jsonl"
    run_ktflow("infer", str(tiny_bf16), str(test_file), str(out), "--adapter", str(adapter),
               "--spec", json.dumps(HF_SPEC))  # fmt: skip
    return {row["id"]: row["predict"] for row in read_rows(out)}


@pytest.fixture(scope="module")
def api(tiny_bf16: Path, adapter: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server, url = start_api(tiny_bf16, adapter, tmp_path_factory.mktemp("api") / "api.log")
    try:
        yield url
    finally:
        kill_group(server)


def openai_spec(url: str, **extra: Any) -> str:
    spec = {"backend": "openai", "base_url": url, "max_new_tokens": MAX_NEW, "seed": 42, "concurrency": 4,
            "retries": 2, "request_timeout_s": 60, **extra}  # fmt: skip
    return json.dumps(spec)


def test_openai_backend_reproduces_hf_predictions(
    api: str, tiny_bf16: Path, adapter: Path, test_file: Path, hf_predictions: dict[str, str], tmp_path: Path
) -> None:
    out = tmp_path / "lora.jsonl"
    run_ktflow("infer", str(tiny_bf16), str(test_file), str(out), "--adapter", str(adapter),
               "--spec", openai_spec(api))  # fmt: skip
    served = {row["id"]: row["predict"] for row in read_rows(out)}
    assert len(served) == ROWS
    # Both greedy over the same merged BF16 weights and the tokenizer's chat template.
    assert served == hf_predictions
    assert len(set(served.values())) > 1
    extra = json.loads(out.with_suffix(".provenance.json").read_text())["extra"]
    assert extra["requests_per_s"] > 0 and extra["tokens_per_s"] > 0 and extra["generated_tokens"] > 0
    assert extra["backend"]["models"] == {"base": "tiny-lora", "lora": "tiny-lora:lora"}


def test_killed_server_fails_the_step_keeping_rows_and_a_rerun_completes(
    api: str, tiny_bf16: Path, adapter: Path, test_file: Path, hf_predictions: dict[str, str], tmp_path: Path
) -> None:
    doomed, url = start_api(tiny_bf16, adapter, tmp_path / "doomed.log")
    out = tmp_path / "lora.jsonl"
    partial = out.with_name(out.name + ".partial")
    args = [str(tiny_bf16), str(test_file), str(out), "--adapter", str(adapter)]
    job = Job(*args, "--spec", openai_spec(url, concurrency=1, retries=1))
    try:
        job.wait_for(lambda: len(read_rows(partial)) >= 3, "three rows")
        kill_group(doomed)
        assert job.finish() == 1, job.stderr
    finally:
        job.kill()
        kill_group(doomed)
    kept = read_rows(partial)
    assert 3 <= len(kept) < ROWS and not out.exists()
    assert f"{len(kept)} of {ROWS} rows are kept" in job.stderr
    assert all(row["predict"] == hf_predictions[row["id"]] for row in kept)

    run_ktflow("infer", *args, "--spec", openai_spec(api))
    assert {row["id"]: row["predict"] for row in read_rows(out)} == hf_predictions
    assert not partial.exists()
    extra = json.loads(out.with_suffix(".provenance.json").read_text())["extra"]
    assert extra["resumed_rows"] == len(kept)


def managed_spec(**extra: Any) -> str:
    spec = {"backend": "llamafactory", "dtype": "bfloat16", "max_new_tokens": MAX_NEW, "seed": 42,
            "concurrency": 1, "retries": 2, "startup_timeout_s": DEADLINE_S, **extra}  # fmt: skip
    return json.dumps(spec)


def gone(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True


@pytest.mark.slow
def test_managed_server_is_restarted_once_then_the_step_fails_keeping_rows(
    tiny_bf16: Path, adapter: Path, test_file: Path, hf_predictions: dict[str, str], tmp_path: Path
) -> None:
    out = tmp_path / "lora.jsonl"
    partial = out.with_name(out.name + ".partial")
    job = Job(str(tiny_bf16), str(test_file), str(out), "--adapter", str(adapter),
              "--server-log", str(tmp_path / "server.log"), "--spec", managed_spec(restarts=1))  # fmt: skip
    try:
        first = job.wait_for(lambda: job.server_pids()[:1], "the managed server")[0]
        job.wait_for(lambda: len(read_rows(partial)) >= 3, "three rows")
        os.kill(first, signal.SIGKILL)
        second = job.wait_for(lambda: job.server_pids()[1:2], "the restarted server")[0]
        before = len(read_rows(partial))
        job.wait_for(lambda: len(read_rows(partial)) >= before + 2, "rows from the restarted server")
        os.kill(second, signal.SIGKILL)
        assert job.finish() == 1, job.stderr
    finally:
        job.kill()
    kept = read_rows(partial)
    assert before + 2 <= len(kept) < ROWS
    assert all(row["predict"] == hf_predictions[row["id"]] for row in kept)
    assert "restart 1" in job.stderr and "exited with code -9" in job.stderr
    assert len(job.server_pids()) == 2


@pytest.mark.slow
@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_cancelled_or_killed_job_leaves_no_server(
    how: signal.Signals, tiny_bf16: Path, adapter: Path, test_file: Path, tmp_path: Path
) -> None:
    """SIGTERM (a scheduler cancelling the job) unwinds and stops the server; after SIGKILL,
    which ktflow cannot handle, the kernel's parent-death signal still stops it."""
    out = tmp_path / "lora.jsonl"
    job = Job(str(tiny_bf16), str(test_file), str(out), "--adapter", str(adapter), "--spec", managed_spec())
    try:
        server = job.wait_for(lambda: job.server_pids()[:1], "the managed server")[0]
        job.wait_for(lambda: read_rows(out.with_name(out.name + ".partial")), "a row")
        job.process.send_signal(how)
        assert job.finish(timeout_s=60) != 0
    finally:
        job.kill()
    wait_until(lambda: gone(server), "the server to exit", timeout_s=10)
    assert read_rows(out.with_name(out.name + ".partial")) and not out.exists()


class FlakyServer(BaseHTTPRequestHandler):
    """Answers 503 to the first ``failures`` completions, then a valid reply; 400 to model "bad"."""

    failures = 2
    seen: ClassVar[list[str]] = []

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        reply: dict[str, Any]
        self.seen.append(body["model"])
        if body["model"] == "bad":
            status, reply = 400, {"error": "no such adapter"}
        elif len(self.seen) <= self.failures:
            status, reply = 503, {"error": "busy"}
        else:
            content = " ".join(m["content"] for m in body["messages"])[::-1]
            status, reply = 200, {"choices": [{"message": {"content": f" {content} "}}],
                                  "usage": {"completion_tokens": 3}}  # fmt: skip
        data = json.dumps(reply).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_client_retries_busy_replies_and_fails_fast_on_client_errors() -> None:
    from ktflow.infer.client import OpenAIClient

    FlakyServer.seen.clear()
    server = ThreadingHTTPServer(("127.0.0.1", 0), FlakyServer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/v1"
        client = OpenAIClient(
            url, Sampling(), {None: "base", "style": "base:style"}, retries=3, backoff_s=0.01
        )
        request = Request(id="1", messages=[{"role": "user", "content": "abc"}], label="", adapter="style")
        assert list(client.generate([request])) == [(request, "cba")]
        assert client.retried == 2 and client.generated_tokens == 3
        assert FlakyServer.seen == ["base:style"] * 3  # the adapter is picked per request
        client.model_names["other"] = "bad"
        started = time.monotonic()
        with pytest.raises(InferenceError, match="HTTP 400"):
            list(client.generate([Request(id="2", messages=request.messages, label="", adapter="other")]))
        assert client.retried == 2 and time.monotonic() - started < 5
        client.close()
    finally:
        server.shutdown()


def test_sglang_launch_line_carries_adapter_kt_and_config_flags(tmp_path: Path) -> None:
    from ktflow.infer.backends.sglang import SGLangServer, kt_server_args

    int8 = tmp_path / "int8"
    int8.mkdir()
    kt = ["--kt-weight-path", str(int8), "--kt-method", "AMXINT8", "--kt-threadpool-count", "2"]
    (int8 / "ktflow_int8.json").write_text(json.dumps({"sglang_args": kt}))
    spec = {"dtype": "bfloat16", "seed": 7, "batch_size": 4, "python": "/opt/sglang/bin/python",
            "server": {"tensor_parallel_size": 4, "attention_backend": "triton", "disable_cuda_graph": True,
                       "enable_mixed_chunk": False, "kt_cpuinfer": 64}}  # fmt: skip
    server = SGLangServer(
        tmp_path / "bf16", spec, ("style", tmp_path / "sglang"), kt_args=kt_server_args(int8)
    )
    argv = server.command(30123)
    line = " ".join(argv)
    assert argv[:3] == ["/opt/sglang/bin/python", "-m", "sglang.launch_server"]
    assert f"--model-path {tmp_path / 'bf16'} --host 127.0.0.1 --port 30123" in line
    assert f"--enable-lora --lora-paths style={tmp_path / 'sglang'}" in line
    assert " ".join(kt) in line and "--kt-cpuinfer 64" in line
    assert "--tensor-parallel-size 4" in line and "--attention-backend triton" in line
    assert "--disable-cuda-graph" in argv and "--enable-mixed-chunk" not in line
    assert "--max-running-requests 4" in line and "--random-seed 7" in line and "--dtype bfloat16" in line
    assert server.model_names() == {None: "bf16", "style": "bf16:style"}

    with pytest.raises(KtflowInputError) as error:
        SGLangServer(tmp_path / "bf16", {"server": {"port": 1}})
    assert error.value.field == "inference.server.port"
    with pytest.raises(KtflowInputError) as error:
        SGLangServer(tmp_path / "bf16", {"server": {"kt_method": "AMXINT4"}}, kt_args=kt)
    assert error.value.field == "inference.server.kt_method"


def test_bad_inference_settings_are_one_clear_error(tiny_bf16: Path, test_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "p.jsonl"
    cases = [
        ({"backend": "openai"}, "inference.base_url"),
        ({"batch": 4}, "batch"),
        ({"backend": "openai", "base_url": "localhost:8000"}, "inference.base_url"),
    ]
    for spec, field in cases:
        result = run_ktflow("infer", str(tiny_bf16), str(test_file), str(out), "--spec", json.dumps(spec),
                            check=False)  # fmt: skip
        assert result.returncode == 2, result.stderr
        assert field in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not out.exists()


def sglang_ready() -> bool:
    if importlib.util.find_spec("sglang") is None:
        return False
    import torch

    return bool(torch.cuda.is_available())


@pytest.mark.gpu
@pytest.mark.skipif(not sglang_ready(), reason="needs sglang and a CUDA GPU")
def test_sglang_serves_base_and_adapter_and_survives_a_restart(
    tiny_bf16: Path, adapter: Path, test_file: Path, tmp_path: Path
) -> None:
    """KTFLOW_SGLANG_MODEL / KTFLOW_SGLANG_ADAPTER (a PEFT dir) swap in a model SGLang's kernels
    support, should the tiny MLA geometry be refused."""
    model = Path(os.environ.get("KTFLOW_SGLANG_MODEL", tiny_bf16))
    lora = Path(os.environ["KTFLOW_SGLANG_ADAPTER"]) if "KTFLOW_SGLANG_ADAPTER" in os.environ else None
    if lora is None:
        lora = tmp_path / "sglang"
        run_ktflow("convert-lora", str(adapter), str(lora), "--base-model", str(model))
    spec = {"backend": "sglang", "dtype": "bfloat16", "max_new_tokens": 64, "seed": 42, "concurrency": 1,
            "restarts": 1, "retries": 2, "startup_timeout_s": 900, "extra_body": {"ignore_eos": True},
            "server": {"mem_fraction_static": 0.5}}  # fmt: skip
    base = tmp_path / "base.jsonl"
    run_ktflow("infer", str(model), str(test_file), str(base), "--spec", json.dumps(spec))
    out = tmp_path / "lora.jsonl"
    job = Job(str(model), str(test_file), str(out), "--adapter", str(lora), "--adapter-name", "style",
              "--server-log", str(tmp_path / "server.log"), "--spec", json.dumps(spec))  # fmt: skip
    try:
        first = job.wait_for(lambda: job.server_pids()[:1], "the sglang server", timeout_s=900)[0]
        job.wait_for(lambda: len(read_rows(out.with_name(out.name + ".partial"))) >= 2, "two rows", 900)
        os.kill(first, signal.SIGKILL)
        assert job.finish(timeout_s=1800) == 0, job.stderr
    finally:
        job.kill()
    plain = {row["id"]: row["predict"] for row in read_rows(base)}
    tuned = {row["id"]: row["predict"] for row in read_rows(out)}
    assert len(plain) == len(tuned) == ROWS
    assert plain != tuned  # the adapter was applied
    extra = json.loads(out.with_suffix(".provenance.json").read_text())["extra"]
    assert extra["backend"]["restarts"] == 1 and "--lora-paths style=" in extra["backend"]["server_command"]
    assert extra["backend"]["models"]["style"].endswith(":style")
    assert all(gone(pid) for pid in job.server_pids())


def test_workflow_gives_sglang_the_converted_adapter_and_int8_experts() -> None:
    from ktflow.infer.plan import infer_flags, infer_inputs

    config: dict[str, Any] = {
        "results": "out",
        "models": {"v3": {"source": "hf", "cpu_int8": True}, "lite": {"source": "hf"}},
        "tasks": {
            "neko": {"kind": "generation", "inference": {"backend": "sglang"}},
            "style": {"kind": "generation"},
        },
        "inference": {"backend": "hf"},
    }
    assert infer_inputs(config, "v3", "neko", "lora") == {
        "adapter": "out/lora/v3/neko/sglang",
        "int8": "out/models/v3/int8",
    }
    assert infer_flags(config, "v3", "neko", "lora") == [
        "--adapter", "out/lora/v3/neko/sglang", "--adapter-name", "neko", "--int8", "out/models/v3/int8",
    ]  # fmt: skip
    assert infer_inputs(config, "lite", "neko", "base") == {}
    assert infer_inputs(config, "v3", "style", "lora") == {"adapter": "out/lora/v3/style/adapter"}
    assert infer_flags(config, "v3", "style", "base") == []
