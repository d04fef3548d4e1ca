"""Plots, and `snakemake --report` built offline from one real run of a small pipeline."""

from __future__ import annotations

import base64
import json
import re
import struct
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import BIN, REPO, ktflow_env, run_ktflow
from test_datasets import afrimed_quiz, write_afrimed_csv

from ktflow.errors import KtflowInputError
from ktflow.plots import read_loss

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
REPORT_TARGETS = ["all", "results/report/tables.html", "results/plots/loss.png", "results/plots/metrics.png"]
# Any attempt to reach the network fails fast: proxies point at a closed local port.
OFFLINE = {"HF_HUB_OFFLINE": "1", "http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9"}


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, path
    width, height = struct.unpack(">II", data[16:24])  # the IHDR chunk comes first
    return width, height


def write_trainer_log(path: Path, losses: list[float]) -> Path:
    lines = [json.dumps({"current_steps": 10 * (i + 1), "total_steps": 100, "loss": loss, "lr": 1e-4})
             for i, loss in enumerate(losses)]  # fmt: skip
    lines.insert(1, json.dumps({"current_steps": 10, "eval_loss": 9.9}))  # eval lines carry no "loss"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n\n")
    return path


def test_read_loss_keeps_training_lines_and_names_a_bad_one(tmp_path: Path) -> None:
    log = write_trainer_log(tmp_path / "trainer_log.jsonl", [2.5, 1.5, 1.0])
    assert read_loss(log) == ([10.0, 20.0, 30.0], [2.5, 1.5, 1.0])
    log.write_text(log.read_text() + '{"current_steps": 40, "loss": \n')
    with pytest.raises(KtflowInputError, match="invalid JSON") as caught:
        read_loss(log)
    assert caught.value.field == "line 6"


def test_plots_cli_draws_one_panel_per_task(tmp_path: Path) -> None:
    entries = []
    for task, kind_metrics in (("style", {"bleu-1": 20.0}), ("quiz", {"accuracy": 0.4})):
        for variant in ("base", "lora"):
            metrics = {
                k: 1.0 for k in ("bleu-1", "bleu-2", "bleu-3", "bleu-4", "rouge-1", "rouge-2", "rouge-l")
            }
            path = tmp_path / "metrics" / task / f"{variant}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({**metrics, **kind_metrics}))
            entries.append(f"m:{task}:{variant}={path}")
    write_trainer_log(tmp_path / "lora/style/adapter/trainer_log.jsonl", [3.0, 2.0, 1.2, 0.9])
    spec = {"models": {"m": "Model"}, "tasks": {"style": "generation", "quiz": "mcq"}, "paper": {}}
    common = ["--spec", json.dumps(spec), "--train-logs", f"m:style={tmp_path}/lora/style/adapter",
              f"m:quiz={tmp_path}/lora/quiz/adapter"]  # fmt: skip
    two = tmp_path / "two"
    result = run_ktflow("plots", "--loss", f"{two}/loss.png", "--metrics", f"{two}/metrics.png", *common,
                        "--entries", *entries)  # fmt: skip
    assert "quiz/adapter: no trainer_log.jsonl" in result.stderr  # a missing log costs its curve only
    one = tmp_path / "one"
    run_ktflow("plots", "--loss", f"{one}/loss.png", "--metrics", f"{one}/metrics.png", *common,
               "--entries", *entries[:2])  # fmt: skip
    assert png_size(two / "loss.png")[0] > 0
    assert png_size(two / "metrics.png")[1] > png_size(one / "metrics.png")[1]
    provenance = json.loads((two / "provenance.json").read_text())
    assert provenance["extra"]["curves"] == ["Model / style"]


# ---- the report, built from one real run ------------------------------------------------


def snakemake(workdir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    command = [
        str(BIN / "snakemake"),
        "-s",
        str(REPO / "Snakefile"),
        "--configfile",
        "config.yaml",
        "--cores",
        "2",
    ]
    result = subprocess.run(
        [*command, *args], cwd=workdir, capture_output=True, text=True, env=ktflow_env(**OFFLINE), check=False
    )
    if result.returncode != 0:
        raise AssertionError(
            f"snakemake {' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
        )
    return result


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A small default-style run (tiny model, one tiny task, one raw AfriMed-QA MCQ task)."""
    workdir = tmp_path_factory.mktemp("report")
    write_afrimed_csv(workdir / "afrimed.csv", afrimed_quiz(16, 4))
    config = yaml.safe_load((REPO / "config/config.yaml").read_text())
    config["tasks"] = {
        "style": {"kind": "generation", "source": "tiny", "tiny": {"n_train": 32, "n_test": 4}},
        "afri": {
            "kind": "mcq", "source": "raw", "raw_file": "afrimed.csv", "adapter": "afrimed-qa-mcq",
            "split": {"method": "column"}, "inference": {"max_new_tokens": 4},
        },
    }  # fmt: skip
    config["experiments"]["tasks"] = ["style", "afri"]
    config["training"].update(epochs=1, logging_steps=1)
    config["inference"]["max_new_tokens"] = 12
    config["tables"] = {"paper": {"tiny-v3": {"afri": {"lora": {"accuracy": 0.5}}}}}
    (workdir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    snakemake(workdir, *REPORT_TARGETS)
    snakemake(workdir, "--report", "report.html", *REPORT_TARGETS)
    return workdir, (workdir / "report.html").read_text()


def embedded(html: str, mime: str) -> list[bytes]:
    """Files the report embeds as data URIs (they carry charset / filename parameters)."""
    found = re.findall(rf"data:{mime}(?:;[^;,]+)*;base64,([A-Za-z0-9+/=]+)", html)
    return [base64.b64decode(data) for data in found]


@pytest.mark.slow
def test_report_embeds_the_tables_page(report: tuple[Path, str]) -> None:
    _, html = report
    (page,) = [p.decode() for p in embedded(html, "text/html")]
    assert page.index("<h2>style") < page.index("<h2>afri")
    for text in ("BLEU-1", "ROUGE-L", "Accuracy", "Tiny-DeepSeek-V3 + LoRA (paper)", "Δ Accuracy"):
        assert text in page
    assert "published numbers from the config" in html  # the tables caption


@pytest.mark.slow
def test_report_embeds_both_plots(report: tuple[Path, str]) -> None:
    workdir, html = report
    images = embedded(html, "image/png")
    assert len(images) == 2
    assert all(image.startswith(PNG_SIGNATURE) for image in images)
    assert (workdir / "results/plots/loss.png").read_bytes() in images
    assert "trainer_log.jsonl" in html  # the loss caption


@pytest.mark.slow
def test_report_shows_the_config_and_runtimes(report: tuple[Path, str]) -> None:
    _, html = report
    description = html[html.index("var workflow_desc") :]
    description = description[: description.index("</script>")]
    assert "Configuration" in description
    assert "&quot;afrimed.csv&quot;" in description  # the effective (merged) config, rendered
    runtimes = html[html.index("var runtimes_spec") :]
    runtimes = json.loads(runtimes[runtimes.index("{") : runtimes.index("</script>")].strip().rstrip(";"))
    rules = {row["rule"] for row in runtimes["data"]["values"]}
    assert {"prepare_task", "train", "infer", "evaluate", "plots", "tables_html"} <= rules


@pytest.mark.slow
def test_report_is_self_contained(report: tuple[Path, str]) -> None:
    _, html = report
    assert not re.search(r"<(script|img|iframe)[^>]+src=[\"']?https?:", html)
    assert not re.search(r"<link[^>]+href=[\"']?https?:", html)
