"""A hub model's files into the Hugging Face cache before training (the download stage, pipeline/stages/download.py).

Before anything is fetched: the file list and sizes from the hub, checked against the free space of the cache's disk
with a margin. Then huggingface_hub's snapshot_download (HF_ENDPOINT honoured, its progress bar; a kill leaves the
partial blob as `<blob>.incomplete`, which the next run continues with a Range request, and finished files are not
fetched again), or with MODEL_HUB=modelscope the modelscope SDK into the same cache layout
(`models--<owner>--<name>/snapshots/<revision>` + `refs/main`), so transformers finds it by the hub id either way.
Afterwards the sha256 of every file, checked against the hub's (or the blob's content address). Offline
(HF_HUB_OFFLINE=1): the cache only. Heavy imports stay inside the functions.
"""
from __future__ import annotations

import errno
import fnmatch
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from pipeline.evidence import atomic_write_text, sha256_file

WANTED = ("*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken")   # config, tokenizer, weights
BIN_WEIGHTS = ("*.bin",)                   # only for a repo without safetensors
WEIGHT_SUFFIXES = (".safetensors", ".bin")
MARGIN_FRACTION, MARGIN_BYTES = 0.05, 1 << 30   # free space asked for beyond the files: 5% + 1 GiB
GB = 2 ** 30
AUTODL_HINT = "AutoDL: HF_HOME=/root/autodl-tmp/hf, the data disk"


class HubError(Exception):
    """One line for the user: what is wrong, where, what to do (the stage turns it into StageFailed)."""

    def __init__(self, message: str, code: str | None = None):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class RemoteFile:
    path: str
    size: int
    sha256: str | None = None   # the hub's (LFS) sha256, when it gives one


# ---- where ------------------------------------------------------------------------------------------------------

def cache_dir(hf_home: str | None) -> Path:
    """The hub cache: `<HF_HOME>/hub` for the configured HF_HOME, else huggingface_hub's own (HF_HUB_CACHE)."""
    from huggingface_hub import constants
    if hf_home and Path(hf_home).expanduser().resolve() != Path(constants.HF_HOME).expanduser().resolve():
        return Path(hf_home).expanduser() / "hub"
    return Path(constants.HF_HUB_CACHE)


def repo_folder(cache: Path, repo_id: str) -> Path:
    return cache / ("models--" + repo_id.replace("/", "--"))


def snapshot_of(cache: Path, repo_id: str, revision: str = "main") -> Path | None:
    """The snapshot folder `refs/<revision>` points at, or None."""
    ref = repo_folder(cache, repo_id) / "refs" / revision
    return repo_folder(cache, repo_id) / "snapshots" / ref.read_text().strip() if ref.is_file() else None


def cache_state(cache: Path, repo_id: str) -> dict:
    """What the cache holds for repo_id (the snapshot's files and sizes, stat only): the stage is up to date while
    this is unchanged, so a deleted or truncated file makes it run again."""
    snap = snapshot_of(cache, repo_id)
    if snap is None or not snap.is_dir():
        return {"snapshot": None}
    files = {p.relative_to(snap).as_posix(): (p.stat().st_size if p.exists() else -1)
             for p in sorted(snap.rglob("*")) if p.is_file() or p.is_symlink()}
    return {"snapshot": snap.name, "files": files}


def public_endpoint(endpoint: str) -> str:
    """The endpoint without credentials (scheme://host[:port]/path)."""
    parts = urlsplit(endpoint)
    host = parts.hostname or ""
    return f"{parts.scheme}://{host}{f':{parts.port}' if parts.port else ''}{parts.path}".rstrip("/")


def offline_mode() -> bool:
    """huggingface_hub's own offline switch (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE in the process environment)."""
    from huggingface_hub import constants
    return constants.is_offline_mode()


# ---- what -------------------------------------------------------------------------------------------------------

def select(files: list[RemoteFile]) -> list[RemoteFile]:
    """The files a training run needs: config, tokenizer, weights (safetensors; *.bin only without them)."""
    patterns = patterns_for([f.path for f in files])
    return [f for f in files if any(fnmatch.fnmatch(f.path, p) for p in patterns)]


def wanted(folder: Path) -> list[str]:
    """The files of a cached snapshot that select() would have fetched."""
    names = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    return [n for n in names if any(fnmatch.fnmatch(n, p) for p in patterns_for(names))]


def patterns_for(names: list[str]) -> list[str]:
    return list(WANTED) + ([] if any(n.endswith(".safetensors") for n in names) else list(BIN_WEIGHTS))


def listing_hf(repo_id: str, revision: str, endpoint: str | None) -> tuple[str, list[RemoteFile]]:
    """(commit, files with sizes and LFS sha256) from the hub's model info API; nothing is written."""
    import httpx2
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError
    where = public_endpoint(endpoint or default_endpoint())
    try:
        info = HfApi(endpoint=endpoint).model_info(repo_id, revision=revision, files_metadata=True)
    except GatedRepoError:
        raise HubError(f"{repo_id} on {where} is gated: accept its licence on the model page and export HF_TOKEN, "
                       "then re-run", code="hub_gated") from None
    except RepositoryNotFoundError:
        raise HubError(f"MODEL_NAME={repo_id} is neither a local folder nor a model on {where}: check the name "
                       "(a private model needs HF_TOKEN)", code="hub_not_found") from None
    except RevisionNotFoundError:
        raise HubError(f"{repo_id} on {where} has no revision {revision!r}", code="hub_not_found") from None
    except (httpx2.ConnectError, httpx2.TimeoutException) as exc:
        raise HubError(f"cannot reach {where} for {repo_id} ({type(exc).__name__}): check the network, or use a "
                       "mirror (HF_ENDPOINT=https://hf-mirror.com) or ModelScope (MODEL_HUB=modelscope), or "
                       "HF_HUB_OFFLINE=1 with a filled cache", code="hub_unreachable") from None
    except HfHubHTTPError as exc:
        raise HubError(f"{where} answered {exc.response.status_code} for {repo_id}: try again later, or another "
                       "endpoint (HF_ENDPOINT)", code="hub_unreachable") from None
    files = [RemoteFile(s.rfilename, int(s.size or 0), s.lfs.sha256 if s.lfs else None) for s in info.siblings or []]
    return info.sha, files


def default_endpoint() -> str:
    from huggingface_hub import constants
    return constants.ENDPOINT


def _modelscope():
    """(HubApi, snapshot_download) of the modelscope SDK, an optional dependency."""
    try:
        from modelscope import snapshot_download
        from modelscope.hub.api import HubApi
    except ImportError:
        raise HubError("MODEL_HUB=modelscope needs the modelscope SDK: pip install modelscope (or MODEL_HUB=hf)",
                       code="modelscope_missing") from None
    return HubApi, snapshot_download


def listing_modelscope(repo_id: str, revision: str | None) -> tuple[str, list[RemoteFile]]:
    HubApi, _ = _modelscope()
    api = HubApi()
    try:
        rev = revision or api.get_valid_revision(repo_id)
        entries = api.get_model_files(repo_id, revision=rev, recursive=True)
    except Exception as exc:  # noqa: BLE001 - the SDK's errors differ by version; all say "cannot list"
        raise HubError(f"ModelScope cannot list {repo_id} ({type(exc).__name__}: {str(exc)[:160]}): check MODEL_NAME "
                       "(ModelScope ids are like Qwen/Qwen2.5-7B-Instruct) and the network", code="hub_not_found") from None
    files = [RemoteFile(e["Path"], int(e.get("Size") or 0), e.get("Sha256") or None)
             for e in entries if e.get("Type", "blob") != "tree"]
    return str(rev), files


# ---- the disk ---------------------------------------------------------------------------------------------------

def pending(snapshot: Path | None, files: list[RemoteFile]) -> list[RemoteFile]:
    """The files the cache does not hold complete yet."""
    def done(f):
        p = snapshot / f.path if snapshot else None
        return p is not None and p.is_file() and p.stat().st_size == f.size
    return [f for f in files if not done(f)]


def mount_point(path: Path) -> Path:
    path = path.resolve()
    while not os.path.ismount(path) and path != path.parent:
        path = path.parent
    return path


def check_disk(cache: Path, need: int, repo_id: str) -> dict:
    """Free space on the cache's disk against what is still to fetch plus the margin; raises a HubError naming the
    disk and the HF_HOME move when it does not fit. Reads only: nothing is created."""
    existing = next(p for p in (cache, *cache.parents) if p.exists())
    free = shutil.disk_usage(existing).free
    margin = int(need * MARGIN_FRACTION) + MARGIN_BYTES if need else 0
    disk = {"path": str(cache), "mount": str(mount_point(existing)), "free_bytes": free, "need_bytes": need,
            "margin_bytes": margin}
    if free < need + margin:
        raise HubError(f"{repo_id} needs {need / GB:.1f} GB (+ {margin / GB:.1f} GB margin) in the cache {cache}, but "
                       f"its disk {disk['mount']} has {free / GB:.1f} GB free: set HF_HOME to a folder on a larger disk "
                       f"({AUTODL_HINT}) and re-run; nothing was downloaded", code="disk_full")
    return disk


# ---- fetching ---------------------------------------------------------------------------------------------------

def resume_partials(repo_id: str, commit: str, cache: Path, endpoint: str | None, files: list[RemoteFile],
                    log=print) -> dict[str, int]:
    """huggingface_hub 2.x writes each download to a process-unique `blobs/<sha256>.<id>.incomplete` and starts a
    file over after a kill, leaving that partial behind (file_download.py _download_to_tmp_and_move). Continue the
    largest partial of each pending LFS file with a Range request (its own http_get), under its lock, check the
    sha256, and put it where snapshot_download takes a blob as fetched: a kill costs only the bytes in flight.
    Returns {file: bytes kept}."""
    from huggingface_hub import hf_hub_url
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import WeakFileLock, build_hf_headers
    folder = repo_folder(cache, repo_id)
    kept: dict[str, int] = {}
    for f in files:
        blob = folder / "blobs" / f.sha256 if f.sha256 else None
        if blob is None or blob.exists() or not any(blob.parent.glob(f"{f.sha256}*.incomplete")):
            continue
        (cache / ".locks" / folder.name).mkdir(parents=True, exist_ok=True)
        with WeakFileLock(cache / ".locks" / folder.name / f"{f.sha256}.lock"):
            parts = sorted(blob.parent.glob(f"{f.sha256}*.incomplete"), key=lambda p: p.stat().st_size)
            for extra in parts[:-1]:
                extra.unlink(missing_ok=True)
            part, have = parts[-1], parts[-1].stat().st_size
            if blob.exists() or not 0 < have <= f.size:
                part.unlink(missing_ok=True)
                continue
            log(f"resuming {f.path} at {have / GB:.2f} of {f.size / GB:.2f} GB (left by an interrupted download)")
            url = hf_hub_url(repo_id, f.path, revision=commit, endpoint=endpoint)
            try:
                with part.open("ab") as out:
                    http_get(url, out, resume_size=have, headers=build_hf_headers(), expected_size=f.size,
                             displayed_filename=f.path)
            except Exception as exc:  # noqa: BLE001 - the partial stays for the next run; snapshot_download says more
                log(f"resuming {f.path} stopped ({type(exc).__name__}); it starts over")
                continue
            if sha256_file(part) != f.sha256:
                part.unlink()
                log(f"the resumed {f.path} does not hash to the hub's sha256; it starts over")
                continue
            os.replace(part, blob)
            kept[f.path] = have
    return kept


def fetch_hf(repo_id: str, revision: str, cache: Path, endpoint: str | None, patterns: list[str]) -> Path:
    """huggingface_hub's snapshot_download (its progress bar; resumes `.incomplete` blobs; skips finished files)."""
    import httpx2
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    try:
        return Path(snapshot_download(repo_id, revision=revision, cache_dir=cache, endpoint=endpoint,
                                      allow_patterns=patterns))
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise HubError(f"the disk of the cache {cache} filled up while downloading {repo_id}: set HF_HOME to a "
                           f"folder on a larger disk ({AUTODL_HINT}) and re-run", code="disk_full") from None
        raise HubError(f"downloading {repo_id} stopped ({type(exc).__name__}: {str(exc).splitlines()[0][:160]}): "
                       "re-run to resume (finished files are kept)", code="download_interrupted") from None
    except (httpx2.HTTPError, HfHubHTTPError, LocalEntryNotFoundError) as exc:
        raise HubError(f"downloading {repo_id} stopped ({type(exc).__name__}: {str(exc).splitlines()[0][:160]}): "
                       "re-run to resume (finished files are kept)", code="download_interrupted") from None


def fetch_modelscope(repo_id: str, revision: str, cache: Path, patterns: list[str]) -> Path:
    """The modelscope SDK into `<cache>/models--<owner>--<name>/snapshots/<revision>`, then refs/main: the layout
    huggingface_hub and transformers resolve a hub id in."""
    _, snapshot_download = _modelscope()
    folder = repo_folder(cache, repo_id)
    snap = folder / "snapshots" / revision
    try:
        snapshot_download(repo_id, revision=revision, local_dir=str(snap), allow_patterns=patterns)
    except TypeError:
        raise HubError("the installed modelscope is too old (its snapshot_download has no local_dir): "
                       "pip install -U modelscope", code="modelscope_missing") from None
    except Exception as exc:  # noqa: BLE001 - the SDK's network errors differ by version
        raise HubError(f"ModelScope download of {repo_id} stopped ({type(exc).__name__}: {str(exc)[:160]}): re-run to "
                       "resume", code="download_interrupted") from None
    atomic_write_text(folder / "refs" / "main", revision)
    return snap


def from_cache(repo_id: str, cache: Path) -> Path:
    """HF_HUB_OFFLINE=1: the cached snapshot of refs/main, complete by the cached tree listing when there is one."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import IncompleteSnapshotError, LocalEntryNotFoundError
    try:
        snap = Path(snapshot_download(repo_id, cache_dir=cache, local_files_only=True, allow_patterns=list(WANTED)))
    except (LocalEntryNotFoundError, IncompleteSnapshotError, OSError) as exc:
        raise HubError(f"HF_HUB_OFFLINE=1, but the cache {cache} has no complete {repo_id} "
                       f"({type(exc).__name__}): unset HF_HUB_OFFLINE to download it, or set HF_HOME to the cache "
                       "that holds it", code="offline_cache_missing") from None
    names = [p.relative_to(snap).as_posix() for p in snap.rglob("*") if p.is_file()]
    if "config.json" not in names or not any(n.endswith(WEIGHT_SUFFIXES) for n in names):
        raise HubError(f"HF_HUB_OFFLINE=1, but the cached {repo_id} in {snap} has no config.json or no weights: "
                       "unset HF_HUB_OFFLINE to download it", code="offline_cache_missing")
    return snap


# ---- what arrived -----------------------------------------------------------------------------------------------

def hash_files(snapshot: Path, expected: dict[str, str | None], log=print) -> dict:
    """{path: {size, sha256, weight, expected_sha256, verified}} for each file; expected is the hub's sha256, else
    the blob's content address (huggingface_hub names an LFS blob by its sha256). A mismatch is a HubError."""
    out = {}
    for name in sorted(expected):
        path = snapshot / name
        if not path.is_file():
            raise HubError(f"{path} is missing after the download: re-run to fetch it", code="download_interrupted")
        t0 = time.monotonic()
        digest = sha256_file(path)
        want = expected[name] or (path.resolve().name if len(path.resolve().name) == 64 and path.is_symlink() else None)
        if want and digest != want:
            raise HubError(f"{name}: sha256 {digest[:12]}... differs from the hub's {want[:12]}...: the cached file is "
                           f"corrupt; delete {path.resolve()} and re-run", code="download_corrupt")
        out[name] = {"size": path.stat().st_size, "sha256": digest, "weight": name.endswith(WEIGHT_SUFFIXES),
                     "expected_sha256": want, "verified": want is not None}
        if out[name]["weight"]:
            log(f"sha256 {name}: {digest} ({path.stat().st_size / GB:.2f} GB, {time.monotonic() - t0:.1f} s)")
    return out
