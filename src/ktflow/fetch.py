"""Put a model snapshot (config, tokenizer, safetensors) under the results tree.

The command is ``ktflow fetch`` (:mod:`ktflow.steps.fetch`).

Two sources: a local directory, or the Hugging Face hub through huggingface_hub's
own cache (``snapshot_download`` without ``local_dir``, so a pre-populated cache and
``HF_HUB_OFFLINE=1`` work exactly as huggingface_hub documents). Either way the
files are materialised into OUT_DIR by a copy-on-write clone, a hard link (same
file system) or a copy, never a symlink: the output must not change when the
source directory does, and no later step can reach back into the user's tree
through a link. The token is left to huggingface_hub (``HF_TOKEN`` or ``hf auth
login``); ktflow never reads, passes, logs or records it.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ktflow.atomic import atomic_dir
from ktflow.errors import KtflowInputError
from ktflow.provenance import PROVENANCE_NAME, recorded
from ktflow.readers.snapshot import validate_snapshot

log = logging.getLogger(__name__)

# Everything a model snapshot needs for the pipeline (config, tokenizer incl. tiktoken
# and custom tokenizer code, chat templates, safetensors) and nothing pickled.
DEFAULT_ALLOW_PATTERNS = [
    "*.json", "*.safetensors", "*.model", "*.tiktoken", "*.txt", "*.py", "*.jinja", "*.md", "LICENSE*",
]  # fmt: skip
_FICLONE = 0x40049409  # linux/fs.h: clone a whole file (btrfs, xfs, ...)


class HubUnreachableError(KtflowInputError):
    """The hub cannot be reached and the requested snapshot is not in the local cache."""


@dataclass
class FetchReport:
    out: Path
    source: str
    files: int = 0
    bytes: int = 0
    methods: dict[str, int] = field(default_factory=dict)  # clone / hardlink / copy -> file count
    repo_id: str | None = None
    revision: str | None = None
    commit_sha: str | None = None


def _materialise(src: Path, dst: Path, hardlink: bool) -> str:
    """Clone, hard-link or copy ``src`` to ``dst``; return which one happened."""
    with open(src, "rb") as source, open(dst, "wb") as target:
        try:
            fcntl.ioctl(target.fileno(), _FICLONE, source.fileno())
            shutil.copystat(src, dst)
            return "clone"
        except OSError:
            pass  # ext4, tmpfs, overlay ... have no clones
    if hardlink:
        dst.unlink()
        try:
            os.link(src, dst)
            return "hardlink"
        except OSError as error:
            if error.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
                raise
    shutil.copy2(src, dst)
    return "copy"


def _populate(files: list[tuple[Path, Path]], tmp: Path, report: FetchReport, hardlink: bool) -> None:
    for rel, real in files:
        target = tmp / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        method = _materialise(real, target, hardlink)
        report.methods[method] = report.methods.get(method, 0) + 1
        report.files += 1
        report.bytes += target.stat().st_size


def _write(
    root: Path,
    report: FetchReport,
    config: dict[str, Any],
    hardlink: bool,
    keep: Callable[[str], bool] | None = None,
) -> FetchReport:
    files = validate_snapshot(root, keep)
    inputs: list[str | Path] = [root / rel for rel, _ in files]
    with atomic_dir(report.out) as tmp, recorded(tmp / PROVENANCE_NAME, "fetch", config, inputs) as extra:
        # Provenance is written inside the temp dir, so it is renamed into place with the files.
        _populate(files, tmp, report, hardlink)
        extra.update(files=report.files, bytes=report.bytes, methods=report.methods)
    log.info(
        "fetched %d files (%.1f MB) into %s: %s", report.files, report.bytes / 1e6, report.out, report.methods
    )
    return report


def fetch_local(src: Path, out: Path, *, hardlink: bool = True) -> FetchReport:
    """Materialise the model directory ``src`` into ``out`` (atomically, with provenance)."""
    src = Path(src).expanduser().absolute()
    if Path(out).absolute().resolve().is_relative_to(src.resolve()):
        raise KtflowInputError(out, None, f"the output must not lie inside the model directory {src}")
    config = {"source": "local", "path": str(src), "hardlink": hardlink}
    return _write(src, FetchReport(out=Path(out), source="local"), config, hardlink)


def _hub_error(repo_id: str, revision: str | None, error: Exception) -> KtflowInputError:
    from huggingface_hub import constants
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    wanted = f"{repo_id}@{revision or 'main'}"
    if isinstance(error, RevisionNotFoundError):
        return KtflowInputError(None, "revision", f"{wanted}: the hub has no such revision")
    if isinstance(error, GatedRepoError | RepositoryNotFoundError):
        return KtflowInputError(
            None, "repo_id",
            f"{wanted}: not found or gated on the hub; for a private or gated repository log in "
            "with `hf auth login` or export HF_TOKEN (never put the token on the command line)",
        )  # fmt: skip
    # The underlying message is left out on purpose: only the class name, no request details.
    command = f"hf download {repo_id}" + (f" --revision {revision}" if revision else "")
    return HubUnreachableError(
        None, "repo_id",
        f"the Hugging Face hub is unreachable ({type(error).__name__}) and {wanted} is not complete in the "
        f"local cache {constants.HF_HUB_CACHE}. Pre-download it where the hub is reachable (`{command}`), "
        "then copy that cache here or point HF_HUB_CACHE at it; or use `source: local` with a model dir",
    )  # fmt: skip


def _snapshot(repo_id: str, revision: str | None, patterns: list[str]) -> Path:
    """The cached snapshot folder, downloading what is missing when the hub is reachable."""
    import httpx
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HFValidationError, RepositoryNotFoundError, RevisionNotFoundError

    def download(local_only: bool) -> Path:
        # token is never passed: huggingface_hub reads HF_TOKEN / its stored login itself.
        found = snapshot_download(
            repo_id, revision=revision, allow_patterns=patterns, local_files_only=local_only
        )
        return Path(found)

    offline = bool(constants.HF_HUB_OFFLINE)
    try:
        try:
            return download(offline)
        except (RepositoryNotFoundError, RevisionNotFoundError):
            raise
        except (OSError, httpx.HTTPError) as first:
            if offline:
                raise
            # huggingface_hub falls back to its cache by itself only for branch names; a pinned
            # commit sha needs local_files_only to be looked up there when the hub is unreachable.
            try:
                return download(True)
            except OSError:
                raise first from None
    except HFValidationError as error:
        raise KtflowInputError(
            None, "repo_id", f"{repo_id!r} is not a valid hub repository id ({error})"
        ) from None
    except (OSError, httpx.HTTPError) as error:
        raise _hub_error(repo_id, revision, error) from None


def fetch_hub(
    repo_id: str,
    out: Path,
    revision: str | None = None,
    allow_patterns: list[str] | None = None,
    *,
    hardlink: bool = True,
) -> FetchReport:
    """Resolve ``repo_id`` at ``revision`` through the huggingface_hub cache and materialise it."""
    from huggingface_hub.utils import filter_repo_objects  # type: ignore[attr-defined]  # public, not re-exported for mypy

    patterns = list(allow_patterns) if allow_patterns else list(DEFAULT_ALLOW_PATTERNS)
    folder = _snapshot(repo_id, revision, patterns)
    # The cache keeps each snapshot under snapshots/<commit sha>: that is the resolved revision.
    report = FetchReport(
        out=Path(out), source="hf", repo_id=repo_id, revision=revision, commit_sha=folder.name
    )
    config = {
        "source": "hf", "repo_id": repo_id, "revision": revision, "commit_sha": folder.name,
        "allow_patterns": patterns, "hardlink": hardlink,
    }  # fmt: skip
    # The cache may hold more of the repository than was asked for (an earlier, wider download).
    # Same matching as snapshot_download's own, so exactly the requested files come through.
    return _write(
        folder, report, config, hardlink, lambda rel: any(filter_repo_objects([rel], allow_patterns=patterns))
    )
