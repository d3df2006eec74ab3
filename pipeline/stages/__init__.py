"""The stage registry: a plain list, in run order. The stage name is the join key (configs, schemas, reports)."""
from pipeline.engine import Stage
from pipeline.settings import Config

TRAIN_SECTIONS = ("model", "lora", "data")


def _data(*keys):
    return lambda cfg: [cfg.data_path(getattr(cfg.data, k)) for k in keys if getattr(cfg.data, k)]


def _eval_inputs(cfg: Config) -> list:
    cmmlu = sorted(cfg.data_path(cfg.data.cmmlu_dir).glob("*.csv"))
    return [cfg.data_path(cfg.data.medqa_path), cfg.data_path(cfg.data.pubmedqa_path),
            cfg.data_path(cfg.data.pubmedqa_test_ids), *cmmlu]


STAGES = [
    Stage("gpu_bootstrap", (), lambda c: "reports/migration/gpu_bootstrap.json", sections=("model", "runtime"), in_all=False),
    Stage("gpu_check", (), lambda c: "reports/migration/gpu_check.json",
          inputs=lambda c: [c.data_path(p) for p in (c.runtime.gpu_probe_file, c.runtime.deepspeed_config) if p],
          sections=("model", "lora", "sft", "dpo", "simpo", "kto", "runtime.min_cuda_mem_gb_7b",
                    "runtime.min_cuda_mem_gb_14b", "runtime.nproc", "runtime.gpu_probe_file", "runtime.rehearsal",
                    "runtime.deepspeed_config"), always_run=True),
    Stage("dry_run", ("gpu_check",), lambda c: "reports/migration/dry_run.json",
          inputs=lambda c: _data("sft_path", "preference_path", "kto_path")(c) + _eval_inputs(c),
          sections=("model", "lora", "data", "sft", "dpo", "simpo", "kto", "eval", "judge"),
          in_all=False, done_status="dry_run"),
    Stage("sft", ("gpu_check",), lambda c: f"reports/training/layer_b_{c.slug}_sft_metrics.json",
          inputs=_data("sft_path"), sections=TRAIN_SECTIONS + ("sft",), training=True),
    Stage("dpo", ("sft",), lambda c: "reports/training/dpo_metrics.json",
          inputs=_data("preference_path"), sections=TRAIN_SECTIONS + ("dpo",), training=True),
    Stage("simpo", ("sft",), lambda c: "reports/training/simpo_metrics.json",
          inputs=_data("preference_path"), sections=TRAIN_SECTIONS + ("simpo",), training=True),
    Stage("kto", ("sft",), lambda c: "reports/training/kto_metrics.json",
          inputs=_data("preference_path", "kto_path"), sections=TRAIN_SECTIONS + ("kto",), training=True),
    Stage("eval", ("sft", "dpo", "simpo", "kto"), lambda c: "reports/eval/eval_default.json",
          inputs=_eval_inputs, sections=("model", "eval", "judge"), runs_after_skip=True),
    Stage("judge", ("sft", "dpo", "simpo", "kto"), lambda c: "reports/judge/judge_summary.json",
          inputs=_data("sft_path"), sections=("model", "data", "judge"), runs_after_skip=True),
    Stage("reports", ("eval", "judge"), lambda c: "reports/thesis_support/reports_manifest.json",
          sections=("eval", "judge"), runs_after_skip=True),
]
