"""One archive to download before giving the rented machine back, and its check on any machine.

Run: python -m scripts.export pack [--out FILE]   (make export)
     python -m scripts.export verify FILE         (make verify-export FILE=...)
The archive holds reports/ and every checkpoints/**/final (never the intermediate checkpoint-N folders) under
one top folder, with MANIFEST.sha256 in `sha256sum` format: after extracting, `sha256sum -c MANIFEST.sha256`
inside the top folder checks it too. A checkpoints/<variant folder>/merged folder (make export-merged) goes in only
when reports/export/merge_parity.json records it as exported with these very files; verify checks that too.
"""
from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import io
import json
import os
import re
import sys
import tarfile
import tempfile
from pathlib import Path, PurePosixPath

MANIFEST = "MANIFEST.sha256"
ROOT_FILE = "EVIDENCE_ROOT"   # "<sha256>  <n> files: <scope>": pipeline/root_hash.py over the archive's files
INTERMEDIATE = re.compile(r"^checkpoint-\d+$")
PARITY = "reports/export/merge_parity.json"   # the export_merged stage's evidence


def _sha256_stream(f) -> str:
    h = hashlib.sha256()
    for chunk in iter(lambda: f.read(1 << 20), b""):
        h.update(chunk)
    return h.hexdigest()


def merged_record(parity_json: bytes | None) -> dict[str, str]:
    """{relpath: sha256} of every file of the merged folders the parity check passed (merge_parity.json)."""
    try:
        doc = json.loads(parity_json) if parity_json else {}
    except ValueError:
        doc = {}
    variants = doc.get("variants") if isinstance(doc, dict) else None
    return {f"{v['merged_dir']}/{k}": sha for v in (variants if isinstance(variants, dict) else {}).values()
            if isinstance(v, dict) and v.get("status") == "exported" and isinstance(v.get("files"), dict)
            for k, sha in v["files"].items()}


def merged_ok(root: Path, folder: Path, record: dict[str, str]) -> bool:
    """A merged folder goes in when its files are exactly those the parity check recorded as exported."""
    rel = folder.relative_to(root).as_posix()
    want = {k[len(rel) + 1:]: v for k, v in record.items() if k.startswith(rel + "/")}
    now = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                now[p.relative_to(folder).as_posix()] = _sha256_stream(f)
    if want and now == want:
        return True
    why = "changed since its parity check" if want else f"no passed parity check in {PARITY}"
    print(f"export: warning: {rel} left out ({why}): run `make export-merged`", file=sys.stderr)
    return False


def collect(root: Path) -> list[str]:
    """Relative paths (posix) of what goes in: reports/**, checkpoints/**/final/** and the merged folders that
    passed their parity check (checkpoints/**/merged/**), no temp files."""
    files, parity = [], root / PARITY
    record = merged_record(parity.read_bytes() if parity.is_file() else None)
    merged = {d for d in (root / "checkpoints").rglob("merged") if d.is_dir() and merged_ok(root, d, record)}
    for top in ("reports", "checkpoints"):
        for p in sorted((root / top).rglob("*")):
            rel = p.relative_to(root)
            if not p.is_file() or p.is_symlink() or p.name.endswith(".tmp"):
                continue
            if top == "checkpoints" and any(INTERMEDIATE.match(x) for x in rel.parts):
                continue
            if top == "checkpoints" and "final" not in rel.parts and not any(d in p.parents for d in merged):
                continue
            files.append(rel.as_posix())
    return files


def pack(root: Path, out: Path | None = None) -> Path:
    root = root.resolve()
    if not (root / "reports").is_dir():
        raise SystemExit(f"export: {root / 'reports'} does not exist: nothing to export (is PIPELINE_ROOT right?)")
    stamp = dt.datetime.now().strftime("%Y%m%d_%H%M%S")
    out = (out or root / "exports" / f"medllm_day1_{stamp}.tar.gz").resolve()
    top = out.name.removesuffix(".tar.gz").removesuffix(".tgz")
    files = collect(root)
    if not any(f.startswith("checkpoints/") for f in files):
        print("export: warning: no checkpoints/**/final folder found; the archive holds reports only", file=sys.stderr)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    try:
        hashes = {}
        with tarfile.open(tmp, "w:gz") as tar:
            for rel in files:
                with open(root / rel, "rb") as f:
                    hashes[rel] = _sha256_stream(f)
                tar.add(root / rel, arcname=f"{top}/{rel}", recursive=False)
            evidence_root = _root_of(hashes)
            text = f"{evidence_root['sha256']}  {evidence_root['files']} files: {evidence_root['scope']}\n".encode()
            _add_bytes(tar, f"{top}/{ROOT_FILE}", text)
            hashes[ROOT_FILE] = hashlib.sha256(text).hexdigest()
            _add_bytes(tar, f"{top}/{MANIFEST}", "".join(f"{sha}  {rel}\n" for rel, sha in hashes.items()).encode())
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    size_mb = out.stat().st_size / 2**20
    print(f"export: {len(files)} files ({size_mb:.1f} MB) -> {out}")
    print(f"export: evidence root sha256 {evidence_root['sha256']} over {evidence_root['files']} files (the hash the "
          "run summary and the thesis material quote; verify-export recomputes it from the archive)")
    return out


def _add_bytes(tar, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime = len(data), int(dt.datetime.now().timestamp())
    tar.addfile(info, io.BytesIO(data))


def _root_of(hashes: dict[str, str]) -> dict:
    from pipeline import root_hash
    from pipeline.stages import REGISTRY
    return root_hash.of_hashes({r: h for r, h in hashes.items() if r != ROOT_FILE}, REGISTRY)


def archive_root(archive: Path) -> str:
    """The evidence root recomputed from the archive's files (never read from its EVIDENCE_ROOT)."""
    with tarfile.open(archive, "r:gz") as tar:
        found = {m.name.split("/", 1)[1]: _sha256_stream(tar.extractfile(m)) for m in tar.getmembers()
                 if m.isfile() and "/" in m.name}
    return _root_of(found)["sha256"]


def verify(archive: Path) -> list[str]:
    """Problems as sentences (missing, changed, extra, unreadable); empty when the archive matches its manifest."""
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = tar.getmembers()
            manifests = [m for m in members if PurePosixPath(m.name).name == MANIFEST and len(PurePosixPath(m.name).parts) == 2]
            if len(manifests) != 1:
                return [f"{archive}: expected one <top>/{MANIFEST}, found {len(manifests)}: not an export of this pipeline"]
            top = PurePosixPath(manifests[0].name).parts[0]
            recorded = {}
            for n, line in enumerate(tar.extractfile(manifests[0]).read().decode().splitlines(), 1):
                sha, sep, rel = line.partition("  ")
                if not sep or not re.fullmatch(r"[0-9a-f]{64}", sha):
                    return [f"{archive}: {MANIFEST}:{n} is not '<sha256>  <path>': the manifest is damaged"]
                recorded[rel] = sha
            found, problems = {}, []
            for m in members:
                if m.name == manifests[0].name or m.isdir():
                    continue
                rel = m.name[len(top) + 1:] if m.name.startswith(top + "/") else m.name
                if not m.isfile():
                    problems.append(f"extra: {rel} is not a plain file")
                    continue
                found[rel] = _sha256_stream(tar.extractfile(m))
            parity = next((m for m in members if m.name == f"{top}/{PARITY}" and m.isfile()), None)
            record = merged_record(tar.extractfile(parity).read() if parity else None)
            root_member = next((m for m in members if m.name == f"{top}/{ROOT_FILE}" and m.isfile()), None)
            stated = tar.extractfile(root_member).read().decode(errors="replace").split() if root_member else None
    except (OSError, EOFError, tarfile.TarError) as exc:
        return [f"{archive}: cannot be read as a .tar.gz ({type(exc).__name__}: {exc}): download it again"]
    problems += [f"merged: {rel} is not a file of a merged folder that passed its parity check ({PARITY})"
                 for rel, sha in sorted(found.items())
                 if rel.startswith("checkpoints/") and "merged" in PurePosixPath(rel).parts and record.get(rel) != sha]
    problems += [f"missing: {rel}" for rel in sorted(set(recorded) - set(found))]
    problems += [f"changed: {rel}" for rel in sorted(set(recorded) & set(found)) if recorded[rel] != found[rel]]
    problems += [f"extra: {rel}" for rel in sorted(set(found) - set(recorded))]
    if stated is not None and (not stated or stated[0] != _root_of(found)["sha256"]):
        problems.append(f"{ROOT_FILE} states {(stated or ['nothing'])[0][:12]}, but the archive's files give "
                        f"{_root_of(found)['sha256'][:12]}: the archive was changed after it was packed")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.export", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_pack = sub.add_parser("pack", help="archive reports/ and every checkpoints/**/final with a sha256 manifest")
    p_pack.add_argument("--out", type=Path, help="archive path (default: <root>/exports/medllm_day1_<time>.tar.gz)")
    p_verify = sub.add_parser("verify", help="check an archive against its manifest")
    p_verify.add_argument("file", type=Path)
    args = parser.parse_args(argv)
    if args.cmd == "pack":
        from pipeline.settings import ConfigError, load_config
        try:
            root = Path(load_config().root)
        except ConfigError as exc:
            raise SystemExit(f"export: config error: {exc}") from None
        out = pack(root, args.out)
        problems = verify(out)   # read it back once: what is downloaded is what was checked
        if problems:
            print(f"export: the new archive does not verify: {'; '.join(problems[:5])}", file=sys.stderr)
            return 1
        print(f"export: verified. On another machine: python -m scripts.export verify {out.name}")
        return 0
    if not args.file or not args.file.is_file():
        print(f"verify: {args.file} is not a file: pass the archive, e.g. make verify-export FILE=path/to/export.tar.gz",
              file=sys.stderr)
        return 2
    problems = verify(args.file)
    for p in problems:
        print(f"verify: {p}", file=sys.stderr)
    if problems:
        print(f"verify: {args.file} does NOT match its manifest ({len(problems)} problem(s))", file=sys.stderr)
        return 1
    print(f"verify: {args.file} matches its manifest; evidence root sha256 {archive_root(args.file)} (compare it with "
          "the hash the thesis quotes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
