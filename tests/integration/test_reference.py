"""Which reference DPO and KTO compared against (pipeline/reference.py): recorded when training begins, equal to
the SFT final's adapter on an honest run; a wrong reference (TRL's silent base-model fallback, or a "ref" adapter
that is not the SFT final) fails the stage; a tampered record fails the gate.

The stage tests fail at on_train_begin, before the first step: they load the tiny model, train nothing."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline import gate as G
from pipeline import reference
from pipeline.__main__ import main
from pipeline.settings import load_config
from pipeline.stages import REGISTRY

SFT_FINAL = "checkpoints/layer_b/tiny_sft/final"
REFERENCED = [m for m in REGISTRY.aligned if REGISTRY[m].method.reference != "none"]


def metrics(root: Path, stage: str) -> dict:
    return json.loads((root / REGISTRY[stage].evidence_path).read_text())


def edit(root: Path, stage: str, fn) -> None:
    path = root / REGISTRY[stage].evidence_path
    doc = json.loads(path.read_text())
    fn(doc)
    path.write_text(json.dumps(doc))


def test_the_registry_declares_a_reference_for_dpo_and_kto_only():
    assert REFERENCED == ["dpo", "kto"]
    assert {REGISTRY[m].method.reference for m in REFERENCED} == {"ref_adapter"}


def test_the_hash_ignores_order_and_an_exact_upcast_but_sees_one_changed_value():
    import torch
    g = torch.Generator().manual_seed(0)
    saved = {f"base_model.model.layers.{i}.q_proj.lora_{ab}.weight": torch.randn(4, 3, generator=g).to(torch.bfloat16)
             for i in range(2) for ab in "AB"}
    in_memory = {k: v.float() for k, v in reversed(saved.items())}   # PEFT upcasts a bf16 adapter at load
    assert reference.lora_sha256(saved) == reference.lora_sha256(in_memory)
    assert reference.lora_sha256({**saved, "base_model.model.lm_head.weight": torch.ones(2)}) \
        == reference.lora_sha256(saved)                                # LoRA tensors only
    changed = dict(in_memory)
    key = next(iter(changed))
    changed[key] = changed[key].clone()
    changed[key][0, 0] += 1e-3
    assert reference.lora_sha256(changed) != reference.lora_sha256(in_memory)
    assert reference.lora_sha256({}) is None


@pytest.mark.parametrize("stage", ["dpo", "kto"])
def test_an_honest_run_records_the_sft_final_as_the_reference(day1_env, stage):
    root = day1_env
    ref = metrics(root, stage)["reference"]
    assert ref["kind"] == "ref_adapter" and ref["equals_sft_final"] is True and ref["tensors"] > 0
    assert ref["sha256"] == reference.saved_adapter_sha256(root / SFT_FINAL)
    for free in ("simpo", "orpo"):   # reference-free: nothing to record
        assert "reference" not in metrics(root, free)


@pytest.mark.slow   # make test stays under 10 minutes on 2 cores; CI runs it in make test-slow
def test_a_tampered_reference_record_fails_the_gate(day1_env, monkeypatch):
    root = day1_env
    cfg = load_config(tier="tiny", env={"PIPELINE_ROOT": str(root)})
    before = {c["id"]: c for c in G.evaluate(cfg)["checks"]}
    assert before["dpo.reference"]["passed"] and before["kto.reference"]["passed"], before["dpo.reference"]
    # another valid-looking hash, the flag left at true: the gate recomputes, it does not read the flag
    edit(root, "dpo", lambda d: d["reference"].update(sha256="ab" * 32))
    edit(root, "kto", lambda d: d["reference"].update(kind="base_model_adapters_disabled"))
    verdict = G.evaluate(cfg)
    assert verdict["strict_pass"] is False
    assert {"dpo.reference", "kto.reference"} <= set(verdict["failed"]), verdict["failed"]
    assert {"dpo.metrics", "kto.metrics"}.isdisjoint(verdict["failed"])   # still schema-valid: caught by the hash
    detail = {c["id"]: c["detail"] for c in verdict["checks"]}
    assert "not the sha256 of the SFT final's adapter on disk" in detail["dpo.reference"]
    assert "base model" in detail["kto.reference"]


def _base_model_fallback(trainer) -> None:
    """What TRL does when it cannot add the "ref" copy (peft<0.20 with target_parameters, dpo_trainer.py:674-687):
    no "ref" adapter, so the reference log-probs come from the policy with its adapters disabled."""
    trainer.model.delete_adapter("ref")


def _perturbed_ref(trainer) -> None:
    import torch
    name, param = next((n, p) for n, p in trainer.model.named_parameters() if ".lora_B.ref." in n)
    with torch.no_grad():
        param[0, 0] += 0.01


@pytest.mark.parametrize("stage,wrong,says", [("dpo", _base_model_fallback, "the base model"),
                                              ("kto", _perturbed_ref, "is not the SFT final's")])
def test_a_wrong_reference_fails_the_stage_before_the_first_step(day1_env, monkeypatch, stage, wrong, says):
    root = day1_env
    module = __import__(f"pipeline.stages.{stage}", fromlist=["trainer"])
    config_cls, trainer_cls, paired, extra = module.trainer(None)

    class Wrong(trainer_cls):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            wrong(self)

    monkeypatch.setattr(module, "trainer", lambda cfg: (config_cls, Wrong, paired, extra))
    assert main(["run", stage, f"{stage}.max_steps=2", "--no-deps"]) == 1
    m = metrics(root, stage)
    assert m["status"] == "failed" and m["reason_code"] == "reference_mismatch", m.get("reason")
    assert says in m["reason"] and "\n" not in m["reason"]
    out = root / REGISTRY[stage].checkpoint(load_config(tier="tiny", env={"PIPELINE_ROOT": str(root)}))
    assert not list(out.glob("checkpoint-*")), "the stage must stop before it trains a step"
    cfg = load_config(tier="tiny", env={"PIPELINE_ROOT": str(root)})
    rows = {c["id"]: c for c in G.check_stage(cfg, stage)}
    assert not rows[f"{stage}.metrics"]["passed"] and rows[f"{stage}.metrics"].get("code") == "reference_mismatch"


@pytest.mark.parametrize("ref_saved", [True, False])
def test_a_rerun_past_the_plan_takes_the_reference_from_the_last_checkpoint(day1_env, ref_saved):
    """Killed after the last checkpoint, before the metrics: the re-run trains nothing (no trainer, no
    on_train_begin), so the record comes from the "ref" adapter the trainer saved in that checkpoint."""
    import shutil
    root = day1_env
    (root / REGISTRY["dpo"].evidence_path).unlink()
    last = max((root / "checkpoints/dpo-real-baseline").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    if not ref_saved:
        shutil.rmtree(last / "ref")   # a trainer without the "ref" copy saves none
    assert main(["run", "dpo", "--no-deps"]) == (0 if ref_saved else 1)
    m = metrics(root, "dpo")
    if ref_saved:
        assert m["status"] == "ok" and m["reference"]["kind"] == "ref_adapter"
        assert m["reference"]["sha256"] == reference.saved_adapter_sha256(root / SFT_FINAL)
    else:
        assert m["status"] == "failed" and m["reason_code"] == "reference_mismatch" and "base model" in m["reason"]
