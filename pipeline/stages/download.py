"""The base model's weights into the Hugging Face cache before anything trains.

Run: python -m pipeline run download   (make download; `run all` runs it after gpu_check)
Runs where a training stage would load a hub model: a GPU tier this machine trains (gpu_check's plan), or any tier
whose MODEL_NAME is a hub id. A plan that cannot train the tier skips it with the plan's reason; a local model (the
tiny/demo builds, a MODEL_NAME folder) or a rehearsal's stand-in has nothing to fetch. The file list and sizes come
from the hub first and are checked against the cache disk's free space; then huggingface_hub (HF_ENDPOINT: a mirror)
or the modelscope SDK (MODEL_HUB=modelscope) fetches them with a progress bar, resuming after a kill. HF_HUB_OFFLINE=1
uses the cache only. Writes reports/migration/download.json: the revision and the sha256 of every file.
"""
from __future__ import annotations

import time
from pathlib import Path

from pipeline import hub
from pipeline import training as T
from pipeline.core import SkipStage, Stage, StageFailed
from pipeline.evidence import sha256_json

# What is fetched (reads) is the model the config names; where from and how (untracked: mirror, hub, offline, cache
# folder) leaves the files and their sha256 the same, and the gate run in a plain shell must not find it stale. The
# cache's own state is the machine fact: a changed cache runs the stage again.
STAGE = Stage("download", "reports/migration/download.json", needs=("gpu_check",), stops_run=True,
              reads=("model.name", "model.tiny_seed", "runtime.rehearsal", "runtime.force_skip_training"),
              untracked=("model.hub", "runtime.hf_endpoint", "runtime.hf_hub_offline", "runtime.hf_home"),
              requested=lambda cfg: nothing_to_fetch(cfg), machine=lambda cfg: cached(cfg))

REVISION = "main"


def hub_model(cfg) -> str | None:
    """The hub id the training stages would load, or None for a local model (computed, nothing built)."""
    from pipeline import models
    if cfg.runtime.rehearsal:
        return None
    name = models.base_for(cfg, build=False)
    return None if Path(name).is_dir() or not models.is_hub_id(name) else name


def nothing_to_fetch(cfg) -> str | None:
    """Stage.requested: why there is nothing to download (the engine records the skip), or None."""
    if cfg.runtime.rehearsal:
        return "rehearsal: the tiny stand-in is built from a seed; the tier's weights are not downloaded"
    try:
        if hub_model(cfg) is not None:
            return None
    except ValueError:
        return None   # a MODEL_NAME that names nothing: run() says so in one line
    name = cfg.model.name
    where = (f"the {cfg.tier} tier builds it" if not name else f"a folder, {name}" if Path(name).is_dir()
             else f"MODEL_NAME={name}, no hub id")
    return f"the base model is local ({where}): nothing to download"


def cached(cfg) -> dict:
    """Stage.machine: what the cache holds for the model (stat only); a deleted file makes the stage run again."""
    try:
        repo_id = hub_model(cfg)
    except ValueError:
        return {}
    return hub.cache_state(hub.cache_dir(cfg.runtime.hf_home), repo_id) if repo_id else {}


def run(ctx) -> dict:
    T.gate(ctx)   # FORCE_SKIP_TRAINING, or a plan that cannot train this tier: skipped with its reason, nothing fetched
    cfg, rt = ctx.cfg, ctx.cfg.runtime
    try:
        repo_id = hub_model(cfg)
    except ValueError as exc:
        raise StageFailed(str(exc)) from None
    if repo_id is None:
        raise SkipStage(nothing_to_fetch(cfg) or "nothing to download")
    cache, offline, t0 = hub.cache_dir(rt.hf_home), rt.hf_hub_offline or hub.offline_mode(), time.monotonic()
    try:
        got = from_cache(ctx, repo_id, cache) if offline else fetch(ctx, repo_id, cache)
        files = hub.hash_files(got["snapshot"], got.pop("expected"), log=ctx.log)
    except hub.HubError as exc:
        raise StageFailed(str(exc), code=exc.code) from None
    endpoint = rt.hf_endpoint or hub.default_endpoint()
    return {"model": repo_id, "hub": cfg.model.hub, "offline": offline,
            "endpoint": None if cfg.model.hub == "modelscope" else hub.public_endpoint(endpoint),
            "source": "cache (HF_HUB_OFFLINE=1: nothing was fetched)" if offline else "hub",
            "cache_dir": str(cache), **got, "snapshot": str(got["snapshot"]), "files": files,
            "total_bytes": sum(f["size"] for f in files.values()), "wall_s": round(time.monotonic() - t0, 3),
            # the cache as this run leaves it (the engine hashed it before the run): up to date while it stays so
            "machine_sha256": sha256_json(cached(cfg))}


def from_cache(ctx, repo_id: str, cache: Path) -> dict:
    """HF_HUB_OFFLINE=1: the cached snapshot, nothing asked of any hub."""
    snap = hub.from_cache(repo_id, cache)
    ctx.log(f"HF_HUB_OFFLINE=1: {repo_id} from the cache {snap} (nothing fetched)")
    names = hub.wanted(snap)
    return {"snapshot": snap, "expected": dict.fromkeys(names), "revision": snap.name, "disk": None,
            "already_cached": names, "resumed": {}}


def fetch(ctx, repo_id: str, cache: Path) -> dict:
    """The file list and sizes first, the disk check, then the download (a killed file resumes)."""
    cfg, rt = ctx.cfg, ctx.cfg.runtime
    modelscope = cfg.model.hub == "modelscope"
    revision, remote = (hub.listing_modelscope(repo_id, None) if modelscope
                        else hub.listing_hf(repo_id, REVISION, rt.hf_endpoint))
    files = hub.select(remote)
    if not any(f.path.endswith(hub.WEIGHT_SUFFIXES) for f in files):
        raise hub.HubError(f"{repo_id} at {revision} has no *.safetensors or *.bin weights: name a model repository "
                           "in MODEL_NAME", code="hub_not_found")
    todo = hub.pending(hub.snapshot_of(cache, repo_id), files)
    disk = hub.check_disk(cache, sum(f.size for f in todo), repo_id)   # before anything is written
    ctx.log(f"{repo_id} at {revision}: {len(files)} files, {sum(f.size for f in files) / hub.GB:.2f} GB; {len(todo)} "
            f"to fetch ({disk['need_bytes'] / hub.GB:.2f} GB) into {cache}, {disk['free_bytes'] / hub.GB:.1f} GB free "
            f"on {disk['mount']}")
    patterns = hub.patterns_for([f.path for f in remote])
    if modelscope:
        resumed, snap = {}, hub.fetch_modelscope(repo_id, revision, cache, patterns)
    else:
        resumed = hub.resume_partials(repo_id, revision, cache, rt.hf_endpoint, todo, log=ctx.log)
        snap = hub.fetch_hf(repo_id, REVISION, cache, rt.hf_endpoint, patterns)
    return {"snapshot": snap, "expected": {f.path: f.sha256 for f in files}, "revision": snap.name, "disk": disk,
            "already_cached": sorted({f.path for f in files} - {f.path for f in todo}), "resumed": resumed}
