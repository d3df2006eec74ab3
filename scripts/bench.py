"""Benchmarks: what a run costs and what it wastes, as ratios measured side by side on one machine.

Run: make bench          (= python -m scripts.bench; under 15 minutes on 2 CPU cores with the defaults)
     python -m scripts.bench --quick --out /tmp/b        (smallest settings: the smoke test)
     BENCH_REPS=3 python -m scripts.bench --only sft,judge
Writes reports/bench/bench.json, bench.md and PNG figures. Absolute times are only trusted on a GPU machine;
the ratios are what to quote. Nothing here asserts: a benchmark reports.
Benchmarks: day1 (whole tiny Day-1, then the no-op re-run, instrumented), sft (our stage vs plain TRL),
eval (batched left-padded generation vs one prompt at a time, demo tier), judge (concurrency vs sequential,
then the cached re-run), cuda (the pipeline's SFT on a Qwen2.5-7B-shaped random-init model built in memory,
LoRA and QLoRA at seq 2048: tokens/s, MFU against the dense fp32-accumulate peak, memory against the planner;
skipped without CUDA), preflight (its predicted wall time per stage against the run's: scripts/bench_preflight.py).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pipeline import evalsets
from pipeline.stages import REGISTRY
from scripts.bench_preflight import bench_preflight

REPO = Path(__file__).resolve().parents[1]
ALL = ("day1", "sft", "eval", "judge", "cuda", "preflight")
# Variables that change the resolved config or hold secrets: a developer's shell must not leak into a child run.
CLEARED = ("OPENAI_API_KEY", "OPENAI_BASE_URL", "MODEL_NAME", "ALLOW_SKIP_TRAINING", "FORCE_SKIP_TRAINING",
           "ENABLE_LLM_JUDGE", "ENABLE_LLM_RISK_JUDGE", "ENABLE_V2_LLM_FALLBACK", "JUDGE_MODEL", "MIN_CUDA_MEM_GB_7B",
           "MIN_CUDA_MEM_GB_14B", "BATCH_SIZE", "GRAD_ACC", "NPROC", "DAY1_DRY_RUN", "DRY_RUN", "SEED",
           "MEDLLM_INJECT_OOM_AT_STEP", "MEDLLM_CACHE", "MODEL_TIER", "PIPELINE_ROOT")
# Smallest settings for --quick (and the soak's quick base run): every stage still runs, for a few steps.
QUICK_OVERRIDES = ["sft.max_steps=6", "sft.curriculum=[]", "sft.save_steps=2", "sft.eval_steps=3",
                   *[f"{s}.{k}={v}" for s in REGISTRY.aligned for k, v in (("max_steps", 4), ("save_steps", 2))],
                   "eval.sample_sizes={%s}" % ", ".join(f"{name}: 2" for name in evalsets.names()),
                   "eval.n_bootstrap=50"]

# Runs `python -m pipeline ARGS` and records, at exit, what it imported and loaded (argv[1]: the JSON to write).
PROBE = r'''
import atexit, importlib.abc, importlib.util, json, runpy, sys
out, calls, spawned = sys.argv[1], [], []

class CountLoads(importlib.abc.MetaPathFinder):
    """When transformers.modeling_utils is imported, wrap PreTrainedModel.from_pretrained to count calls."""
    def find_spec(self, name, path=None, target=None):
        if name != "transformers.modeling_utils":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        run = spec.loader.exec_module
        def exec_module(mod):
            run(mod)
            orig = mod.PreTrainedModel.from_pretrained.__func__
            def counted(cls, *a, **k):
                calls.append(cls.__name__)
                return orig(cls, *a, **k)
            mod.PreTrainedModel.from_pretrained = classmethod(counted)
        spec.loader.exec_module = exec_module
        return spec

sys.meta_path.insert(0, CountLoads())
sys.addaudithook(lambda ev, a: spawned.append(str(a[0])) if ev in ("subprocess.Popen", "os.posix_spawn") else None)

def report():
    mods = sorted(m for m in sys.modules if m.startswith("transformers.models.") and ".modeling_" in m)
    with open(out, "w") as f:
        json.dump({"from_pretrained_calls": calls, "modeling_modules": mods,
                   "modeling_utils_imported": "transformers.modeling_utils" in sys.modules,
                   "torch_imported": "torch" in sys.modules, "trl_imported": "trl" in sys.modules,
                   "subprocesses": spawned}, f)
atexit.register(report)
sys.argv = ["pipeline", *sys.argv[2:]]
runpy.run_module("pipeline", run_name="__main__", alter_sys=True)
'''

# Dense (no sparsity) fp16/bf16 tensor-core peak with fp32 accumulate, the mode training runs in, from the
# vendors' data sheets: the MFU denominator. GeForce cards run fp16-accumulate at twice this (RTX 4090: 330),
# which no bf16/fp16 training step gets. A name matches whole: "A100" is not found in "RTX A1000".
PEAK_TFLOPS = {
    "H200 NVL": 835, "H200": 989, "GH200": 989, "H100 SXM": 989, "H100 80GB HBM3": 989, "H100 PCIe": 756,
    "H100 NVL": 835, "H100": 756, "A100": 312, "A800": 312, "L40S": 362, "L40": 181, "L4": 121, "A10G": 70,
    "A10": 125, "RTX A6000": 155, "RTX 4090": 165, "RTX 3090": 71, "V100 PCIE": 112, "V100": 125, "T4": 65,
}


# --- small helpers -----------------------------------------------------------------------------------
def machine() -> dict:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    out = {"cpu_count": os.cpu_count(), "cpus_usable": len(os.sched_getaffinity(0)), "cpu_model": cpu,
           "ram_gb": round(ram, 1), "python": platform.python_version(), "platform": platform.platform(), "gpu": None}
    smi = shutil.which("nvidia-smi")
    if smi:
        q = subprocess.run([smi, "--query-gpu=name,memory.total", "--format=csv,noheader"], capture_output=True, text=True)
        out["gpu"] = q.stdout.strip() or None
    return out


def spread(values: list[float]) -> dict:
    vals = [round(v, 4) for v in values]
    return {"median": round(statistics.median(vals), 4), "min": min(vals), "max": max(vals), "n": len(vals), "values": vals}


def child_env(root: Path | None, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in CLEARED}
    env.update(MODEL_TIER="tiny", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", ENABLE_LLM_JUDGE="false",
               ENABLE_LLM_RISK_JUDGE="false", ENABLE_V2_LLM_FALLBACK="false", OPENAI_API_KEY="", OPENAI_BASE_URL="")
    if root is not None:
        env["PIPELINE_ROOT"] = str(root)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run_pipeline(args: list[str], env: dict, log: Path, probe: Path | None = None) -> dict:
    """One `python -m pipeline ...` process: wall seconds, exit code, its peak RSS (with its children), probe data."""
    cmd = [sys.executable, "-c", PROBE, str(probe), *args] if probe else [sys.executable, "-m", "pipeline", *args]
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    info = json.loads(probe.read_text()) if probe and probe.is_file() else None
    return {"wall_s": round(wall, 3), "rc": proc.returncode, "peak_rss_gb": round(usage.ru_maxrss / 2**20, 3), "probe": info}


def stage_durations(root: Path, env: dict) -> dict:
    from pipeline import evidence
    from pipeline.settings import load_config
    from pipeline.stages import REGISTRY
    cfg = load_config(env=env)
    return {s.name: (evidence.read_json(root / s.evidence(cfg)) or {}).get("duration_s") for s in REGISTRY.stages
            if s.in_all}


def fake_server(**kw):
    sys.path.insert(0, str(REPO))
    from tests.fakes.openai_server import FakeOpenAI
    return FakeOpenAI(**kw).start()


# --- 1 + 2: the whole tiny Day-1, then the no-op re-run -----------------------------------------------
def bench_day1(work: Path, reps: int, quick: bool) -> dict:
    server = fake_server(api_key="sk-bench-key")
    overrides = QUICK_OVERRIDES if quick else []
    runs, noops = [], []
    try:
        for i in range(reps):
            root = work / f"day1-{i}"
            env = child_env(root, ENABLE_LLM_JUDGE="true", ENABLE_LLM_RISK_JUDGE="true", ENABLE_V2_LLM_FALLBACK="true",
                            OPENAI_API_KEY=server.api_key, OPENAI_BASE_URL=server.base_url)
            full = run_pipeline(["run", "all", *overrides], env, work / "logs" / f"day1-{i}.log", work / f"probe-full-{i}.json")
            full["stages_s"] = stage_durations(root, env)
            runs.append(full)
            for j in (range(max(3, reps)) if i == 0 else ()):
                before = server.n_chat
                noop = run_pipeline(["run", "all", *overrides], env, work / "logs" / f"noop-{j}.log", work / f"probe-noop-{j}.json")
                noop["judge_requests"] = server.n_chat - before
                noops.append(noop)
    finally:
        server.stop()
    full_wall = statistics.median(r["wall_s"] for r in runs)
    noop_wall = statistics.median(r["wall_s"] for r in noops)
    stages = {k: spread([r["stages_s"][k] for r in runs if r["stages_s"].get(k) is not None])
              for k in runs[0]["stages_s"] if runs[0]["stages_s"][k] is not None}
    return {
        "setup": "python -m pipeline run all on the tiny tier in a fresh PIPELINE_ROOT (judges on, against the local "
                 "fake OpenAI server with no latency), then the same command again in the same root"
                 + (" (quick overrides: " + " ".join(overrides) + ")" if quick else ""),
        "full": {"wall_s": spread([r["wall_s"] for r in runs]), "exit_codes": [r["rc"] for r in runs],
                 "peak_rss_gb": spread([r["peak_rss_gb"] for r in runs]), "stages_s": stages,
                 "engine_and_startup_s": round(full_wall - sum(s["median"] for s in stages.values()), 2),
                 "python_processes": 1 + sum("python" in p for p in runs[0]["probe"]["subprocesses"]),
                 "subprocesses": _count(runs[0]["probe"]["subprocesses"]),
                 "from_pretrained_calls": len(runs[0]["probe"]["from_pretrained_calls"])},
        "noop": {"wall_s": spread([r["wall_s"] for r in noops]), "exit_codes": [r["rc"] for r in noops],
                 "ratio_to_full": round(noop_wall / full_wall, 4),
                 "from_pretrained_calls": sum(len(r["probe"]["from_pretrained_calls"]) for r in noops),
                 "modeling_modules_imported": sorted({m for r in noops for m in r["probe"]["modeling_modules"]}),
                 "trl_imported": any(r["probe"]["trl_imported"] for r in noops),
                 "judge_requests": sum(r["judge_requests"] for r in noops),
                 "peak_rss_gb": spread([r["peak_rss_gb"] for r in noops])},
        "instrumentation": "each run goes through a wrapper that wraps transformers' PreTrainedModel.from_pretrained "
                           "when transformers.modeling_utils is imported, and lists the transformers modeling modules "
                           "and subprocesses (audit hook) at exit; the full run's count shows that the probe sees loads",
    }


def _count(items: list[str]) -> dict:
    out: dict[str, int] = {}
    for x in items:
        out[Path(x).name] = out.get(Path(x).name, 0) + 1
    return out


# --- 3: our SFT stage vs the plain TRL script ----------------------------------------------------------
def _our_train_runtime(log: Path) -> float | None:
    """The trainer's own train_runtime from its summary line in reports/logs/sft_full.log (the last one)."""
    hits = re.findall(r"'train_runtime': '?([\d.]+)'?, 'train_samples_per_second'", log.read_text(errors="replace")) \
        if log.is_file() else []
    return float(hits[-1]) if hits else None


def bench_sft(work: Path, reps: int, quick: bool) -> dict:
    import importlib.util

    from pipeline import models, training
    from pipeline.settings import load_config
    steps = 6 if quick else None
    cache = work / "sft-cache"
    base_env = child_env(None, MEDLLM_CACHE=cache)
    cfg = load_config(tier="tiny", env={**base_env, "PIPELINE_ROOT": str(work / "sft-cfg")})
    tc = cfg.sft
    steps = steps or tc.max_steps
    model = models.build_tiny(cache / f"tiny-seed{cfg.model.tiny_seed}", seed=cfg.model.tiny_seed)
    rows = training.sft_splits(cfg)["train"]
    data = work / "sft_rows.jsonl"
    data.write_text("".join(json.dumps({"messages": r["messages"]}, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    same = [f"sft.max_steps={steps}", "sft.curriculum=[]", f"sft.max_length={tc.max_length}"]
    variants = {
        "ours (as configured: eval + checkpoints every 10 steps)": ("ours", same),
        "ours (same work as plain: no eval, one checkpoint)": ("ours", same + [f"sft.eval_steps={steps}", f"sft.save_steps={steps}"]),
        "plain TRL": ("plain", []), "plain TRL + packing (BFD, padding-free inside)": ("plain", ["--packing"]),
        "plain TRL + padding_free (max_length=None)": ("plain", ["--padding-free"]),
    }
    results: dict[str, list] = {k: [] for k in variants}
    for rep in range(reps):
        for k, (name, (kind, extra)) in enumerate(variants.items()):
            out = work / f"sft-{rep}-{k}-{kind}"
            if kind == "ours":
                env = {**base_env, "PIPELINE_ROOT": str(out)}
                r = run_pipeline(["run", "sft", *extra], env, work / "logs" / f"{out.name}.log")
                doc = json.loads(next((out / "reports/training").glob("*_sft_metrics.json")).read_text())
                runtime = _our_train_runtime(out / "reports/logs/sft_full.log")
                tokens = round(doc["tokens_per_s"] * doc["train_runtime_s"])   # = the trainer's num_input_tokens_seen
                results[name].append({"rc": r["rc"], "tokens": tokens, "train_runtime_s": runtime,
                                      "tokens_per_s": tokens / runtime if runtime else None,
                                      "load_and_train_s": doc["train_runtime_s"], "final_loss": doc["loss_curve"][-1][1],
                                      "global_step": doc["global_step"], "process_wall_s": r["wall_s"]})
            else:
                cmd = [sys.executable, "-m", "scripts.plain_trl_sft", "--model", str(model), "--data", str(data),
                       "--out", str(out), "--steps", str(steps), "--max-length", str(tc.max_length), "--batch",
                       str(tc.batch_size), "--lr", str(tc.learning_rate), "--lora-r", str(cfg.lora.r), "--lora-alpha",
                       str(cfg.lora.alpha), "--seed", str(cfg.runtime.seed), *extra]
                t0 = time.perf_counter()
                with open(work / "logs" / f"{out.name}.log", "wb") as log:
                    rc = subprocess.run(cmd, cwd=REPO, env=base_env, stdout=log, stderr=subprocess.STDOUT).returncode
                res = json.loads((out / "result.json").read_text()) if (out / "result.json").is_file() else {}
                results[name].append({"rc": rc, **res, "process_wall_s": round(time.perf_counter() - t0, 3)})
    table = {}
    for name, rs in results.items():
        ok = [r for r in rs if r.get("tokens_per_s")]
        table[name] = {"runs": rs, "exit_codes": [r["rc"] for r in rs],
                       "tokens_per_s": spread([r["tokens_per_s"] for r in ok]) if ok else None,
                       "final_loss": spread([r["final_loss"] for r in ok if r.get("final_loss") is not None]) if ok else None,
                       "process_wall_s": spread([r["process_wall_s"] for r in rs])}
    plain = table["plain TRL"]["tokens_per_s"]
    for row in table.values():
        row["tokens_per_s_ratio_to_plain"] = (round(row["tokens_per_s"]["median"] / plain["median"], 3)
                                              if row["tokens_per_s"] and plain else None)
    return {"setup": f"tiny model (seed {cfg.model.tiny_seed}), the same {len(rows)} SFT rows, max_length {tc.max_length}, "
                     f"{steps} steps, batch {tc.batch_size}, lr {tc.learning_rate}, LoRA r={cfg.lora.r} alpha={cfg.lora.alpha} "
                     f"on all linears, seed {cfg.runtime.seed}, assistant-only loss; tokens/s = the trainer's own "
                     "num_input_tokens_seen ('all', padding included for padded batches) / its train_runtime",
            "variants": table,
            "liger_kernel": ("installed, not benchmarked" if importlib.util.find_spec("liger_kernel") else
                             "not installed (pip install liger-kernel): not measured"),
            "note": "padding_free without packing: TRL 1.16 refuses it with a max_length, so that variant trains on "
                    "untruncated rows (more tokens per step); compare its tokens/s, not its loss"}


# --- 4: eval generation, batched with left padding vs one prompt at a time ------------------------------
def bench_eval(work: Path, reps: int, quick: bool, n: int) -> dict:
    from pipeline import models
    from pipeline.settings import load_config
    from pipeline.stages import eval as E
    from pipeline.variants import generate
    tier = "tiny" if quick else "demo"   # demo: the model `make day1-smoke` uses, from its cache (MEDLLM_CACHE or .cache)
    cache = Path(os.environ.get("MEDLLM_CACHE") or REPO / ".cache") if tier == "demo" else work / "eval-cache"
    cfg = load_config(tier=tier, env=child_env(work / "eval-root", MODEL_TIER=tier, MEDLLM_CACHE=cache))
    path = models.ensure_demo(cache) if tier == "demo" else models.build_tiny(cache / "tiny-seed0")
    plan = {"device": "cpu", "precision": "fp32", "attn_implementation": "sdpa", "quantization": None}
    model, tok = models.load_model(path, plan), models.load_tokenizer(path, padding_side="left")
    sets = E.load_sets(cfg)
    rows = [r for name in cfg.eval.sets for r in sets[name][0]][:n]
    prompts = [E.messages(r) for r in rows]
    times: dict[str, list] = {"batched": [], "one_at_a_time": []}
    texts = {}
    for _ in range(reps):
        for mode, bs in (("batched", cfg.eval.batch_size), ("one_at_a_time", 1)):
            t0 = time.perf_counter()
            texts[mode] = generate(model, tok, prompts, bs, cfg.eval.max_new_tokens)
            times[mode].append(time.perf_counter() - t0)
    answers = {m: [E.extract(r, t)[0] for r, t in zip(rows, texts[m])] for m in texts}
    qps = {m: spread([len(rows) / t for t in ts]) for m, ts in times.items()}
    same = sum(a == b for a, b in zip(answers["batched"], answers["one_at_a_time"]))
    return {"setup": f"{tier} tier ({models.display_name(tier, str(path))}), {len(rows)} questions "
                     f"({', '.join(cfg.eval.sets)} seeded samples, the eval stage's prompts), greedy, max_new_tokens "
                     f"{cfg.eval.max_new_tokens}, batch {cfg.eval.batch_size} vs 1, CPU fp32",
            "questions_per_s": qps, "ratio_batched_to_single": round(qps["batched"]["median"] / qps["one_at_a_time"]["median"], 3),
            "extracted_answers_identical": f"{same}/{len(rows)}",
            "raw_texts_identical": f"{sum(a == b for a, b in zip(texts['batched'], texts['one_at_a_time']))}/{len(rows)}",
            "differences": [{"id": r["id"], "batched": texts["batched"][i], "single": texts["one_at_a_time"][i]}
                            for i, r in enumerate(rows) if answers["batched"][i] != answers["one_at_a_time"][i]][:5]}


# --- 5: judge concurrency vs sequential, then the cached re-run -------------------------------------------
def bench_judge(work: Path, reps: int, quick: bool, n: int, latency_ms: float, concurrency: int) -> dict:
    from pipeline import judgekit
    items = [{"question_id": f"q{i}", "variant": "dpo", "question": f"Question {i}: what helps a headache?",
              "answer_a": "Rest, water and, if needed, paracetamol. " * (1 + i % 3), "answer_b": "Rest.", "order": "ab"}
             for i in range(n)]
    server = fake_server(api_key="sk-bench-key", latency_ms=latency_ms)
    rates: dict[str, list] = {"concurrent": [], "sequential": []}
    try:
        for rep in range(reps):
            for mode, conc in (("concurrent", concurrency), ("sequential", 1)):
                cache = judgekit.JudgeCache(work / f"judge-{mode}-{rep}.jsonl")
                t0 = time.perf_counter()
                out = asyncio.run(judgekit.judge_all(items, kind="pairwise", base_url=server.base_url, api_key=server.api_key,
                                                     model="fake-judge", cache=cache, concurrency=conc))
                rates[mode].append(out["n_judged"] / (time.perf_counter() - t0))
        before = server.n_chat
        again = asyncio.run(judgekit.judge_all(items, kind="pairwise", base_url=server.base_url, api_key=server.api_key,
                                               model="fake-judge", cache=judgekit.JudgeCache(work / "judge-concurrent-0.jsonl"),
                                               concurrency=concurrency))
        rerun_requests = server.n_chat - before
    finally:
        server.stop()
    jps = {m: spread(v) for m, v in rates.items()}
    return {"setup": f"{n} pairwise items against the local fake OpenAI server with {latency_ms:g} ms latency per "
                     f"request; concurrency {concurrency} vs 1; then the same items again with the first run's cache",
            "judgments_per_s": jps, "ratio_concurrent_to_sequential": round(jps["concurrent"]["median"] / jps["sequential"]["median"], 2),
            "rerun": {"requests_made": rerun_requests, "client_counted_requests": again["n_requests"],
                      "cached": again["n_cached"], "judged": again["n_judged"]}}


# --- 6: CUDA only: the pipeline's SFT on a Qwen2.5-7B-shaped random-init model, LoRA and QLoRA, seq 2048 ----
def peak_tflops(gpu_name: str) -> float | None:
    """PEAK_TFLOPS of the longest key found whole in the device name (None: unknown, so no MFU)."""
    name = re.sub(r"[-_]", " ", gpu_name.upper())
    for key in sorted(PEAK_TFLOPS, key=len, reverse=True):
        if re.search(rf"(?<![A-Z0-9]){re.escape(key.upper())}(?![0-9])", name):
            return PEAK_TFLOPS[key]
    return None


def bench_cuda(work: Path, reps: int, seq: int = 2048) -> dict:
    import torch
    if not torch.cuda.is_available():
        return {"skipped": True, "reason": "no CUDA device on this machine: the 7B-shaped LoRA/QLoRA "
                                           "benchmark runs only on a GPU"}
    from pipeline import hardware
    return lora_benchmark(work, "7b", hardware.probe(), reps, seq, torch.cuda.get_device_name(0))


def lora_benchmark(work: Path, tier: str, probe: dict, reps: int, seq: int, device_name: str) -> dict:
    """What the pipeline runs: the gpu_selftest stage's SFT trial (models.load_model as the plan says, fp32
    LoRA and GradScaler under fp16, TRL's SFTTrainer with its own loss head) on a random-init model of the
    tier's shape whose weights are made on the device (nothing on disk), rows filling `seq`, real tokens."""
    from pipeline import hardware, models
    from pipeline.settings import load_config
    from pipeline.stages import gpu_selftest as S
    cfg = load_config(tier=tier, env=child_env(work / "cuda-root", MODEL_TIER=tier),
                      overrides=[f"sft.max_length={seq}", "sft.curriculum=[]"])
    tok = models.load_tokenizer(models.build_tiny(work / "tiny-tokenizer", seed=cfg.model.tiny_seed))
    ids, config = S.text_ids(cfg, tok), S.random_config(hardware.MODEL_SHAPES[tier], tok)
    shape, peak = S.shape_of(config), peak_tflops(device_name)
    out = {"gpu": device_name, "peak_tflops_dense_fp32_accumulate": peak, "seq_len": seq,
           "optimizer_steps": S.STEPS, "runs": {},
           "setup": f"{tier}-shaped Qwen2 with random weights made on the device (no file), the pipeline's SFT "
                    f"(gpu_selftest.trial) for {S.STEPS} optimizer steps of one micro-batch at seq {seq}, the "
                    f"{tier} tier's per-device batch; tokens/s over the steps after the first; "
                    f"{S.TOKENS_COUNTED}"}
    est_in = {"lora_r": cfg.lora.r, "target_modules": cfg.lora.target_modules, "optimizer": cfg.sft.optimizer,
              "seq_len": seq, "batch": cfg.sft.batch_size,
              "activation_checkpointing": cfg.sft.activation_checkpointing}
    with S.random_weights(config):
        for label, qlora in (("lora", False), ("qlora_nf4", True)):
            plan = hardware.make_plan(probe, tier=tier, want_qlora=qlora, want_flash_attn=cfg.model.flash_attn,
                                      min_mem_gb={}, estimate_inputs=est_in)
            if qlora and plan["quantization"] != "nf4":
                out["runs"][label] = {"skipped": plan["quant_reason"]}
                continue
            recs = [S.trial("sft", cfg, plan, S.RANDOM_INIT, tok, ids, work / f"cuda-{label}-{i}")
                    for i in range(reps)]
            out["runs"][label] = _lora_summary(recs, plan, shape, seq, peak)
    return out


def _lora_summary(recs: list[dict], plan: dict, shape: dict, seq: int, peak: float | None) -> dict:
    ok = [r for r in recs if "error" not in r and (r.get("speed") or {}).get("tokens_per_s")]
    flops_per_token = 4 * shape["params"] + 12 * shape["layers"] * seq * shape["hidden"]   # LoRA: frozen base
    tps = statistics.median(r["speed"]["tokens_per_s"] for r in ok) if ok else None
    last = (ok or recs)[-1]
    return {"source": "random-init", "seq_len": seq, "batch": last["per_device_batch"],
            "plan": {k: plan[k] for k in ("precision", "attn_implementation", "quantization")},
            "trainable_dtype": last.get("trainable_dtype"), "grad_scaler": last.get("grad_scaler"),
            "errors": [r["error"] for r in recs if "error" in r], "invariants": last["invariants"],
            "tokens_per_s": spread([r["speed"]["tokens_per_s"] for r in ok]) if ok else None,
            "mfu": round(tps * flops_per_token / (peak * 1e12), 4) if peak and tps else None,
            "mfu_formula": "tokens/s x (4 x params + 12 x layers x seq x hidden) / dense fp32-accumulate "
                           "16-bit peak (LoRA: no weight gradients of the frozen base; recompute not counted)",
            "memory": last.get("memory"), "memory_vs_estimate": last.get("memory_vs_estimate")}


# --- report ------------------------------------------------------------------------------------------------
def rows_for_table(res: dict) -> list[tuple[str, str, str]]:
    rows = []
    if d := res.get("day1"):
        rows += [("day1", "full tiny Day-1 wall (s)", f"{d['full']['wall_s']['median']}"),
                 ("day1", "peak RSS (GB)", f"{d['full']['peak_rss_gb']['median']}"),
                 ("day1", "python processes / subprocesses", f"{d['full']['python_processes']} / {sum(d['full']['subprocesses'].values())}"),
                 ("day1", "no-op re-run wall (s)", f"{d['noop']['wall_s']['median']}"),
                 ("day1", "no-op / full", f"{d['noop']['ratio_to_full']:.1%}"),
                 ("day1", "models loaded in the no-op (must be 0)", str(d["noop"]["from_pretrained_calls"])),
                 ("day1", "judge requests in the no-op (must be 0)", str(d["noop"]["judge_requests"]))]
    if s := res.get("sft"):
        for name, v in s["variants"].items():
            tps = v["tokens_per_s"]
            rows.append(("sft", f"{name}: tokens/s (x plain), final loss",
                         f"{tps['median']:.0f} ({v['tokens_per_s_ratio_to_plain']}x), {v['final_loss']['median']:.4f}" if tps else f"failed {v['exit_codes']}"))
    if e := res.get("eval"):
        rows += [("eval", "questions/s batched vs single", f"{e['questions_per_s']['batched']['median']:.2f} vs "
                  f"{e['questions_per_s']['one_at_a_time']['median']:.2f} ({e['ratio_batched_to_single']}x)"),
                 ("eval", "extracted answers identical", e["extracted_answers_identical"])]
    if j := res.get("judge"):
        rows += [("judge", "judgments/s concurrent vs sequential", f"{j['judgments_per_s']['concurrent']['median']:.1f} vs "
                  f"{j['judgments_per_s']['sequential']['median']:.1f} ({j['ratio_concurrent_to_sequential']}x)"),
                 ("judge", "requests in the cached re-run (must be 0)", str(j["rerun"]["requests_made"]))]
    if p := res.get("preflight"):
        from scripts.bench_preflight import rows as preflight_rows
        rows += preflight_rows(p)
    if c := res.get("cuda"):
        if c.get("skipped"):
            rows.append(("cuda", "7B-shaped LoRA / QLoRA", "skipped: " + c["reason"]))
        else:
            for label, r in c["runs"].items():
                m = r.get("memory_vs_estimate") or {}
                rows.append(("cuda", f"{label}: tokens/s, MFU, peak reserved + context GB (estimate)",
                             r.get("skipped") or "; ".join(r.get("errors") or []) or
                             f"{r['tokens_per_s']['median']:.0f}, {r['mfu']}, "
                             f"{m.get('measured_reserved_plus_context_gb')} ({m.get('estimate_total_gb')})"))
    return rows


def write_reports(out: Path, res: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(res, indent=2, default=str) + "\n")
    m = res["machine"]
    lines = ["# Benchmarks", "", f"Measured {res['finished_at']} on {m['cpu_count']} CPUs ({m['cpu_model']}), "
             f"{m['ram_gb']} GB RAM, GPU: {m['gpu'] or 'none'}; total {res['total_s']:.0f} s; reps: {res['reps']}.",
             "Ratios are side by side on one machine; absolute CPU times on a shared machine are noisy.", "",
             "| benchmark | metric | value |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows_for_table(res)]
    for key in ALL:
        if key in res and isinstance(res[key], dict) and "setup" in res[key]:
            lines += ["", f"**{key}**: {res[key]['setup']}"]
    if "sft" in res:
        lines += ["", res["sft"]["note"] + ".", f"Liger kernels: {res['sft']['liger_kernel']}."]
    if "day1" in res:
        lines += ["", "Day-1 stage times (s, median): " + ", ".join(f"{k} {v['median']}" for k, v in res["day1"]["full"]["stages_s"].items())]
    lines += ["", "Figures: " + ", ".join(f"`{p}`" for p in res.get("figures", [])) if res.get("figures") else ""]
    (out / "bench.md").write_text("\n".join(lines) + "\n")


def figures(out: Path, res: dict) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    made = []
    if "day1" in res:
        st = res["day1"]["full"]["stages_s"]
        fig, ax = plt.subplots(figsize=(6, 3))
        ax.barh(list(st), [v["median"] for v in st.values()])
        ax.set_xlabel("seconds (median)"), ax.set_title("tiny Day-1: time per stage"), fig.tight_layout()
        fig.savefig(out / "day1_stages.png", dpi=110), plt.close(fig)
        made.append(str(out / "day1_stages.png"))
    if "sft" in res:
        v = {k: x["tokens_per_s"]["median"] for k, x in res["sft"]["variants"].items() if x["tokens_per_s"]}
        fig, ax = plt.subplots(figsize=(7, 3))
        ax.barh([k.split(" (")[0] if k.startswith("ours") and "same" not in k else k for k in v], list(v.values()))
        ax.set_xlabel("tokens/s (median)"), ax.set_title("SFT throughput, tiny model, CPU"), fig.tight_layout()
        fig.savefig(out / "sft_throughput.png", dpi=110), plt.close(fig)
        made.append(str(out / "sft_throughput.png"))
    return made


def print_table(title: str, columns, rows) -> None:
    """The closing rich table of make bench / make soak."""
    from rich.console import Console
    from rich.table import Table
    table = Table(title=title)
    for col in columns:
        table.add_column(col)
    for row in rows:
        table.add_row(*row)
    Console().print(table)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smallest settings (tests): few steps, tiny tier everywhere")
    ap.add_argument("--only", default=",".join(ALL), help=f"comma-separated subset of {','.join(ALL)}")
    ap.add_argument("--out", default=str(REPO / "reports" / "bench"))
    args = ap.parse_args(argv)
    only = [b.strip() for b in args.only.split(",") if b.strip()]
    unknown = [b for b in only if b not in ALL]
    if unknown:
        ap.error(f"--only: unknown benchmark(s) {unknown}; choose from {', '.join(ALL)}")
    reps = int(os.environ.get("BENCH_REPS") or 1)
    out = Path(args.out)
    t0 = time.perf_counter()
    res: dict = {"machine": machine(), "quick": args.quick,
                 "reps": {"day1 full run, sft, eval, cuda": reps, "no-op re-run": max(3, reps),
                          "judge": 1 if args.quick else max(3, reps)}}
    with tempfile.TemporaryDirectory(prefix="medllm-bench-") as tmp:
        work = Path(tmp)
        (work / "logs").mkdir()
        runs = {"day1": lambda: bench_day1(work, reps, args.quick),
                "sft": lambda: bench_sft(work, reps, args.quick),
                "eval": lambda: bench_eval(work, reps, args.quick, 8 if args.quick else 16),
                "judge": lambda: bench_judge(work, max(3, reps) if not args.quick else 1, args.quick, 16 if args.quick else 48,
                                             50 if args.quick else 200, 8),
                "cuda": lambda: bench_cuda(work, reps),
                "preflight": lambda: bench_preflight(work, reps, args.quick, child_env, run_pipeline, QUICK_OVERRIDES)}
        for name in only:
            t = time.perf_counter()
            print(f"[bench] {name} ...", flush=True)
            res[name] = runs[name]()
            res[name]["bench_wall_s"] = round(time.perf_counter() - t, 1)
            print(f"[bench] {name} done in {res[name]['bench_wall_s']} s", flush=True)
        res["total_s"] = round(time.perf_counter() - t0, 1)
        res["finished_at"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
        out.mkdir(parents=True, exist_ok=True)
        res["figures"] = figures(out, res)
        write_reports(out, res)

    print_table(f"make bench ({res['total_s']:.0f} s, {res['machine']['cpu_count']} CPUs, "
                f"GPU: {res['machine']['gpu'] or 'none'})", ("benchmark", "metric", "value"), rows_for_table(res))
    print(f"wrote {out / 'bench.json'} and {out / 'bench.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
