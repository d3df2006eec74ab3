"""Evidence helpers: hashes, atomic JSON writes, schema validation. Small on purpose."""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from importlib import resources
from pathlib import Path

SCHEMA_PKG = "pipeline.schemas"


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def leftover_temp(p: Path) -> bool:
    """A temp file of atomic_write_text (`.<name>.<random>.tmp`) that a kill left behind: never evidence."""
    return p.name.startswith(".") and p.name.endswith(".tmp")


def sha256_tree(folder: str | Path) -> dict[str, str]:
    """{relative path: sha256} of every file under `folder`, sorted (without atomic_write_text's leftovers)."""
    folder = Path(folder)
    return {p.relative_to(folder).as_posix(): sha256_file(p)
            for p in sorted(folder.rglob("*")) if p.is_file() and not leftover_temp(p)}


def sha256_tree_cached(folder: str | Path, cache: str | Path) -> dict[str, str]:
    """sha256_tree with the hashes kept in `cache` (a JSON file) across processes, keyed by each file's resolved
    path, size, mtime and inode: a fingerprint of a 15 GB base folder costs a stat per file once it is hashed.
    A changed file (any of the four) is re-read. An unreadable cache is ignored and rewritten; an unwritable one
    only costs the re-hash. For freshness only: the gate re-hashes what it checks."""
    folder, cache = Path(folder), Path(cache)
    known = read_json(cache)
    known = known if isinstance(known, dict) else {}
    out, changed = {}, False
    for p in sorted(folder.rglob("*")):
        if not p.is_file() or leftover_temp(p):
            continue
        st, key = p.stat(), str(p.resolve())
        stamp = [st.st_size, st.st_mtime_ns, st.st_ino]
        entry = known.get(key)
        if not (isinstance(entry, list) and entry[:3] == stamp and len(entry) == 4):
            entry, changed = [*stamp, sha256_file(p)], True
            known[key] = entry
        out[p.relative_to(folder).as_posix()] = entry[3]
    if changed:
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(cache, json.dumps(known, sort_keys=True))
        except OSError:
            pass
    return out


def verify_tree(folder: str | Path, recorded) -> tuple[dict[str, str], dict[str, list[str]]]:
    """Re-hash `folder` and compare it with a recorded {relpath: sha256}: (the hashes now, the differences as
    {"missing" | "extra" | "changed": [relpaths]}, only the non-empty ones; {} when the folder is as recorded)."""
    now = sha256_tree(folder)
    rec = recorded if isinstance(recorded, dict) else {}
    diff = {"missing": sorted(set(rec) - set(now)), "extra": sorted(set(now) - set(rec)),
            "changed": sorted(k for k in set(now) & set(rec) if now[k] != rec[k])}
    return now, {k: v for k, v in diff.items() if v}


def sha256_json(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def root_relative(root, path) -> str:
    """A path as evidence records it: posix, relative to the output root when it lies inside it, so a moved, copied
    or unpacked root keeps its evidence; anything else (a hub id, a folder elsewhere) as given."""
    full = Path(path)
    if not full.is_absolute() or not full.is_relative_to(root):
        return str(path)
    return full.relative_to(root).as_posix()


def portable(value, *roots):
    """`value` (a config part: str, dict, list) with every absolute path inside one of `roots` made relative to it
    (root_relative): what a fingerprint or a record compares never says where the root was."""
    if isinstance(value, dict):
        return {k: portable(v, *roots) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [portable(v, *roots) for v in value]
    if isinstance(value, str) and value.startswith("/"):
        for root in roots:
            if Path(value).is_relative_to(root):
                return root_relative(root, value)
    return value


def hash_paths(root: Path, paths) -> dict[str, str]:
    """{relpath: sha256} for files, and for each file inside folders (relpath/inner)."""
    out: dict[str, str] = {}
    for p in paths:
        full = Path(p) if Path(p).is_absolute() else root / p
        rel = root_relative(root, full)
        if full.is_dir():
            out.update({f"{rel}/{k}": v for k, v in sha256_tree(full).items()})
        elif full.is_file():
            out[rel] = sha256_file(full)
    return out


def atomic_write_text(path: str | Path, text: str) -> None:
    """Temp file in the same folder, fsync, os.replace: a reader sees the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=False, default=str) + "\n")


def read_json(path: str | Path):
    """The parsed JSON, or None when the file is missing or not valid JSON."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _registry_names(node):
    """Schemas name the registry's lists, never copy them: "@methods" / "@variants" become its current lists."""
    if isinstance(node, dict):
        return {k: _registry_names(v) for k, v in node.items()}
    if node in (["@methods"], ["@variants"]):
        from pipeline.stages import REGISTRY
        return list(REGISTRY.methods if node == ["@methods"] else REGISTRY.variants)
    if isinstance(node, list):
        return [_registry_names(v) for v in node]
    return node


def schema_file(name: str) -> dict:
    """One schema file as the validator sees it (the registry's names filled in), without the common part."""
    return _registry_names(json.loads(resources.files(SCHEMA_PKG).joinpath(f"{name}.schema.json").read_text()))


def load_schema(stage: str) -> dict:
    return _registry_names(_load_schema(stage))


def _load_schema(stage: str) -> dict:
    common = json.loads(resources.files(SCHEMA_PKG).joinpath("_common.schema.json").read_text())
    own_file = resources.files(SCHEMA_PKG).joinpath(f"{stage}.schema.json")
    if not own_file.is_file():
        return common
    own = json.loads(own_file.read_text())
    parts = [common, own]
    if "extends" in own:   # a shared schema for a family of stages (e.g. the four training stages)
        parts.append(json.loads(resources.files(SCHEMA_PKG).joinpath(f"{own.pop('extends')}.schema.json").read_text()))
    return {"allOf": parts}


def validate(stage: str, evidence: dict) -> list[str]:
    """Schema errors as sentences ('field: problem'); empty when valid."""
    import jsonschema
    validator = jsonschema.Draft202012Validator(load_schema(stage))
    return [f"{'.'.join(map(str, e.absolute_path)) or '<top>'}: {e.message}"
            for e in sorted(validator.iter_errors(evidence), key=lambda e: list(map(str, e.absolute_path)))]
