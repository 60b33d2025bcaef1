"""Getting models from a hub: the Hugging Face hub (or a mirror via HF_ENDPOINT) through huggingface_hub, or ModelScope.

Only what cl3 uses is fetched: config, tokenizer, safetensors weights and their index (and PEFT adapter files).
huggingface_hub provides the cache, tokens (HF_TOKEN or `hf auth login`), HF_ENDPOINT, and resumes a transfer
interrupted mid-file within a run; files completed by an earlier, interrupted run are not fetched again.
ModelScope (modelscope.cn, for users in China) is reached through its public HTTP API with the standard library:
files download into `<cache>/modelscope/...` and a `.part` file left by an interrupted run is resumed with a Range request.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path, PurePosixPath

from . import paths
from .errors import InputError, UsageError

Progress = Callable[[int, int], None]

CONFIG_FILES = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
                "special_tokens_map.json", "added_tokens.json"]
ADAPTER_FILES = ["adapter_config.json", "adapter_model.safetensors"]
MODEL_FILES = CONFIG_FILES + ADAPTER_FILES + ["*.safetensors", "model.safetensors.index.json"]
SOURCES = ("hf", "modelscope")
SOURCE_ENV = "CL3_HUB_SOURCE"        # hf (default) or modelscope: where repo ids given as SRC are fetched from
MODELSCOPE_DEFAULT = "https://www.modelscope.cn"
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def is_repo_id(src: str | os.PathLike) -> bool:
    """`owner/name` that is not an existing local path."""
    return bool(_REPO_ID.match(str(src))) and not Path(src).exists() and not str(src).endswith((".gguf", ".json"))


def resolve_source(src: str | os.PathLike, *, config_only: bool = False, revision: str | None = None,
                   source: str | None = None, endpoint: str | None = None, progress: Progress | None = None) -> Path:
    """A local path as is; a hub repo id (`owner/name`) downloaded (only config + tokenizer with `config_only`).

    Every command taking a model SRC calls this first, so `cl3 quantize owner/name ...` works.
    """
    if Path(src).exists() or not is_repo_id(src):
        return Path(src)
    include = CONFIG_FILES if config_only else None
    return download(str(src), revision=revision, source=source, include=include, endpoint=endpoint, progress=progress)


def download(repo_id: str, *, revision: str | None = None, source: str | None = None, include: list[str] | None = None,
             out: str | os.PathLike | None = None, endpoint: str | None = None, cache_dir: str | os.PathLike | None = None,
             progress: Progress | None = None) -> Path:
    """Download the files cl3 needs from `repo_id` (or those matching `include`); returns the local directory."""
    if not _REPO_ID.match(repo_id):
        raise UsageError(f"not a hub repo id: {repo_id!r} (expected owner/name)")
    source = (source or os.environ.get(SOURCE_ENV) or "hf").lower()
    if source not in SOURCES:
        raise UsageError(f"unknown source {source!r}; choose hf or modelscope")
    patterns = list(include) if include else MODEL_FILES
    if source == "modelscope":
        path = _modelscope_download(repo_id, revision or "master", patterns, out, endpoint, cache_dir, progress)
    else:
        path = _hf_download(repo_id, revision, patterns, out, endpoint, cache_dir, progress)
    if not include and not any(path.glob("*.safetensors")):
        raise InputError(f"{repo_id} has no safetensors weights cl3 can read (pickle-only repos are not supported)")
    return path


# --- Hugging Face hub -------------------------------------------------------------------------------------------

def download_dataset(repo_id: str, patterns: list[str], *, revision: str | None = None, endpoint: str | None = None,
                     cache_dir: str | os.PathLike | None = None, progress: Progress | None = None) -> Path:
    """The files of a Hugging Face *dataset* repo matching ``patterns`` (huggingface_hub's cache; resumable)."""
    if not _REPO_ID.match(repo_id):
        raise UsageError(f"not a hub repo id: {repo_id!r} (expected owner/name)")
    return _hf_download(repo_id, revision, patterns, None, endpoint, cache_dir, progress, repo_type="dataset")


def _hf_download(repo_id, revision, patterns, out, endpoint, cache_dir, progress, repo_type="model") -> Path:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = endpoint or constants.ENDPOINT
    try:
        path = snapshot_download(repo_id, revision=revision, allow_patterns=patterns, local_dir=out,
                                 cache_dir=cache_dir, endpoint=endpoint, tqdm_class=_tqdm_class(progress),
                                 repo_type=repo_type)
    except GatedRepoError:
        raise InputError(f"{repo_id} is gated: accept its license on the hub, then log in (`hf auth login`) or set "
                         "HF_TOKEN") from None
    except RepositoryNotFoundError:
        raise InputError(f"no repository {repo_id} on {where}, and no local directory of that name (if the repo is "
                         "private: log in with `hf auth login` or set HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise InputError(f"{repo_id} has no revision {revision!r} on {where}") from None
    except ValueError as ex:  # huggingface_hub refuses a listed name with `..` or an absolute path
        if "Invalid filename" not in str(ex) and "Invalid pointer path" not in str(ex):
            raise
        name = re.search(r"'([^']*)'", str(ex))
        raise InputError(f"{repo_id} on {where} lists a file whose name leaves the download folder"
                         f"{f' ({name[1]})' if name else ''}; nothing outside it was written") from None
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as ex:
        reason = str(ex).strip().splitlines()[0] if str(ex).strip() else type(ex).__name__
        raise InputError(f"cannot download {repo_id} from {where}: {reason} (behind a firewall? set "
                         "HF_ENDPOINT=https://hf-mirror.com, or download from ModelScope)", param="source") from None
    return Path(path)


def _tqdm_class(progress: Progress | None):
    """A silent huggingface_hub progress-bar class that reports snapshot bytes to `progress(done, total)`."""
    if progress is None:
        return None
    from huggingface_hub.utils import tqdm as hf_tqdm

    class _Report(hf_tqdm):
        def __init__(self, *args, name: str | None = None, **kwargs):
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)
            self._report = name == "huggingface_hub.snapshot_download"
            self._done = int(kwargs.get("initial") or 0)

        def update(self, n=1):
            if self._report and n:
                self._done += int(n)
                progress(self._done, int(self.total or 0))

    return _Report


# --- ModelScope ---------------------------------------------------------------------------------------------------

def modelscope_endpoint() -> str:
    """$MODELSCOPE_DOMAIN (as the modelscope SDK reads it: a host name, or a full URL), else www.modelscope.cn."""
    domain = os.environ.get("MODELSCOPE_DOMAIN", "").strip().rstrip("/")
    if not domain:
        return MODELSCOPE_DEFAULT
    return domain if domain.startswith(("http://", "https://")) else "https://" + domain


def _modelscope_download(repo_id, revision, patterns, out, endpoint, cache_dir, progress) -> Path:
    base = (endpoint or modelscope_endpoint()).rstrip("/")
    quoted = urllib.parse.quote(repo_id)
    listing = _ms_json(f"{base}/api/v1/models/{quoted}/repo/files?"
                       + urllib.parse.urlencode({"Revision": revision, "Recursive": "true"}), repo_id, base)
    files = [f for f in _ms_listed_files(listing, repo_id, base) if f.get("Type", "blob") != "tree"]
    wanted = [f for f in files if any(fnmatch.fnmatch(f["Path"], p) for p in patterns)]
    if out is None:
        root = Path(cache_dir) if cache_dir else paths.cache_dir()
        out = root / "modelscope" / repo_id.replace("/", "--") / revision
    out = Path(out)
    targets = [_inside(out, f["Path"], repo_id, base) for f in wanted]  # all checked before anything is written
    total = sum(int(f.get("Size") or 0) for f in wanted)
    done = 0
    for f, target in zip(wanted, targets):
        size = int(f.get("Size") or 0)
        if not (target.is_file() and target.stat().st_size == size):
            url = f"{base}/api/v1/models/{quoted}/repo?" + urllib.parse.urlencode({"Revision": revision,
                                                                                   "FilePath": f["Path"]})
            _ms_fetch(url, target, size, f.get("Sha256"), repo_id, base,
                      (lambda n, d=done: progress(d + n, total)) if progress else None)
        done += size
        if progress:
            progress(done, total)
    return out


def _inside(out: Path, listed: str, repo_id: str, base: str) -> Path:
    """`out / listed`, refused when the listed path is absolute, has `..` or leaves `out` (a hostile listing)."""
    rel = PurePosixPath(listed) if isinstance(listed, str) and "\0" not in listed and "\\" not in listed else None
    target = out / rel if rel is not None and rel.parts and not rel.is_absolute() and ".." not in rel.parts else None
    if target is None or not target.resolve().is_relative_to(out.resolve()) or target.resolve() == out.resolve():
        raise InputError(f"{repo_id} on {base} lists a file path that leaves the output folder: {listed!r}; "
                         "nothing was downloaded")
    return target


def _ms_listed_files(listing: dict, repo_id: str, base: str) -> list[dict]:
    """The file entries of a ModelScope listing, each with a string Path and a numeric Size, or one InputError."""
    data = listing.get("Data") or {}
    files = data.get("Files") or [] if isinstance(data, dict) else None
    if not isinstance(files, list) or not all(
            isinstance(f, dict) and isinstance(f.get("Path"), str) and isinstance(f.get("Size", 0), (int, type(None)))
            and isinstance(f.get("Sha256"), (str, type(None))) for f in files):
        raise InputError(f"ModelScope at {base} sent a malformed file listing for {repo_id}")
    return files


def _ms_headers() -> dict[str, str]:
    headers = {"User-Agent": "cl3"}
    if token := os.environ.get("MODELSCOPE_API_TOKEN"):
        headers["Authorization"] = f"Bearer {token}"
    return headers


def _ms_json(url: str, repo_id: str, base: str) -> dict:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=_ms_headers()), timeout=60) as r:
            data = json.loads(r.read().decode("utf-8"))
    except urllib.error.HTTPError as ex:
        what = "no such repository or revision" if ex.code == 404 else f"HTTP {ex.code}"
        raise InputError(f"cannot list {repo_id} on {base}: {what}") from None
    except (urllib.error.URLError, OSError, ValueError) as ex:
        raise InputError(f"cannot reach ModelScope at {base}: {getattr(ex, 'reason', ex)} "
                         "(set MODELSCOPE_DOMAIN for another endpoint)") from None
    if not isinstance(data, dict) or data.get("Code", 200) != 200:
        raise InputError(f"ModelScope refused to list {repo_id}: {data.get('Message', data) if isinstance(data, dict) else data}")
    return data


def _ms_fetch(url: str, target: Path, size: int, sha256: str | None, repo_id: str, base: str,
              progress: Progress | None) -> None:
    """Download to `target.part`, resuming what an earlier run left there; verify size and SHA-256; rename."""
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    if have > size:
        part.unlink()
        have = 0
    headers = _ms_headers() | ({"Range": f"bytes={have}-"} if have else {})
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=60) as r:
            mode = "ab" if have and r.status == 206 else "wb"
            have = have if mode == "ab" else 0
            with open(part, mode) as f:
                while chunk := r.read(1 << 20):
                    f.write(chunk)
                    have += len(chunk)
                    if progress:
                        progress(have)
    except urllib.error.HTTPError as ex:
        raise InputError(f"cannot download {target.name} of {repo_id} from {base}: HTTP {ex.code}") from None
    except (urllib.error.URLError, OSError) as ex:
        raise InputError(f"download of {target.name} from {base} was interrupted ({getattr(ex, 'reason', ex)}); "
                         "run the command again to resume") from None
    if have != size:
        raise InputError(f"download of {target.name} from {base} stopped at {have} of {size} bytes; run the command "
                         "again to resume")
    if sha256:
        digest = hashlib.sha256()
        with open(part, "rb") as f:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
        if digest.hexdigest() != sha256.lower():
            part.unlink()
            raise InputError(f"{target.name} from {base} does not match its SHA-256; it was deleted, run again")
    os.replace(part, target)

