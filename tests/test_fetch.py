"""ktflow fetch: local snapshots and the hub path through a real on-disk huggingface_hub cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ktflow.errors import KtflowInputError
from ktflow.fetch import fetch_local

SRC = Path(__file__).resolve().parents[1] / "src"
SHA = "0123456789abcdef0123456789abcdef01234567"
SENTINEL = "hf_SENTINELtokenDoNotLeak0123456789"


def make_model(root: Path) -> Path:
    """A small sharded safetensors model directory, laid out like a hub release."""
    root.mkdir(parents=True)
    (root / "config.json").write_text(json.dumps({"model_type": "deepseek_v3", "hidden_size": 8}))
    (root / "tokenizer.json").write_text(json.dumps({"version": "1.0"}))
    shards = {
        "model-00001-of-00002.safetensors": {"a.weight": torch.arange(12.0).reshape(3, 4)},
        "model-00002-of-00002.safetensors": {"b.weight": torch.ones(5, dtype=torch.bfloat16)},
    }
    weight_map = {}
    for name, tensors in shards.items():
        save_file(tensors, root / name)
        weight_map.update(dict.fromkeys(tensors, name))
    (root / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return root


def make_hub_cache(cache: Path, repo_id: str, sha: str = SHA) -> Path:
    """huggingface_hub's cache layout: blobs/, snapshots/<sha>/ (relative symlinks), refs/main."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    model = make_model(cache.parent / "staging" / repo_id.replace("/", "--"))
    (model / "pytorch_model.bin").write_bytes(b"\x80\x04pickled")  # excluded by the default patterns
    snapshot = repo / "snapshots" / sha
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for index, path in enumerate(sorted(model.iterdir())):
        blob = repo / "blobs" / f"{index:040x}"
        path.rename(blob)
        (snapshot / path.name).symlink_to(Path("../../blobs") / blob.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    return snapshot


def run_cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    full_env.update(env, PYTHONPATH=str(SRC))
    return subprocess.run(
        [sys.executable, "-m", "ktflow", "-v", *args],
        capture_output=True, text=True, env=full_env, timeout=120, check=False,
    )  # fmt: skip


def hub_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_CACHE": str(tmp_path / "hf" / "hub"), **extra}


def test_local_fetch_hardlinks_files_and_records_provenance(tmp_path: Path) -> None:
    src = make_model(tmp_path / "user-model")
    (src / ".git").mkdir()
    (src / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    report = fetch_local(src, tmp_path / "out")
    out = tmp_path / "out"
    expected = {p.name for p in src.iterdir() if p.is_file()}
    assert {p.name for p in out.iterdir()} == expected | {"provenance.json"}
    assert not any(p.is_symlink() for p in out.rglob("*"))
    for name in expected:
        assert (out / name).read_bytes() == (src / name).read_bytes()
        assert (out / name).stat().st_ino == (src / name).stat().st_ino  # same file system: linked
    assert report.files == len(expected)
    assert report.methods == {"hardlink": len(expected)}
    provenance = json.loads((out / "provenance.json").read_text())
    assert provenance["step"] == "fetch"
    assert provenance["config"]["source"] == "local"
    assert str(src / "config.json") in provenance["inputs"]
    assert not list(tmp_path.glob(".out.*"))  # no temp dir left behind


def test_no_hardlink_makes_independent_copies(tmp_path: Path) -> None:
    src = make_model(tmp_path / "m")
    report = fetch_local(src, tmp_path / "out", hardlink=False)
    assert report.methods.get("hardlink", 0) == 0
    (tmp_path / "out" / "config.json").write_text("{}")
    assert json.loads((src / "config.json").read_text())["model_type"] == "deepseek_v3"


def test_local_resolves_symlinks_into_real_files(tmp_path: Path) -> None:
    snapshot = make_hub_cache(tmp_path / "cache", "org/linked")
    (snapshot / "pytorch_model.bin").unlink()
    fetch_local(snapshot, tmp_path / "out")
    out_files = list((tmp_path / "out").iterdir())
    assert out_files
    assert not any(p.is_symlink() for p in out_files)


@pytest.mark.parametrize("name", ["pytorch_model.bin", "adapter.pt", "weights.pth", "sd.ckpt", "x.pkl"])
def test_local_refuses_pickle_weights(tmp_path: Path, name: str) -> None:
    src = make_model(tmp_path / "m")
    (src / "sub").mkdir()
    (src / "sub" / name).write_bytes(b"\x80\x04.")
    with pytest.raises(KtflowInputError, match="weights load only from safetensors") as caught:
        fetch_local(src, tmp_path / "out")
    assert caught.value.path == str(src / "sub" / name)
    assert not (tmp_path / "out").exists()


def test_local_bad_inputs_name_path_and_field(tmp_path: Path) -> None:
    with pytest.raises(KtflowInputError, match="does not exist") as caught:
        fetch_local(tmp_path / "nope", tmp_path / "out")
    assert caught.value.path == str(tmp_path / "nope")

    src = make_model(tmp_path / "m")
    (src / "config.json").unlink()
    with pytest.raises(KtflowInputError, match="needs its config") as caught:
        fetch_local(src, tmp_path / "out")
    assert caught.value.path == str(src / "config.json")

    (src / "config.json").write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(KtflowInputError) as caught:
        fetch_local(src, tmp_path / "out")
    assert caught.value.field == "model_type"


def test_local_catches_truncated_and_missing_shards(tmp_path: Path) -> None:
    src = make_model(tmp_path / "m")
    shard = src / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-3])
    with pytest.raises(KtflowInputError, match="truncated") as caught:
        fetch_local(src, tmp_path / "out")
    assert caught.value.path == str(shard)
    shard.unlink()
    with pytest.raises(KtflowInputError, match="model-00002-of-00002") as caught:
        fetch_local(src, tmp_path / "out")
    assert caught.value.field == "weight_map"


def test_local_catches_non_safetensors_content_and_bad_index(tmp_path: Path) -> None:
    src = make_model(tmp_path / "m")
    page = src / "model-00001-of-00002.safetensors"
    page.write_bytes(b"<html><body>502 Bad Gateway</body></html>")  # what a failed download can leave
    with pytest.raises(KtflowInputError, match="safetensors") as caught:
        fetch_local(src, tmp_path / "out")
    assert caught.value.path == str(page)
    (src / "model.safetensors.index.json").write_text("[1, 2]")
    with pytest.raises(KtflowInputError, match="not a safetensors index"):
        fetch_local(src, tmp_path / "out")


def test_output_inside_the_model_directory_is_refused(tmp_path: Path) -> None:
    src = make_model(tmp_path / "m")
    with pytest.raises(KtflowInputError, match="must not lie inside"):
        fetch_local(src, src / "copy")
    assert not (src / "copy").exists()


def test_failed_fetch_keeps_previous_output(tmp_path: Path) -> None:
    src = make_model(tmp_path / "m")
    fetch_local(src, tmp_path / "out", hardlink=False)
    before = sorted(p.name for p in (tmp_path / "out").iterdir())
    (src / "model.pt").write_bytes(b"x")
    with pytest.raises(KtflowInputError):
        fetch_local(src, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == before


def test_hub_offline_resolves_from_cache_and_never_leaks_the_token(tmp_path: Path) -> None:
    make_hub_cache(tmp_path / "hf" / "hub", "org/tiny")
    out = tmp_path / "results" / "model"
    env = hub_env(tmp_path, HF_HUB_OFFLINE="1", HF_TOKEN=SENTINEL)
    result = run_cli(["fetch", str(out), "--source", "hf", "--repo-id", "org/tiny"], env)
    assert result.returncode == 0, result.stderr
    assert SHA in result.stdout
    provenance = json.loads((out / "provenance.json").read_text())
    assert provenance["config"]["repo_id"] == "org/tiny"
    assert provenance["config"]["commit_sha"] == SHA
    names = {p.name for p in out.iterdir()}
    assert "config.json" in names
    assert "pytorch_model.bin" not in names  # default patterns exclude pickles
    assert not any(p.is_symlink() for p in out.rglob("*"))
    for path in out.rglob("*"):
        assert SENTINEL.encode() not in path.read_bytes()
    assert SENTINEL not in result.stdout + result.stderr


def test_hub_revision_can_be_a_commit_sha(tmp_path: Path) -> None:
    make_hub_cache(tmp_path / "hf" / "hub", "org/tiny", sha="f" * 40)
    out = tmp_path / "model"
    args = ["fetch", str(out), "--source", "hf", "--repo-id", "org/tiny", "--revision", "f" * 40]
    result = run_cli([*args, "--allow-patterns", "*.json"], hub_env(tmp_path, HF_HUB_OFFLINE="1"))
    # Only JSON was asked for, so there are no weights to load: refused before anything is written.
    assert result.returncode == 2
    assert "no *.safetensors weights" in result.stderr
    assert not out.exists()
    result = run_cli(args, hub_env(tmp_path, HF_HUB_OFFLINE="1"))
    assert result.returncode == 0, result.stderr
    assert json.loads((out / "provenance.json").read_text())["config"]["commit_sha"] == "f" * 40


def test_hub_pickle_patterns_are_still_refused(tmp_path: Path) -> None:
    make_hub_cache(tmp_path / "hf" / "hub", "org/tiny")
    args = ["fetch", str(tmp_path / "o"), "--source", "hf", "--repo-id", "org/tiny", "--allow-patterns", "*"]
    result = run_cli(args, hub_env(tmp_path, HF_HUB_OFFLINE="1"))
    assert result.returncode == 2
    assert "pytorch_model.bin" in result.stderr
    assert "weights load only from safetensors" in result.stderr


@pytest.mark.parametrize(
    "env_extra",
    [{"HF_HUB_OFFLINE": "1"}, {"HF_ENDPOINT": "http://127.0.0.1:9"}],  # offline flag; nothing listening
    ids=["offline", "unreachable"],
)
def test_hub_uncached_repo_gives_one_clear_error(tmp_path: Path, env_extra: dict[str, str]) -> None:
    make_hub_cache(tmp_path / "hf" / "hub", "org/tiny")
    env = hub_env(tmp_path, HF_TOKEN=SENTINEL, **env_extra)
    out = tmp_path / "model"
    result = run_cli(["fetch", str(out), "--source", "hf", "--repo-id", "org/absent"], env)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("ktflow fetch: error: repo_id: the Hugging Face hub is unreachable")
    assert "org/absent@main" in lines[-1]
    assert "source: local" in lines[-1]
    assert "Traceback" not in result.stderr
    assert SENTINEL not in result.stderr + result.stdout
    assert not out.exists()


def test_hub_unreachable_falls_back_to_a_cached_snapshot(tmp_path: Path) -> None:
    make_hub_cache(tmp_path / "hf" / "hub", "org/tiny")
    env = hub_env(tmp_path, HF_ENDPOINT="http://127.0.0.1:9")
    result = run_cli(["fetch", str(tmp_path / "m"), "--source", "hf", "--repo-id", "org/tiny"], env)
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "m" / "provenance.json").read_text())["config"]["commit_sha"] == SHA


def test_cli_requires_the_source_arguments(tmp_path: Path) -> None:
    result = run_cli(["fetch", str(tmp_path / "o"), "--source", "local"], {})
    assert result.returncode == 2
    assert "--path: required with --source local" in result.stderr
    result = run_cli(["fetch", str(tmp_path / "o"), "--source", "hf", "--repo-id", "not a repo!"], {})
    assert result.returncode == 2
    assert "repo_id" in result.stderr
