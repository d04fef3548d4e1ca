"""Where a raw data-set file comes from: a local file, a hub data-set repository, or a URL.

Nothing here runs at plan time: the Snakemake rule only passes the settings, and the
download happens inside the ``prepare_task`` job. Hub access uses huggingface_hub's
cache (``HF_HOME`` / ``HF_HUB_CACHE``) and its token from the environment (``HF_TOKEN``),
never one from the config; ``HF_HUB_OFFLINE=1`` serves the cache only.
"""

from __future__ import annotations

import shutil
import urllib.error
import urllib.parse
import urllib.request
from abc import ABC, abstractmethod
from pathlib import Path, PurePosixPath
from typing import Any, ClassVar

from ktflow.atomic import atomic_file, sha256_file
from ktflow.errors import KtflowInputError


class RawSource(ABC):
    kind: ClassVar[str]

    @abstractmethod
    def __init__(self, spec: dict[str, Any]) -> None:
        """Take what this source needs from the task's config block."""

    @abstractmethod
    def fetch(self, cache_dir: Path) -> Path:
        """The raw file on local disk (downloaded into ``cache_dir`` or a hub cache if needed)."""

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """What identifies the raw file, for provenance."""


class LocalFile(RawSource):
    kind = "raw"

    def __init__(self, spec: dict[str, Any]) -> None:
        self.path = Path(_required(spec, "raw_file"))

    def fetch(self, cache_dir: Path) -> Path:
        if not self.path.is_file():
            raise KtflowInputError(self.path, None, "raw data file not found (tasks.<task>.raw_file)")
        return self.path

    def describe(self) -> dict[str, Any]:
        return {"source": self.kind, "raw_file": str(self.path)}


class HubFile(RawSource):
    """One file of a Hugging Face *data-set* repository, resolved through the hub cache."""

    kind = "hf-dataset"

    def __init__(self, spec: dict[str, Any]) -> None:
        self.repo_id = _required(spec, "repo_id")
        self.filename = _required(spec, "filename")
        self.revision: str | None = spec.get("revision")

    def fetch(self, cache_dir: Path) -> Path:
        import httpx
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import (
            EntryNotFoundError,
            HFValidationError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )

        wanted = f"{self.repo_id}@{self.revision or 'main'}"
        try:
            # token=None: huggingface_hub reads HF_TOKEN (or its stored login) itself.
            found = hf_hub_download(self.repo_id, self.filename, repo_type="dataset", revision=self.revision)
        except HFValidationError as error:
            raise KtflowInputError(
                None, "repo_id", f"{self.repo_id!r} is not a valid repository id ({error})"
            ) from None
        except RevisionNotFoundError:
            raise KtflowInputError(None, "revision", f"{wanted}: the hub has no such revision") from None
        except RepositoryNotFoundError:
            raise KtflowInputError(
                None, "repo_id",
                f"data set {wanted} not found or gated; accept its terms on the hub and export HF_TOKEN "
                "(never put a token in the config)",
            ) from None  # fmt: skip
        except LocalEntryNotFoundError:
            raise self._unreachable(wanted, "offline or unreachable") from None
        except EntryNotFoundError:
            raise KtflowInputError(None, "filename", f"{wanted} has no file {self.filename!r}") from None
        except (OSError, httpx.HTTPError) as error:
            raise self._unreachable(wanted, type(error).__name__) from None
        return Path(found)

    def _unreachable(self, wanted: str, why: str) -> KtflowInputError:
        command = f"hf download {self.repo_id} {self.filename} --repo-type dataset"
        if self.revision:
            command += f" --revision {self.revision}"
        return KtflowInputError(
            None, "repo_id",
            f"the Hugging Face hub is unreachable ({why}) and {wanted}:{self.filename} is not in the "
            f"local hub cache; run `{command}` where the hub is reachable and copy the cache here "
            "(HF_HUB_CACHE), or use `source: raw` with `raw_file:`",
        )  # fmt: skip

    def describe(self) -> dict[str, Any]:
        return {
            "source": self.kind,
            "repo_id": self.repo_id,
            "filename": self.filename,
            "revision": self.revision,
        }


class UrlFile(RawSource):
    """A file behind a URL (Translational-Style lives in a GitHub repository), cached by name."""

    kind = "url"

    def __init__(self, spec: dict[str, Any]) -> None:
        self.url = _required(spec, "url")
        self.sha256: str | None = spec.get("sha256")
        name = PurePosixPath(urllib.parse.urlparse(self.url).path).name
        if not name:
            raise KtflowInputError(None, "url", f"{self.url!r} does not end in a file name")
        self.name = name

    def fetch(self, cache_dir: Path) -> Path:
        target = cache_dir / self.name
        if target.is_file() and (self.sha256 is None or sha256_file(target) == self.sha256):
            return target
        try:
            with (
                urllib.request.urlopen(self.url, timeout=60) as response,
                atomic_file(target, "wb") as handle,
            ):
                shutil.copyfileobj(response, handle)
        except (urllib.error.URLError, OSError) as error:
            reason = getattr(error, "reason", None) or error
            raise KtflowInputError(
                self.url, None,
                f"download failed ({reason}); fetch the file where the network is reachable and use "
                "`source: raw` with `raw_file:`",
            ) from None  # fmt: skip
        if self.sha256 is not None:
            digest = sha256_file(target)
            if digest != self.sha256:
                target.unlink()
                raise KtflowInputError(
                    self.url, "sha256", f"downloaded file has sha256 {digest}, config says {self.sha256}"
                )
        return target

    def describe(self) -> dict[str, Any]:
        return {"source": self.kind, "url": self.url, "sha256": self.sha256}


def _required(spec: dict[str, Any], key: str) -> str:
    value = spec.get(key)
    if not isinstance(value, str) or not value:
        raise KtflowInputError(None, key, f"source {spec.get('source')!r} needs {key}")
    return value


SOURCES: dict[str, type[RawSource]] = {cls.kind: cls for cls in (LocalFile, HubFile, UrlFile)}


def raw_source(spec: dict[str, Any]) -> RawSource:
    kind = spec.get("source")
    if kind not in SOURCES:
        raise KtflowInputError(None, "source", f"raw data needs source {' | '.join(SOURCES)}, got {kind!r}")
    return SOURCES[kind](spec)
