"""The stage registry: the only list of stages, in run order. The stage name is the join key (configs, schemas,
reports). Each pipeline/stages/<name>.py declares itself (STAGE) beside its run() and checks(); adding a stage or a
training method is its file plus its name here."""
from pipeline.core import Registry

ORDER = ["gpu_bootstrap", "gpu_check", "download", "dry_run", "gpu_selftest", "preflight", "sft", "dpo", "simpo", "kto",
         "orpo", "eval", "judge", "reports", "seeds", "export_merged"]
REGISTRY = Registry.from_modules(ORDER)
