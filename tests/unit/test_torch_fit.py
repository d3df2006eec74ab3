"""`make venv`'s torch check (pipeline/torch_fit.py, scripts/bootstrap_venv.sh): the decision table on recorded
probes (configs/probes/*.json, changed into the AutoDL images users rent), TORCH_AUTO_INSTALL with pip mocked,
and the shell's wiring with fake interpreters. Nothing is downloaded."""
import json
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from pipeline import torch_fit as tf

REPO = Path(tf.__file__).resolve().parents[1]
PROBES = REPO / "configs" / "probes"
SHIPPED = sorted(p.name for p in PROBES.glob("*.json"))
CU118 = ["sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90"]   # also cu121, cu124, cu126
CU128 = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"]
INDEX = "https://download.pytorch.org/whl/"


def recorded(tmp_path, base, **over):
    """A shipped probe with some fields changed (... removes one), written where the test can read it."""
    doc = json.loads((PROBES / base).read_text())
    doc.update(over)
    doc = {k: v for k, v in doc.items() if v is not ...}
    path = tmp_path / f"{base[:-5]}_{len(list(tmp_path.glob('*.json')))}.json"
    path.write_text(json.dumps(doc))
    return path


def fit_for(path, **kw):
    return tf.decide(**tf.probe_facts(path), **kw)


def autodl(tmp_path, base="a100_40g.json", torch="2.1.2+cu118", cuda="11.8", arch=CU118, driver="525.105.17",
           **over):
    """An AutoDL-style image: an older torch preinstalled, an older driver, no "CUDA Version" recorded."""
    return recorded(tmp_path, base, torch_version=torch, cuda_runtime=cuda, torch_arch_list=arch, driver=driver,
                    driver_cuda=..., **over)


# ---------------------------------------------------------------- what the pinned stack needs
def test_the_torch_bounds_are_what_the_pinned_stack_asks_for():
    """Every torch requirement of the packages requirements.txt pins (with the extras we use), read from their
    installed metadata: the highest lower bound is TORCH_MIN, the lowest upper bound TORCH_BELOW."""
    pinned = [line.split("==")[0] for line in (REPO / "requirements.txt").read_text().splitlines()
              if "==" in line and not line.startswith("#")]
    lows, highs = [], []
    for pkg in pinned:
        for text in metadata.requires(pkg) or []:
            req = Requirement(text)
            if req.name != "torch" or (req.marker and not req.marker.evaluate({"extra": "torch"})):
                continue
            lows += [Version(s.version) for s in req.specifier if s.operator == ">="]
            highs += [Version(s.version) for s in req.specifier if s.operator == "<"]
    assert lows, "no torch requirement found: the metadata read is broken"
    assert tf.parse_version(max(lows).base_version + ".0") == tf.TORCH_MIN     # ">=2.6" -> (2, 6, 0, final)
    assert tf.parse_version(min(highs).base_version + ".0") == tf.TORCH_BELOW


@pytest.mark.parametrize("driver,cuda", [("525.105.17", "12.0"), ("520.61.05", "11.8"), ("520.61.04", "11.7"),
                                         ("550.54.14", "12.4"), ("550.40.07", "12.3"), ("570.124.06", "12.8"),
                                         ("560.35.05", "12.6"), ("535.104.05", "12.2"), ("[N/A]", None)])
def test_the_driver_table_gives_the_newest_cuda_it_runs(driver, cuda):
    assert tf.driver_cuda(driver) == cuda


def test_nvidia_smis_cuda_version_is_taken_over_the_table():
    assert tf.driver_cuda("599.01", "13.1") == "13.1"


# ---------------------------------------------------------------- the decision table
def test_a_cpu_box_with_a_cpu_torch_reuses_it():
    fit = tf.decide({"version": "2.13.0+cpu", "cuda": None, "arch_list": []}, [], None)
    assert fit.action == "reuse" and "2.13.0+cpu" in fit.message() and "no GPU" in fit.message()


def test_a_cpu_box_with_an_old_cpu_torch_stops_with_the_pinned_torch():
    fit = tf.decide({"version": "2.1.0+cpu", "cuda": None, "arch_list": []}, [], None)
    assert fit.action == "stop" and fit.fix() == "TORCH_SPEC=torch==2.13.0 TORCH_REINSTALL=true make venv"


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_probe_keeps_its_torch(name):
    fit = fit_for(PROBES / name)
    assert fit.action == "reuse", fit.message()


def test_autodl_torch_21_cu118_on_an_a100_with_driver_525_stops_with_the_cu118_command(tmp_path):
    fit = fit_for(autodl(tmp_path))
    msg = fit.message()
    assert fit.action == "stop" and "\n" not in msg
    assert (fit.spec, fit.index_url) == ("torch==2.7.1+cu118", INDEX + "cu118")
    for part in ("torch 2.1.2+cu118 is older than the torch >= 2.6.0", "driver 525.105.17 runs CUDA up to 12.0",
                 f"`TORCH_SPEC=torch==2.7.1+cu118 TORCH_INDEX_URL={INDEX}cu118 TORCH_REINSTALL=true make venv`",
                 "`TORCH_AUTO_INSTALL=true make venv`", "nothing was installed"):
        assert part in msg, msg


def test_torch_25_cu121_on_an_rtx4090_with_driver_550_is_below_our_minimum_and_gets_cu124(tmp_path):
    fit = fit_for(autodl(tmp_path, "rtx4090_24g.json", "2.5.1+cu121", "12.1", driver="550.54.15"))
    assert fit.action == "stop" and "older than the torch >= 2.6.0" in fit.problem
    assert (fit.spec, fit.index_url) == ("torch==2.6.0+cu124", INDEX + "cu124")
    early = fit_for(autodl(tmp_path, "rtx4090_24g.json", "2.5.1+cu121", "12.1", driver="550.40.07"))
    assert early.spec == "torch==2.7.1+cu118"    # 12.3: cu124 not yet, cu121 stops at 2.5.1


def test_a_v100_with_a_cu128_torch_lacking_sm70_stops_naming_sm70_and_a_build_that_has_it(tmp_path):
    path = recorded(tmp_path, "v100x2_32g.json", torch_version="2.13.0+cu128", cuda_runtime="12.8",
                    torch_arch_list=CU128, driver="570.124.06", driver_cuda="12.8")
    fit = fit_for(path)
    assert fit.action == "stop" and "none for 2x Tesla V100-SXM2-32GB (sm_70)" in fit.problem
    assert (fit.spec, fit.index_url) == ("torch==2.13.0+cu126", INDEX + "cu126")
    assert "cu128 builds of torch 2.13.0 have no kernels for them" in fit.message()
    older = fit_for(recorded(tmp_path, "v100x2_32g.json", torch_version="2.13.0+cu128", cuda_runtime="12.8",
                             torch_arch_list=CU128, driver="550.54.15", driver_cuda=...))
    assert (older.spec, older.index_url) == ("torch==2.6.0+cu124", INDEX + "cu124")
    volta_cu128 = fit_for(path, pin="2.9.1")     # cu128 builds of 2.8-2.10 still had sm_70
    assert volta_cu128.spec == "torch==2.9.1+cu128"


@pytest.mark.parametrize("base", ["h100_80g.json", "a100_80g.json"])
def test_hopper_and_ampere_on_driver_570_get_cu128(tmp_path, base):
    fit = fit_for(autodl(tmp_path, base, "2.5.1+cu124", "12.4", driver="570.124.06"))
    assert (fit.action, fit.spec, fit.index_url) == ("stop", "torch==2.13.0+cu128", INDEX + "cu128")


def test_a_mixed_box_needs_a_build_for_every_gpu(tmp_path):
    devices = json.loads((PROBES / "a100_80g.json").read_text())["devices"] + \
        json.loads((PROBES / "v100x2_32g.json").read_text())["devices"][:1]
    fit = fit_for(autodl(tmp_path, devices=devices, driver="570.124.06"))
    assert fit.index_url == INDEX + "cu126"


def test_a_driver_too_old_for_every_build_says_to_upgrade_it(tmp_path):
    fit = fit_for(autodl(tmp_path, driver="510.47.03"), auto=True)
    msg = fit.message()
    assert fit.action == "stop" and fit.spec is None and "\n" not in msg
    assert "driver 510.47.03 runs CUDA up to 11.6" in msg and "upgrade the NVIDIA driver to >= 520.61.05" in msg


def test_a_blackwell_gpu_needs_the_driver_for_cu128():
    fit = tf.decide(None, [{"name": "NVIDIA RTX PRO 6000", "capability": [12, 0]}], "560.35.05")
    assert fit.action == "stop" and "upgrade the NVIDIA driver to >= 570.26" in fit.message()


def test_a_cpu_torch_on_a_gpu_box_is_named():
    facts = tf.probe_facts(PROBES / "a100_40g.json")     # a probe file records a CUDA torch only
    facts["torch"] = {"version": "2.13.0+cpu", "cuda": None, "arch_list": []}
    fit = tf.decide(**facts)
    assert fit.action == "stop" and "is a CPU build and nvidia-smi sees NVIDIA A100-SXM4-40GB" in fit.problem
    assert fit.index_url == INDEX + "cu128"


def test_a_torch_for_a_newer_cuda_major_than_the_driver_stops_but_a_newer_minor_runs(tmp_path):
    cu130 = fit_for(autodl(tmp_path, torch="2.13.0+cu130", cuda="13.0", arch=CU128, driver="570.124.06"))
    assert cu130.action == "stop" and "built for CUDA 13.0 and the driver runs CUDA up to 12.8" in cu130.problem
    minor = fit_for(autodl(tmp_path, torch="2.6.0+cu124", cuda="12.4", driver="535.104.05"))
    assert minor.action == "reuse" and "CUDA minor version compatibility" in minor.message()


def test_a_pre_release_torch_sorts_below_its_release_as_transformers_sorts_it(tmp_path):
    fit = fit_for(autodl(tmp_path, torch="2.6.0a0+ecf3bae40a.nv25.01", cuda="12.8", arch=CU128,
                         driver="570.124.06"))
    assert fit.action == "stop" and "older than" in fit.problem


def test_with_no_torch_yet_one_is_installed_without_asking():
    a100 = [{"name": "NVIDIA A100-SXM4-40GB", "capability": [8, 0]}]
    fit = tf.decide(None, a100, "525.105.17")
    assert (fit.action, fit.spec, fit.index_url) == ("install", "torch==2.7.1+cu118", INDEX + "cu118")
    cpu = tf.decide(None, [], None)
    assert (cpu.action, cpu.spec, cpu.index_url) == ("install", "torch==2.13.0", None)
    mine = tf.decide(None, a100, "525.105.17", index_url="https://mirror.example/cu118", pin="2.7.1")
    assert (mine.spec, mine.index_url) == ("torch==2.7.1", "https://mirror.example/cu118")


def test_auto_turns_the_stop_into_the_same_install(tmp_path):
    stop, auto = fit_for(autodl(tmp_path)), fit_for(autodl(tmp_path), auto=True)
    assert (auto.action, auto.spec, auto.index_url) == ("install", stop.spec, stop.index_url)
    assert "TORCH_AUTO_INSTALL=true" in auto.message()


# ---------------------------------------------------------------- the CLI: TORCH_AUTO_INSTALL with pip mocked
@pytest.fixture
def fake_pip(monkeypatch):
    """subprocess.run in torch_fit recorded; what its child would see as environment kept with each call."""
    calls = []

    def run(argv, **kw):
        calls.append({"argv": list(argv), "env": dict(kw.get("env") or os.environ)})
        return subprocess.CompletedProcess(argv, 0)
    monkeypatch.setattr(tf.subprocess, "run", run)
    return calls


def test_auto_install_runs_pip_with_the_index_and_the_users_mirror_survives(tmp_path, fake_pip, monkeypatch,
                                                                             capsys):
    monkeypatch.setenv("PIP_INDEX_URL", "https://pypi.tuna.tsinghua.edu.cn/simple")
    monkeypatch.setenv("PIP_TRUSTED_HOST", "pypi.tuna.tsinghua.edu.cn")
    after = {"version": "2.7.1+cu118", "cuda": "11.8", "arch_list": CU118}
    monkeypatch.setattr(tf, "torch_facts", lambda python: after)
    constraint = tmp_path / "c.txt"
    rc = tf.main(["--auto", "--probe", str(autodl(tmp_path)), "--constraint", str(constraint)])
    assert rc == 0, capsys.readouterr().err
    assert [c["argv"] for c in fake_pip] == [[sys.executable, "-m", "pip", "install", "torch==2.7.1+cu118",
                                             "--index-url", INDEX + "cu118"]]
    env = fake_pip[0]["env"]
    assert env["PIP_INDEX_URL"] == "https://pypi.tuna.tsinghua.edu.cn/simple"
    assert env["PIP_TRUSTED_HOST"] == "pypi.tuna.tsinghua.edu.cn"
    assert constraint.read_text() == "torch==2.7.1+cu118\n"
    assert "fits the pinned stack" in capsys.readouterr().out


def test_without_auto_the_cli_stops_in_one_line_and_runs_nothing(tmp_path, fake_pip, capsys):
    assert tf.main(["--probe", str(autodl(tmp_path))]) == 2
    err = capsys.readouterr().err
    assert fake_pip == [] and err.count("\n") == 1 and "TORCH_AUTO_INSTALL=true make venv" in err


def test_a_failed_pip_or_a_torch_that_still_does_not_fit_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(tf.subprocess, "run", lambda argv, **kw: subprocess.CompletedProcess(argv, 1))
    assert tf.main(["--auto", "--probe", str(autodl(tmp_path))]) == 1
    assert "pip could not install torch==2.7.1+cu118" in capsys.readouterr().err.splitlines()[-1]
    monkeypatch.setattr(tf.subprocess, "run", lambda argv, **kw: subprocess.CompletedProcess(argv, 0))
    monkeypatch.setattr(tf, "torch_facts", lambda python: {"version": "2.1.2+cu118", "cuda": "11.8",
                                                           "arch_list": CU118})
    assert tf.main(["--auto", "--probe", str(autodl(tmp_path))]) == 2
    assert "does not fit either" in capsys.readouterr().err


def test_plan_only_says_reuse_install_or_stop_in_its_exit_code(tmp_path, fake_pip):
    assert tf.main(["--plan-only", "--probe", str(PROBES / "a100_80g.json")]) == 0
    assert tf.main(["--plan-only", "--auto", "--probe", str(autodl(tmp_path))]) == 3
    assert tf.main(["--plan-only", "--probe", str(autodl(tmp_path))]) == 2
    assert fake_pip == []


@pytest.mark.parametrize("args,part", [(["--pin", "torch>=2.8"], "TORCH_SPEC=torch>=2.8 is not torch==VERSION"),
                                       (["--probe", "nope.json"], "GPU_PROBE_FILE nope.json: no such file")])
def test_bad_input_to_the_cli_is_one_line(args, part, capsys):
    assert tf.main(args + ["--plan-only"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and part in err, err


@pytest.mark.parametrize("over,field", [({"driver": "r570"}, "'driver'"), ({"driver_cuda": 12.8}, "'driver_cuda'"),
                                        ({"driver_cuda": "12"}, "'driver_cuda'")])
def test_a_bad_driver_field_in_a_probe_is_one_line(tmp_path, over, field):
    with pytest.raises(ValueError) as err:
        tf.probe_facts(recorded(tmp_path, "a100_80g.json", **over))
    assert "\n" not in str(err.value) and field in str(err.value) and "nvidia-smi prints" in str(err.value)


def test_an_old_probe_without_driver_cuda_still_loads_and_uses_the_table(tmp_path):
    facts = tf.probe_facts(recorded(tmp_path, "t4_16g.json", driver_cuda=...))
    assert facts["smi_cuda"] is None and tf.decide(**facts).action == "reuse"


# ---------------------------------------------------------------- facts of this machine
def script(path, body):
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(0o755)
    return str(path)


def test_live_facts_read_nvidia_smi_and_the_pythons_torch(tmp_path, monkeypatch):
    """An H100 on driver 570 as nvidia-smi prints it, and a python whose torch is an old AutoDL build."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script(bin_dir / "nvidia-smi", 'case "$1" in --query-gpu=*) '
           'echo "0, NVIDIA H100 80GB HBM3, 81559, 81004, 570.124.06, 9.0";; '
           '*) echo "| NVIDIA-SMI 570.124.06   Driver Version: 570.124.06   CUDA Version: 12.8 |";; esac')
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    python = script(tmp_path / "python", "echo 'a warning on stdout'; "
                    'echo \'{"version": "2.5.1+cu124", "cuda": "12.4", "arch_list": ["sm_80", "sm_90"]}\'')
    facts = tf.live_facts(python)
    assert facts == {"torch": {"version": "2.5.1+cu124", "cuda": "12.4", "arch_list": ["sm_80", "sm_90"]},
                     "gpus": [{"name": "NVIDIA H100 80GB HBM3", "capability": [9, 0]}], "driver": "570.124.06",
                     "smi_cuda": "12.8"}
    assert tf.decide(**facts).spec == "torch==2.13.0+cu128"


def test_torch_facts_of_a_real_a_missing_and_a_broken_torch(tmp_path):
    import torch
    mine = tf.torch_facts(sys.executable)
    assert mine["version"] == metadata.version("torch") and mine["cuda"] == torch.version.cuda
    if torch.version.cuda is None:
        assert mine["arch_list"] == []
    else:   # get_arch_list() is [] without a visible device; the facts have the build's list all the same
        assert mine["arch_list"]
        assert not torch.cuda.is_available() or mine["arch_list"] == torch.cuda.get_arch_list()
    none = script(tmp_path / "none", "echo \"ModuleNotFoundError: No module named 'torch'\" >&2; exit 1")
    assert tf.torch_facts(none) is None
    error = "OSError: libcudnn.so.9: cannot open shared object file"
    broken = script(tmp_path / "broken", f'echo "{error}" >&2; exit 1')
    assert tf.torch_facts(broken) == {"version": None, "error": error}
    fit = tf.decide(tf.torch_facts(broken), [], None)
    assert fit.action == "stop" and "does not import (OSError: libcudnn.so.9" in fit.problem


# ---------------------------------------------------------------- the shell: scripts/bootstrap_venv.sh
FAKE = """#!/bin/sh
echo "$* PIP_INDEX_URL=${{PIP_INDEX_URL:-}}" >> "{log}"
case "$*" in
  "-c import torch") exit {has_torch} ;;
  *"-m pipeline.torch_fit"*) {fit} ;;
  *"-m venv"*) mkdir -p .venv/bin && cp "{venv_python}" .venv/bin/python ;;
esac
exit 0
"""
WRITE_CONSTRAINT = ('while [ $# -gt 0 ]; do [ "$1" = --constraint ] && echo torch==2.13.0+cu126 > "$2"; shift; '
                    'done; exit 0')


def bootstrap(tmp_path, env, system_fit=None, venv_fit=WRITE_CONSTRAINT, with_venv=False):
    """scripts/bootstrap_venv.sh in a copy of the repo. The system Python has a torch when `system_fit` (a probe
    file) is given, and its torch check is the real one on that probe. The venv's Python is a fake that logs;
    its torch check runs `venv_fit`."""
    import shutil
    (tmp_path / "scripts").mkdir(parents=True)
    shutil.copy(REPO / "scripts" / "bootstrap_venv.sh", tmp_path / "scripts")
    shutil.copy(REPO / "requirements.txt", tmp_path)
    (tmp_path / "pipeline").mkdir()
    shutil.copy(REPO / "pipeline" / "torch_fit.py", tmp_path / "pipeline")   # hashed into the up-to-date stamp
    log = tmp_path / "calls.log"
    venv_python = tmp_path / "fake_venv_python"
    venv_python.write_text(FAKE.format(log=log, has_torch=0, fit=venv_fit, venv_python=venv_python))
    real = f'shift 2; exec "{sys.executable}" -m pipeline.torch_fit "$@" --probe "{system_fit}"'
    system = tmp_path / "fake_system_python"
    system.write_text(FAKE.format(log=log, has_torch=0 if system_fit else 1, fit=real, venv_python=venv_python))
    for p in (venv_python, system):
        p.chmod(0o755)
    if with_venv:
        (tmp_path / ".venv" / "bin").mkdir(parents=True)
        shutil.copy(venv_python, tmp_path / ".venv" / "bin" / "python")
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("TORCH_", "PIP_"))}
    out = subprocess.run(["bash", str(tmp_path / "scripts" / "bootstrap_venv.sh")], capture_output=True, text=True,
                         env={**clean, "PYTHON": str(system), "PYTHONPATH": str(REPO), **env}, timeout=120)
    return out, (log.read_text().splitlines() if log.exists() else [])


def test_bootstrap_stops_before_creating_anything_when_the_system_torch_does_not_fit(tmp_path):
    out, calls = bootstrap(tmp_path / "w", {}, system_fit=autodl(tmp_path))
    assert out.returncode == 2 and not (tmp_path / "w" / ".venv").exists()
    assert not any("-m venv" in c or " pip " in c for c in calls), calls
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("bootstrap: torch 2.1.2+cu118 is older") and f"{INDEX}cu118" in last


def test_bootstrap_reuses_a_fitting_system_torch_and_pins_it_for_the_requirements(tmp_path):
    mirror = "https://mirrors.aliyun.com/pypi/simple"
    out, calls = bootstrap(tmp_path, {"PIP_INDEX_URL": mirror}, system_fit=PROBES / "v100x2_32g.json")
    assert out.returncode == 0, out.stderr
    assert any(c.startswith("-m venv --system-site-packages .venv") for c in calls), calls
    req = [c for c in calls if "-r requirements.txt" in c]
    assert len(req) == 1 and "-c .venv/torch-constraint.txt" in req[0] and f"PIP_INDEX_URL={mirror}" in req[0]
    assert "fits the pinned stack" in out.stdout and (tmp_path / ".venv" / ".requirements.sha256").is_file()


def test_bootstrap_with_auto_install_gives_the_venv_its_own_torch(tmp_path):
    out, calls = bootstrap(tmp_path, {"TORCH_AUTO_INSTALL": "true"}, system_fit=autodl(tmp_path))
    assert out.returncode == 0, out.stderr
    assert any(c.startswith("-m venv .venv") for c in calls), calls
    assert any("-m pipeline.torch_fit --pin 2.13.0 --auto --constraint" in c for c in calls), calls


def test_bootstrap_stops_when_the_venvs_torch_does_not_fit_and_installs_no_requirements(tmp_path):
    out, calls = bootstrap(tmp_path, {}, venv_fit='echo "bootstrap: torch does not fit" >&2; exit 2',
                           with_venv=True)
    assert out.returncode == 2 and "does not fit" in out.stderr
    assert not any("-r requirements.txt" in c for c in calls)
    assert not (tmp_path / ".venv" / ".requirements.sha256").exists()


def test_bootstrap_refuses_an_auto_install_value_it_cannot_read(tmp_path):
    out, calls = bootstrap(tmp_path, {"TORCH_AUTO_INSTALL": "maybe"}, with_venv=True)
    assert out.returncode == 2 and calls == []
    assert out.stderr.strip() == "bootstrap: TORCH_AUTO_INSTALL=maybe is not true or false: fix the variable"
