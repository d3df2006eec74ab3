"""One hash over what a thesis quotes (issue 14 §2): the evidence of every training method and of the stages the
reports are built from (eval, judge: their predictions and judgments are covered by the hashes they record), and
every file of every checkpoints/**/final. A consistent forgery (every hash recomputed with the pipeline's own
functions) cannot be stopped without an anchor outside the root; this is that anchor: the summary and the thesis
material quote it, `make export` records it in the archive (EVIDENCE_ROOT) and prints it, and verify-export
recomputes it from the archive's files, so a reader compares the hash in a thesis with the archive.

Paths are root-relative, so a moved or copied root, or an unpacked export, has the same root hash. Machine
evidence (gpu_check re-probes on another boot), logs and the reports that quote the hash stay outside it.
"""
from __future__ import annotations

from fnmatch import fnmatch
from pathlib import Path, PurePosixPath

from pipeline import evidence as ev

SCOPE = ("the evidence of every training method and of the stages the reports are built from, and every file of "
         "every checkpoints/**/final")


def patterns(registry) -> list[str]:
    """The evidence files inside the root hash, as globs ({slug} -> *): the methods' and the reports' needs."""
    names = [s.name for s in registry.stages if s.method] + [n for n in registry["reports"].needs]
    return [registry[n].evidence_path.replace("{slug}", "*") for n in dict.fromkeys(names)]


def _final_file(rel: str) -> bool:
    parts = PurePosixPath(rel).parts
    return len(parts) > 2 and parts[0] == "checkpoints" and "final" in parts[1:-1] \
        and not any(".stale" in p for p in parts)


def selected(rels, registry) -> list[str]:
    pats = patterns(registry)
    return sorted(r for r in rels if _final_file(r) or any(fnmatch(r, p) for p in pats))


def of_hashes(hashes: dict[str, str], registry) -> dict:
    """{"sha256", "files", "scope"} over {root-relative path: sha256}."""
    chosen = selected(hashes, registry)
    return {"sha256": ev.sha256_json({r: hashes[r] for r in chosen}), "files": len(chosen), "scope": SCOPE}


def of_root(root: Path, registry) -> dict:
    root = Path(root)
    rels = [p.relative_to(root).as_posix() for top in ("reports", "checkpoints") if (root / top).is_dir()
            for p in (root / top).rglob("*") if p.is_file() and not p.is_symlink() and not p.name.endswith(".tmp")]
    return of_hashes({r: ev.sha256_file(root / r) for r in selected(rels, registry)}, registry)


def problems(root: Path, registry, quoted) -> list[str]:
    """Why a quoted root hash is not this root's (empty when it is)."""
    if not isinstance(quoted, dict) or not isinstance(quoted.get("sha256"), str):
        return ["records no evidence_root (written before the field: re-run the reports stage)"]
    now = of_root(root, registry)
    if quoted["sha256"] != now["sha256"]:
        return [f"quotes evidence root {quoted['sha256'][:12]} over {quoted.get('files')} files, but the root's is "
                f"{now['sha256'][:12]} over {now['files']}: evidence or a final changed after the reports were written "
                "(re-run the reports stage)"]
    return []
