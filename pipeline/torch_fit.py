"""Does the torch this Python already has fit our pinned stack, the GPUs and the driver?  `make venv` asks:
    python -m pipeline.torch_fit [--auto] [--pin 2.13.0] [--index-url URL] [--constraint FILE] [--plan-only]
    python -m pipeline.torch_fit --probe configs/probes/v100x2_32g.json --plan-only   # what it decides there
decide() is a pure function of plain values (the tests feed it recorded probes): reuse the torch, install one
(none yet, or TORCH_AUTO_INSTALL=true), or stop with one sentence that names the fix for this driver.
Nothing here imports torch: its facts come from a child process, the GPUs and the driver from nvidia-smi.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from dataclasses import dataclass, field

from pipeline.hardware import _nvidia_smi, arch_supported
from pipeline.probe_files import load_probe_file

# The oldest torch the pinned stack (requirements.txt) runs on: transformers 5.24 turns torch off below 2.6
# (transformers/utils/import_utils.py:206, and `torch>=2.6` in its [torch] extra); the others ask less
# (bitsandbytes 0.50.2 torch>=2.4,<3; accelerate 1.15 torch>=2.0; peft 0.21 torch>=1.13; trl 1.16 none).
# tests/unit/test_torch_fit.py re-reads their Requires-Dist, so a requirements bump cannot leave these stale.
TORCH_MIN = (2, 6, 0, 1)        # parse_version("2.6.0"): 2.6.0a0 is below it
TORCH_BELOW = (3, 0, 0, 1)
MIN_WHY = "transformers 5.24 turns torch off below 2.6"

# The newest CUDA a Linux driver runs: the minimum driver of each toolkit's GA release, from NVIDIA's CUDA
# Toolkit Release Notes, Table 3 "CUDA Toolkit and Corresponding Driver Versions" (Linux x86_64)
# https://docs.nvidia.com/cuda/cuda-toolkit-release-notes/index.html (nvidia-smi prints it as "CUDA Version").
DRIVER_CUDA = [("580.65.06", "13.0"), ("575.51.03", "12.9"), ("570.26", "12.8"), ("560.28.03", "12.6"),
               ("555.42.02", "12.5"), ("550.54.14", "12.4"), ("545.23.06", "12.3"), ("535.54.03", "12.2"),
               ("530.30.02", "12.1"), ("525.60.13", "12.0"), ("520.61.05", "11.8"), ("515.43.04", "11.7"),
               ("510.39.01", "11.6"), ("495.29.05", "11.5"), ("470.42.01", "11.4"), ("465.19.01", "11.3"),
               ("460.27.03", "11.2"), ("455.23", "11.1"), ("450.36.06", "11.0")]
# An image's torch built for a newer minor of the driver's own CUDA major still runs (CUDA minor version
# compatibility, same release notes, from 525.60.13 for 12.x and 450.80.02 for 11.x): it is reused, with a note.
# A torch we install comes from an index the driver supports fully.

CLASSIC = ["sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90"]   # cu118-cu126 builds
NEW = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"]


@dataclass(frozen=True)
class WheelIndex:
    """A PyTorch wheel index: its CUDA, the first and last torch published there (None: still published, so the
    pinned one), and the GPU arches its builds carry from a torch version on."""
    tag: str
    oldest: str
    newest: str | None
    arches: tuple = (("0.0", CLASSIC),)

    @property
    def url(self) -> str:
        return f"https://download.pytorch.org/whl/{self.tag}"

    @property
    def cuda(self) -> str:
        return f"{self.tag[2:-1]}.{self.tag[-1]}"

    def arch_list(self, version: tuple) -> list[str]:
        return [arches for since, arches in self.arches if version >= parse_version(since)][-1]


# Newest first. cu129/cu130 are never chosen: our probes and tests cover cu126/cu128, and cu128 builds run on
# newer drivers. cu128 builds: 2.7 had no sm_70, 2.8-2.10 brought Volta back, 2.11 dropped it again
# (pytorch/pytorch #157517 and #172352, bitsandbytes #1715); cu126 keeps sm_50-sm_90. Last torch published:
# cu118 2.7.1, cu121 2.5.1, cu124 2.6.0 (download.pytorch.org; not re-checked online from here).
INDEXES = [WheelIndex("cu128", "2.7.0", None, (("2.7", NEW), ("2.8", ["sm_70"] + NEW), ("2.11", NEW))),
           WheelIndex("cu126", "2.6.0", None), WheelIndex("cu124", "2.4.0", "2.6.0"),
           WheelIndex("cu121", "2.1.0", "2.5.1"), WheelIndex("cu118", "2.0.0", "2.7.1")]

VERSION_RE = re.compile(r"^(\d+)\.(\d+)(?:\.(\d+))?(.*)$")


def parse_version(text: str) -> tuple:
    """(major, minor, patch, final) of a torch or driver version; a pre-release (2.6.0a0+nv25.01) sorts below
    its release, as packaging (and so transformers) sorts it. An unreadable one: ValueError."""
    m = VERSION_RE.match(str(text).strip())
    if not m:
        raise ValueError(f"{text!r} is not a version")
    tail = m.group(4).split("+")[0]
    final = 0 if re.match(r"\.?(a|b|rc|dev)", tail) else 1
    return int(m.group(1)), int(m.group(2)), int(m.group(3) or 0), final


def shown(version: tuple) -> str:
    return ".".join(map(str, version[:3]))


def driver_cuda(driver: str | None, smi_cuda: str | None = None) -> str | None:
    """The newest CUDA the driver runs: what nvidia-smi says, else NVIDIA's table."""
    if smi_cuda:
        return smi_cuda
    try:
        have = parse_version(driver)
    except ValueError:      # no driver, or nvidia-smi printed "[N/A]"
        return None
    return next((cuda for need, cuda in DRIVER_CUDA if have >= parse_version(need)), None)


def min_driver(cuda: str) -> str:
    return next(need for need, c in DRIVER_CUDA if c == cuda)


@dataclass
class Fit:
    """reuse | install | stop, with what is wrong (problem), why this build (why) and the build to install."""
    action: str
    problem: str = ""
    why: str = ""
    spec: str | None = None
    index_url: str | None = None
    notes: list = field(default_factory=list)

    def argv(self, python: str) -> list[str]:
        """pip's command; PIP_INDEX_URL/PIP_EXTRA_INDEX_URL/PIP_TRUSTED_HOST reach it through the environment."""
        index = ["--index-url", self.index_url] if self.index_url else []
        return [python, "-m", "pip", "install", self.spec, *index]

    def fix(self) -> str:
        index = f" TORCH_INDEX_URL={self.index_url}" if self.index_url else ""
        return f"TORCH_SPEC={self.spec}{index} TORCH_REINSTALL=true make venv"

    def message(self) -> str:
        where = self.index_url or "the default index"
        if self.action == "reuse":
            return "; ".join([self.why] + self.notes)
        if self.action == "install":
            return f"{self.problem}: installing {self.spec} from {where} ({self.why})"
        if not self.spec:
            return f"{self.problem}, and {self.why}; nothing was installed"
        return (f"{self.problem}; {self.why}: run `{self.fix()}` (or `TORCH_AUTO_INSTALL=true make venv`, which "
                "does the same); nothing was installed")


def _gpus_text(gpus: list[dict]) -> str:
    """The GPUs as a user reads them: one kind counted ("2x Tesla V100-SXM2-32GB (sm_70)"), kinds joined by +."""
    kinds = {}
    for g in gpus:
        sm = "sm_{}{}".format(*g["capability"]) if g.get("capability") else "sm unknown"
        kinds[f"{g['name']} ({sm})"] = kinds.get(f"{g['name']} ({sm})", 0) + 1
    return " + ".join(f"{n}x {k}" if n > 1 else k for k, n in kinds.items())


def _version_on(idx: WheelIndex, pin: tuple) -> tuple | None:
    """The torch we would take from idx: the pin, or the newest one published there; None if below TORCH_MIN."""
    version = min(pin, parse_version(idx.newest)) if idx.newest else pin
    ok = version >= parse_version(idx.oldest) and TORCH_MIN <= version < TORCH_BELOW
    return version if ok else None


def pick_index(gpus: list[dict], driver: str | None, max_cuda: str | None, pin: tuple):
    """(index, torch version, why) of the newest index the driver runs that has a torch >= TORCH_MIN with kernels
    for every GPU, or (None, None, why not and what to do)."""
    caps = [g["capability"] for g in gpus if g.get("capability")]
    lacking, need_driver = [], []
    for idx in INDEXES:
        version = _version_on(idx, pin)
        if version is None:
            continue
        runs = bool(max_cuda) and parse_version(max_cuda) >= parse_version(idx.cuda)
        if not all(arch_supported(c, idx.arch_list(version)) for c in caps):
            if runs:
                lacking.append(f"{idx.tag} builds of torch {shown(version)}")
        elif not runs:
            need_driver.append(idx)
        else:
            why = (f"driver {driver} runs CUDA up to {max_cuda}, so the newest PyTorch index for it with a "
                   f"torch >= {shown(TORCH_MIN)} for {_gpus_text(gpus)} is {idx.tag} (torch {shown(version)})")
            return idx, version, why + (f"; {', '.join(lacking)} have no kernels for them" if lacking else "")
    wanted = f"torch >= {shown(TORCH_MIN)} with kernels for {_gpus_text(gpus)}"
    if need_driver:
        idx = need_driver[-1]
        return None, None, (f"driver {driver} runs CUDA up to {max_cuda or '(unknown)'}, too old for every "
                            f"{wanted}: upgrade the NVIDIA driver to >= {min_driver(idx.cuda)} (CUDA {idx.cuda}, "
                            f"the {idx.tag} index), then run make venv")
    return None, None, (f"no PyTorch wheel index we know has a {wanted}: install one by hand "
                        "(TORCH_SPEC, TORCH_INDEX_URL, TORCH_REINSTALL=true make venv)")


def problems(torch: dict, gpus: list[dict], max_cuda: str | None) -> tuple[list[str], list[str]]:
    """(what stops this torch, notes) on these GPUs and this driver."""
    v, cuda = torch.get("version"), torch.get("cuda")
    if torch.get("error"):
        return [f"the torch of this Python does not import ({torch['error']})"], []
    have = parse_version(v)
    bad, notes = [], []
    if have < TORCH_MIN:
        bad.append(f"torch {v} is older than the torch >= {shown(TORCH_MIN)} our pinned stack needs ({MIN_WHY})")
    elif have >= TORCH_BELOW:
        bad.append(f"torch {v} is newer than our pinned stack takes (bitsandbytes 0.50.2 needs torch < "
                   f"{shown(TORCH_BELOW)})")
    if not gpus:
        return bad, notes
    if not cuda:
        return bad + [f"torch {v} is a CPU build and nvidia-smi sees {_gpus_text(gpus)}"], notes
    if max_cuda and parse_version(cuda) > parse_version(max_cuda):
        if cuda.split(".")[0] != max_cuda.split(".")[0]:
            bad.append(f"torch {v} was built for CUDA {cuda} and the driver runs CUDA up to {max_cuda}")
        else:
            notes.append(f"built for CUDA {cuda} on a driver for CUDA {max_cuda}: runs through CUDA minor "
                         "version compatibility")
    arch = torch.get("arch_list") or []
    missing = [g for g in gpus if g.get("capability") and not arch_supported(g["capability"], arch)]
    if missing:
        bad.append(f"torch {v} has kernels for {', '.join(arch) or 'no GPU arch'}, "
                   f"none for {_gpus_text(missing)}")
    return bad, notes


def decide(torch: dict | None, gpus: list[dict], driver: str | None, smi_cuda: str | None = None, *,
           pin: str = "2.13.0", index_url: str | None = None, auto: bool = False) -> Fit:
    """torch: {version, cuda, arch_list} of this Python (None: no torch; error: it does not import); gpus:
    [{name, capability}] from nvidia-smi; driver: its version; smi_cuda: its "CUDA Version" when known; pin: the
    torch version to install (TORCH_SPEC); index_url: TORCH_INDEX_URL, used only when there is no torch yet."""
    max_cuda = driver_cuda(driver, smi_cuda)
    if torch is not None:
        bad, notes = problems(torch, gpus, max_cuda)
        if not bad:
            where = f"{_gpus_text(gpus)} on driver {driver} (CUDA up to {max_cuda})" if gpus else "no GPU"
            build = f"CUDA {torch['cuda']}" if torch.get("cuda") else "a CPU build"
            return Fit("reuse", why=(f"torch {torch['version']} ({build}) fits the pinned stack (torch >= "
                                     f"{shown(TORCH_MIN)}) and this machine ({where}): reused"), notes=notes)
        problem = "; ".join(bad)
    else:
        problem = "no torch yet"
        if index_url or not gpus:
            why = "TORCH_SPEC from TORCH_INDEX_URL, as asked" if index_url else "no GPU: TORCH_SPEC as it is"
            return Fit("install", problem, why, spec=f"torch=={pin}", index_url=index_url)
    pinned = parse_version(pin)
    if not gpus:
        target = Fit("install", problem, "no GPU: the pinned torch", spec=f"torch=={shown(pinned)}")
    else:
        idx, version, why = pick_index(gpus, driver, max_cuda, pinned)
        if idx is None:
            return Fit("stop", problem, why)
        target = Fit("install", problem, why, spec=f"torch=={shown(version)}+{idx.tag}", index_url=idx.url)
    if torch is None or auto:
        target.problem += " (TORCH_AUTO_INSTALL=true)" if torch is not None else ""
        return target
    target.action = "stop"
    return target


# ---------------------------------------------------------------- facts: a recorded probe, or this machine
TORCH_FACTS = ("import json, importlib.metadata as md, torch\n"
               "flags = getattr(torch._C, '_cuda_getArchFlags', None) if torch.version.cuda else None\n"
               "arch = (flags() or '').split() if flags else []\n"   # get_arch_list() is [] without a device
               "print(json.dumps({'version': md.version('torch'), 'cuda': torch.version.cuda, "
               "'arch_list': arch}))")


def torch_facts(python: str) -> dict | None:
    """{version, cuda, arch_list} of `python`'s torch, None when it has none, {error} when it does not import."""
    try:
        out = subprocess.run([python, "-c", TORCH_FACTS], capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.SubprocessError) as e:
        return {"version": None, "error": f"{type(e).__name__}: {e}"}
    if out.returncode == 0 and out.stdout.strip():
        return json.loads(out.stdout.strip().splitlines()[-1])
    if "No module named 'torch'" in out.stderr:
        return None
    return {"version": None, "error": (out.stderr.strip().splitlines() or ["no output"])[-1][:300]}


def live_facts(python: str) -> dict:
    """decide()'s inputs on this machine: `python`'s torch, nvidia-smi's GPUs, driver and "CUDA Version"."""
    rows = _nvidia_smi()["rows"]
    gpus = [{"name": r.get("name"), "capability": [int(x) for x in r["compute_cap"].split(".")]
             if re.match(r"^\d+\.\d+$", r.get("compute_cap") or "") else None} for r in rows]
    banner = None
    if rows:
        try:
            banner = re.search(r"CUDA Version:\s*(\d+\.\d+)",
                               subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30).stdout)
        except (OSError, subprocess.SubprocessError):
            banner = None
    return {"torch": torch_facts(python), "gpus": gpus, "smi_cuda": banner.group(1) if banner else None,
            "driver": rows[0].get("driver_version") if rows else None}


def probe_facts(path: str) -> dict:
    """decide()'s inputs from a recorded probe (configs/probes/*.json); a bad file: a one-line ValueError."""
    p = load_probe_file(path)
    torch = {"version": p["torch_version"], "cuda": p["torch_cuda_build"], "arch_list": p["torch_arch_list"]}
    return {"torch": torch,
            "gpus": [{"name": d["name"], "capability": d["capability"]} for d in p["devices"]],
            "driver": p["driver"], "smi_cuda": p.get("driver_cuda")}


def install(fit: Fit, python: str) -> int:
    """Run pip for `fit`; the environment is inherited as it is (PIP_INDEX_URL and friends pass through)."""
    print(f"bootstrap: {' '.join(fit.argv(python))}", flush=True)
    return subprocess.run(fit.argv(python)).returncode


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.torch_fit", description=__doc__.splitlines()[0])
    ap.add_argument("--pin", default="2.13.0", help="the torch version to install (TORCH_SPEC without torch==)")
    ap.add_argument("--index-url", default=None, help="TORCH_INDEX_URL: where a first torch comes from")
    ap.add_argument("--auto", action="store_true", help="TORCH_AUTO_INSTALL=true: install the fitting torch")
    ap.add_argument("--probe", default=None, help="decide for a recorded probe (configs/probes/*.json)")
    ap.add_argument("--constraint", default=None, help="write torch==<the kept version> here, for pip -c")
    ap.add_argument("--plan-only", action="store_true", help="install nothing; exit 0 reuse, 3 install, 2 stop")
    a = ap.parse_args(argv)
    try:
        parse_version(a.pin)
    except ValueError:
        print(f"bootstrap: TORCH_SPEC={a.pin} is not torch==VERSION: the torch check installs an exact version; "
              "use e.g. TORCH_SPEC=torch==2.13.0", file=sys.stderr)
        return 2
    try:
        facts = probe_facts(a.probe) if a.probe else live_facts(sys.executable)
    except ValueError as e:
        print(f"bootstrap: {e}", file=sys.stderr)
        return 2
    fit = decide(**facts, pin=a.pin, index_url=a.index_url, auto=a.auto)
    print(f"bootstrap: {fit.message()}", file=sys.stderr if fit.action == "stop" else sys.stdout, flush=True)
    if a.plan_only or fit.action == "stop":
        return {"reuse": 0, "install": 3, "stop": 2}[fit.action]
    if fit.action == "install":
        rc = install(fit, sys.executable)
        if rc:
            print(f"bootstrap: pip could not install {fit.spec} (exit {rc}, its message is above): check the "
                  "network or your mirror (PIP_INDEX_URL, TORCH_INDEX_URL), then run make venv again",
                  file=sys.stderr)
            return rc
        facts["torch"] = torch_facts(sys.executable)
        fit = decide(**facts, pin=a.pin)
        if fit.action != "reuse":
            print(f"bootstrap: the torch just installed does not fit either: {fit.message()}", file=sys.stderr)
            return 2
        print(f"bootstrap: {fit.message()}", flush=True)
    if a.constraint:
        with open(a.constraint, "w", encoding="utf-8") as f:
            f.write(f"torch=={facts['torch']['version']}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
