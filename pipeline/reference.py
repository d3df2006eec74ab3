"""Which reference DPO and KTO compare against, hashed when training begins and held against the SFT final.

A method's Method.reference (pipeline/core.py) declares what its loss must compare against: "ref_adapter" (TRL's
frozen copy of the SFT adapter, added as the PEFT adapter "ref": trl/trainer/dpo_trainer.py:666-694,
kto_trainer.py:717-745) or "none" (SimPO, ORPO: reference-free). TRL falls back, with only a log warning, to the
base model with the adapters disabled when it cannot add the copy (use_adapter(model, None):
dpo_trainer.py:1252-1256, kto_trainer.py:1301-1303); LLaMA-Factory users lost runs that way (its issues #8459,
#8974). That fallback, or a "ref" adapter that is not the SFT final, fails the stage (code reference_mismatch).

The hash: sha256 over the LoRA tensors as PEFT saves them (get_peft_model_state_dict takes the adapter name out of
each key, so the "ref" adapter in memory and the SFT final's adapter_model.safetensors compare), sorted by name,
each as its name, shape and float32 values (PEFT upcasts a bf16/fp16 adapter to float32 at load: exact).
"""
from __future__ import annotations

import hashlib
import weakref
from pathlib import Path

from pipeline.core import StageFailed

ADAPTER_FILE = "adapter_model.safetensors"
KINDS = {   # what TRL's trainer compares against, as reference_of() reads it off the trainer
    "ref_adapter": 'the frozen "ref" adapter TRL copied from the starting adapter',
    "base_model_adapters_disabled": 'the base model: the policy with its adapters disabled (no "ref" adapter)',
    "separate_model": "a second model (trainer.ref_model)",
    "initial_policy": "the policy before training (no adapter, precomputed reference log-probs)",
}


def lora_sha256(tensors: dict) -> str:
    """sha256 over the LoRA tensors of {saved key: tensor}, in name order, values as float32."""
    import torch
    h = hashlib.sha256()
    names = sorted(k for k in tensors if ".lora_" in k)
    for name in names:
        t = tensors[name].detach().to("cpu", torch.float32).contiguous()
        h.update(f"{name}:{tuple(t.shape)}\n".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest() if names else None


def saved_adapter_sha256(folder) -> str | None:
    """lora_sha256 of a saved adapter folder (an SFT final, a checkpoint's ref/); None without an adapter file."""
    path = Path(folder) / ADAPTER_FILE
    if not path.is_file():
        return None
    from safetensors.torch import load_file
    return lora_sha256(load_file(str(path)))


def reference_of(trainer) -> dict:
    """{kind, sha256, tensors} of the reference `trainer` computes its reference log-probs with, by TRL's own rule:
    trainer.ref_model if set, else the PEFT adapter "ref" if the policy has one, else the adapters disabled."""
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict
    ref = getattr(trainer, "ref_model", None)
    model = trainer.accelerator.unwrap_model(ref if ref is not None else trainer.model)
    adapter = None
    if isinstance(model, PeftModel):
        adapter = model.active_adapter if ref is not None else ("ref" if "ref" in model.peft_config else None)
    if ref is not None:
        kind = "separate_model"
    else:
        kind = "ref_adapter" if adapter else "base_model_adapters_disabled" if isinstance(model, PeftModel) \
            else "initial_policy"
    tensors = get_peft_model_state_dict(model, adapter_name=adapter, save_embedding_layers=False) if adapter else {}
    return {"kind": kind, "sha256": lora_sha256(tensors), "tensors": sum(".lora_" in k for k in tensors)}


def require(found: dict, declared: str, stage: str, sft_rel: str, want: str | None) -> dict:
    """The reference record for the metrics; StageFailed(code="reference_mismatch") unless the reference is the
    declared kind and hashes to the SFT final's adapter."""
    record = {**found, "equals_sft_final": found["sha256"] is not None and found["sha256"] == want}
    if found["kind"] != declared:
        raise StageFailed(f"{stage}: TRL's reference is {KINDS.get(found['kind'], found['kind'])}, but {stage} "
                          f"declares {declared!r} (a frozen copy of the SFT final {sft_rel}): the loss would not "
                          "compare against the SFT model; check the installed trl/peft versions (pip show trl "
                          f"peft) and {stage}.trl, then re-run {stage}", code="reference_mismatch")
    if not record["equals_sft_final"]:
        raise StageFailed(f"{stage}: the reference adapter TRL will use (sha256 {str(found['sha256'])[:12]}) is not "
                          f"the SFT final's ({sft_rel}/{ADAPTER_FILE}, sha256 {str(want)[:12]}): re-run {stage} "
                          "with --force", code="reference_mismatch")
    return record


def from_checkpoint(ckpt, declared: str, stage: str, sft_rel: str, want: str | None) -> dict:
    """The record when no trainer ran here (the plan was already reached): the "ref" adapter the trainer saved
    beside the policy's in its last checkpoint (PEFT saves every adapter; a second one goes to <checkpoint>/ref)."""
    sha = saved_adapter_sha256(Path(ckpt) / "ref") if ckpt else None
    kind = "ref_adapter" if sha else "base_model_adapters_disabled"
    return require({"kind": kind, "sha256": sha, "tensors": None}, declared, stage, sft_rel, want)


def watcher(declared: str, stage: str, sft_dir: Path, sft_rel: str):
    """A TrainerCallback shared by every trainer the stage builds (curriculum sub-stages, OOM retries): watch(trainer)
    adds it; on_train_begin (after a resumed checkpoint is loaded, before the first step) it hashes that trainer's
    reference and fails the stage unless it is the SFT final's adapter; `record` then holds the metrics' entry."""
    from transformers import TrainerCallback
    want = saved_adapter_sha256(sft_dir)

    class ReferenceCheck(TrainerCallback):
        record: dict | None = None
        _trainer = None   # a weak reference: the callback must not keep a dropped trainer's model alive

        def watch(self, trainer):
            self._trainer = weakref.ref(trainer)
            trainer.add_callback(self)
            return trainer

        def on_train_begin(self, args, state, control, **kw):
            self.record = require(reference_of(self._trainer()), declared, stage, sft_rel, want)

        def final(self, ckpt) -> dict:
            return self.record or from_checkpoint(ckpt, declared, stage, sft_rel, want)

    return ReferenceCheck()
