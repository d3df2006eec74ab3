"""The second scoring protocol, `loglik`: lm-evaluation-harness's log-likelihood multiple choice, on our files.

lm-eval (`lm_eval.evaluator.evaluate`, an `HFLM` around the model and tokenizer the eval stage already holds: the
base, or the base with a variant's adapter switched on) scores each question by the log-likelihood of every
option's continuation after the prompt (" A" ... " D"; " yes", " no", " maybe"); its prediction is the argmax (`acc`)
and, by the options' character lengths, `acc_norm`. Zero-shot, no chat template: lm-eval's defaults, the
Open Medical-LLM Leaderboard's setting. The tasks are ours, shipped in pipeline/evalsets/lm_eval_tasks/ (lm-eval's
own medqa_4options, pubmedqa and cmmlu_<subject> prompts, choices and targets over our files' field names; no
dataset hub); each set's module names the task of a row (lm_eval_task), its data (lm_eval_data) and the row id of a
task's doc (lm_eval_id). Every variant answers the eval's own sampled question ids.

Per-item records (lm-eval's log_samples, one line per question in the eval's order) go to
reports/eval/predictions/loglik/<variant>.jsonl; `results_loglik` is computed from them with the eval stage's own
summarize, and the gate (pipeline/eval_audit.py) re-scores every item from its log-likelihoods with `rescore_item`.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from pipeline import evalsets
from pipeline.core import StageFailed

PROTOCOL = "loglik"
TASKS_DIR = Path(__file__).resolve().parent / "evalsets" / "lm_eval_tasks"
PREDICTIONS = "reports/eval/predictions/loglik/{variant}.jsonl"
HARNESS = "lm-evaluation-harness (lm_eval.evaluator.evaluate, HFLM on the loaded model)"


@dataclasses.dataclass
class Tasks:
    """The lm-eval tasks the sampled rows need, and which doc of which task each row id is."""
    loaded: dict                      # TaskManager.load(...): {"tasks": {name: Task}, "groups": ..., ...}
    samples: dict                     # {task: [doc index, ...]} (sorted: lm-eval 0.4.13 logs doc_id right only then)
    where: dict                       # {row id: task}
    sets: dict                        # {task: the eval set module whose rows it scores}
    replicates: dict                  # {task: the lm-eval task it copies}


def inputs(cfg) -> list[Path]:
    """The eval stage's input files: the sets' data and our task definitions (an edit to a task re-runs eval)."""
    return [*evalsets.files(cfg), *sorted(p for p in TASKS_DIR.iterdir() if p.is_file() and p.suffix != ".pyc")]


def task_manager():
    from lm_eval.tasks import TaskManager
    return TaskManager(include_path=str(TASKS_DIR), include_defaults=False)


def task_spec(tm, name: str, data: dict) -> dict:
    """Our task's YAML as lm-eval reads it (includes and !function resolved), its dataset_kwargs updated with
    the configured data file(s)."""
    from lm_eval.tasks._yaml_loader import load_yaml   # what TaskManager itself reads a task YAML with
    entry = tm.task_index.get(name)
    if entry is None or entry.yaml_path is None:
        raise StageFailed(f"no lm-eval task definition {name}: add {TASKS_DIR.name}/{name}.yaml (copy lm-eval's "
                          f"own task of the same subject and point it at the bundled file)", code="loglik_task")
    spec = load_yaml(entry.yaml_path, resolve_func=True)
    spec["dataset_kwargs"] = {**(spec.get("dataset_kwargs") or {}), **data}
    return spec


def tasks_for(cfg, rows: list[dict]) -> Tasks:
    """The tasks of the rows' sets, built once (every variant answers them), each row found as one task doc."""
    tm, specs, sets = task_manager(), {}, {}
    for row in rows:
        mod = evalsets.of(row)
        name = mod.lm_eval_task(row)
        if name not in specs:
            specs[name], sets[name] = task_spec(tm, name, mod.lm_eval_data(cfg, row)), mod
    loaded = tm.load(list(specs.values()))
    found = {sets[name].lm_eval_id(name, doc): (name, i)
             for name, task in loaded["tasks"].items() for i, doc in enumerate(task.eval_docs)}
    missing = [r["id"] for r in rows if r["id"] not in found]
    if missing:
        raise StageFailed(f"{len(missing)} sampled questions are not docs of their lm-eval task (first: {missing[0]}): "
                          "the task's data_files and the set's loader read different files", code="loglik_task")
    samples: dict[str, list[int]] = {}
    for row in rows:
        name, i = found[row["id"]]
        samples.setdefault(name, []).append(i)
    return Tasks(loaded, {k: sorted(v) for k, v in samples.items()}, {r["id"]: found[r["id"]][0] for r in rows},
                 sets, {k: (s.get("metadata") or {}).get("replicates") for k, s in specs.items()})


def choice_index(choices: list[str], target) -> int:
    """lm-eval's gold as an index: doc_to_target gives an index (MedQA, CMMLU) or the choice itself (PubMedQA)."""
    return target if isinstance(target, int) else choices.index(target)


def _argmax(xs: list[float]) -> int:
    return max(range(len(xs)), key=lambda i: (xs[i], -i))   # the first of equal maxima, as numpy.argmax


def rescore_item(item: dict) -> dict:
    """What lm-eval's multiple-choice scoring (ConfigurableTask.process_results) makes of an item's recorded
    log-likelihoods: the argmax choice, acc, and acc_norm (log-likelihood per character of the choice)."""
    lls, choices, gold = item["loglik"], item["choices"], item["target"]
    pred = _argmax(lls)
    out = {"extracted": choices[pred], "acc": float(pred == gold)}
    if "acc_norm" in item:
        out["acc_norm"] = float(_argmax([ll / len(c) for ll, c in zip(lls, choices)]) == gold)
    return out


def record(row: dict, name: str, task, sample: dict) -> dict:
    """One question's per-item record: lm-eval's log sample (without the doc and the four copies of the prompt),
    our row's id, set, subject and gold, and the fields summarize reads (extracted, correct, raw, method)."""
    choices = list(task.doc_to_choice(sample["doc"]))
    gold = choice_index(choices, sample["target"])
    if choices[gold] != row["answer"]:
        raise StageFailed(f"lm-eval's task {name} reads the gold {choices[gold]!r} for {row['id']}, the set's loader "
                          f"{row['answer']!r}: fix the task definition in {TASKS_DIR.name}/", code="loglik_task")
    lls = [float(r[0]) for r in sample["filtered_resps"]]
    item = {"id": row["id"], "set": row["set"], "subject": row["subject"], "task": name, "doc_id": sample["doc_id"],
            "choices": choices, "target": gold, "gold": row["answer"], "loglik": lls,
            "is_greedy": [bool(r[1]) for r in sample["filtered_resps"]], "acc": float(sample["acc"]),
            **({"acc_norm": float(sample["acc_norm"])} if "acc_norm" in sample else {}),
            "prompt_sha256": sample["prompt_hash"], "doc_hash": sample["doc_hash"],
            "continuations": [a[1] for a in sample["arguments"]]}
    extracted = rescore_item(item)["extracted"]
    return item | {"raw": extracted, "extracted": extracted, "method": PROTOCOL, "correct": item["acc"] == 1.0}


def score(model, tok, tasks: Tasks, rows: list[dict], batch_size: int) -> tuple[list[dict], dict, float]:
    """(per-item records in the rows' order, lm-eval's own {task: {n, acc, acc_norm}}, seconds) of one variant."""
    from lm_eval import evaluator
    from lm_eval.models.huggingface import HFLM
    start = time.monotonic()
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=batch_size)
    res = evaluator.evaluate(lm, tasks.loaded, samples=tasks.samples, bootstrap_iters=0, log_samples=True)
    by_id = {r["id"]: r for r in rows}
    items = {}
    for name, samples in res["samples"].items():
        for s in samples:
            rid = tasks.sets[name].lm_eval_id(name, s["doc"])
            items[rid] = record(by_id[rid], name, tasks.loaded["tasks"][name], s)
    if set(items) != set(by_id):
        raise StageFailed(f"lm-eval scored {len(items)} of the {len(by_id)} sampled questions", code="loglik_task")
    own = {name: {"n": r.get("sample_len"), "acc": r.get("acc,none"), "acc_norm": r.get("acc_norm,none")}
           for name, r in res["results"].items()}
    return [items[r["id"]] for r in rows], own, time.monotonic() - start


def harness_figures(items: list[dict]) -> dict:
    """{task: {n, acc, acc_norm}} recomputed from per-item records: lm-eval's mean aggregation of acc, acc_norm."""
    out = {}
    for name in dict.fromkeys(p["task"] for p in items):
        ps = [p for p in items if p["task"] == name]
        norm = [p["acc_norm"] for p in ps if "acc_norm" in p]
        out[name] = {"n": len(ps), "acc": sum(p["acc"] for p in ps) / len(ps),
                     "acc_norm": sum(norm) / len(norm) if norm else None}
    return out


def summarize(items: list[dict], cfg) -> dict:
    """results_loglik of one variant: the eval stage's summarize of the records (accuracy = lm-eval's acc, same
    bootstrap CI), plus acc_norm with its CI where the task reports it, and lm-eval's per-task figures."""
    from pipeline import evalkit
    from pipeline.stages.eval import summarize as generative_summarize
    out = generative_summarize(items, cfg)
    for name, res in out.items():
        ps = [p for p in items if p["set"] == name]
        if ps and all("acc_norm" in p for p in ps):
            res["acc_norm"] = evalkit.accuracy_ci([p["acc_norm"] == 1.0 for p in ps], seed=cfg.eval.seed,
                                                  n_resamples=cfg.eval.n_bootstrap)
        res["harness"] = harness_figures(ps) if ps else {}
    return out


def check_own(name: str, items: list[dict], own: dict) -> None:
    """lm-eval's own per-task figures must be the means of the per-item records written (or the file is not its)."""
    mine = harness_figures(items)
    for task, fig in own.items():
        for k in ("n", "acc", "acc_norm"):
            a, b = fig.get(k), (mine.get(task) or {}).get(k)
            if not (a == b or (isinstance(a, float) and isinstance(b, float) and abs(a - b) < 1e-9)):
                raise StageFailed(f"{name} on {task}: lm-eval reports {k} {a!r}, its per-item records give {b!r}",
                                  code="loglik_task")


def describe(tasks: Tasks, seconds: dict) -> dict:
    """The evidence's `loglik` block: how the protocol ran."""
    from importlib import metadata
    return {"protocol": PROTOCOL, "harness": HARNESS, "lm_eval": metadata.version("lm_eval"),
            "num_fewshot": 0, "chat_template": False, "tasks_dir": "pipeline/evalsets/lm_eval_tasks",
            "tasks": {k: {"replicates": v, "n": len(tasks.samples[k])} for k, v in tasks.replicates.items()},
            "predictions": PREDICTIONS, "seconds": seconds}
