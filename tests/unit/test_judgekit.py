"""The LLM judge toolkit (pipeline/judgekit.py) against the fake OpenAI-compatible server."""
import asyncio
import json
from pathlib import Path

import pytest

from pipeline.judgekit import (PAIRWISE_PROMPT, RISK_PROMPT, JudgeCache, build_messages, check_endpoint,
                               endpoint_host, estimate_cost, judge_all, parse_pairwise, parse_risk,
                               prompt_version)
from tests.fakes import FAKE_KEY, fake_openai, fake_reply  # noqa: F401  (fake_openai is a fixture)


def pair_items(n, prefix="q"):
    # answer_a is longer for even i, so the fake judge (prefers the longer answer) says A there
    return [{"question_id": f"{prefix}{i}", "variant": "dpo", "question": f"What treats condition {i}?",
             "answer_a": "Drug X, 5 mg daily, with monitoring." if i % 2 == 0 else "Drug X.",
             "answer_b": "Drug Y, twice a day."} for i in range(n)]


def run(items, server, cache, kind="pairwise", **kw):
    kw = {"timeout_s": 2, "max_retries": 2, "concurrency": 4, **kw}
    return asyncio.run(judge_all(items, kind=kind, base_url=server.base_url, api_key=kw.pop("api_key", FAKE_KEY),
                                 model="judge-1", cache=cache, **kw))


# ---------------------------------------------------------------- pure helpers
@pytest.mark.parametrize("reply,expected", [
    ('{"winner": "A", "reason": "safer"}', {"winner": "A", "reason": "safer"}),
    ('```json\n{"winner": "tie", "reason": "same"}\n```', {"winner": "tie", "reason": "same"}),
    ('Verdict: {"winner": "b", "reason": "more complete"} hope this helps', {"winner": "B", "reason": "more complete"}),
    ('{"winner": "C", "reason": "x"}', None),
    ('{"winner": "A", "reason": 3}', None),
    ("Answer A is better.", None),
    ('{"winner": "A", "reason": "cut', None),
])
def test_parse_pairwise(reply, expected):
    assert parse_pairwise(reply) == expected


def test_parse_risk():
    ok = '```json\n{"level": "High", "categories": ["wrong_dosage"], "explanation": "10x dose"}\n```'
    assert parse_risk(ok) == {"level": "high", "categories": ["wrong_dosage"], "explanation": "10x dose"}
    assert parse_risk('{"level": "severe", "categories": [], "explanation": ""}') is None
    assert parse_risk('{"level": "low", "categories": "dosage", "explanation": ""}') is None
    assert parse_risk("low risk") is None


def test_prompt_version_tracks_the_text():
    assert prompt_version("abc") == prompt_version("abc") != prompt_version("abd")
    assert len(prompt_version(PAIRWISE_PROMPT)) == 12 and prompt_version(PAIRWISE_PROMPT) != prompt_version(RISK_PROMPT)


def test_endpoint_host_drops_credentials_path_and_query():
    assert endpoint_host("https://user:pw@api.example.com/v1?key=abc") == "api.example.com:443"
    assert endpoint_host("http://127.0.0.1:8000/v1") == "127.0.0.1:8000"


def test_estimate_cost():
    table = {"judge-1": {"input_per_1m": 2.0, "output_per_1m": 8.0}}
    cost = estimate_cost({"prompt_tokens": 1_000_000, "completion_tokens": 500_000}, "judge-1", table)
    assert cost["usd"] == pytest.approx(6.0)
    assert estimate_cost({"prompt_tokens": 1}, "unknown-model", table) is None


def test_cache_survives_a_cut_last_line(tmp_path):
    path = tmp_path / "judge" / "cache.jsonl"
    cache = JudgeCache(path)
    k1 = JudgeCache.key(question_id="q1", variant="sft", kind="risk")
    assert k1 == JudgeCache.key(kind="risk", variant="sft", question_id="q1")  # order-independent
    cache.put(k1, {"verdict": {"level": "low"}})
    with open(path, "a") as f:
        f.write('{"key": "k2", "verdict": {"lev')  # a kill mid-write
    reloaded = JudgeCache(path)
    assert reloaded.get(k1)["verdict"] == {"level": "low"} and reloaded.get("k2") is None
    reloaded.put("k3", {"verdict": None})
    assert JudgeCache(path).get("k3") is not None and len(JudgeCache(path)) == 2


def test_check_endpoint(fake_openai):
    assert check_endpoint(fake_openai.base_url, FAKE_KEY) is None
    assert "rejected the API key" in check_endpoint(fake_openai.base_url, "sk-wrong")
    assert "cannot connect" in check_endpoint("http://127.0.0.1:9/v1", FAKE_KEY, timeout_s=1)


# ---------------------------------------------------------------- judge_all
def test_judge_all_records_the_servers_verdicts_and_rerun_is_free(fake_openai, tmp_path):
    items = pair_items(6)
    seen = []
    out = run(items, fake_openai, JudgeCache(tmp_path / "cache.jsonl"), on_progress=lambda d, n, r: seen.append(d))
    assert (out["n_judged"], out["n_unjudged"], out["n_cached"], out["n_requests"]) == (6, 0, 0, 6)
    assert [r["verdict"]["winner"] for r in out["results"]] == ["A", "B"] * 3
    for item, r in zip(items, out["results"]):
        assert r["verdict"] == parse_pairwise(fake_reply(build_messages("pairwise", item)))
        assert r["model"] == "judge-1-fake-2024" and r["system_fingerprint"] == "fp_fake_0001"
        assert r["usage"]["prompt_tokens"] > 0 and r["raw_reply"].startswith("{")
    assert out["system_fingerprints"] == ["fp_fake_0001"] and out["usage"]["completion_tokens"] > 0
    assert sorted(seen) == list(range(1, 7))
    assert len((tmp_path / "cache.jsonl").read_text().splitlines()) == 6

    again = run(items, fake_openai, JudgeCache(tmp_path / "cache.jsonl"))
    assert fake_openai.n_chat == 6 and again["n_requests"] == 0 and again["n_cached"] == 6
    assert [r["verdict"] for r in again["results"]] == [r["verdict"] for r in out["results"]]


def test_risk_judging(fake_openai, tmp_path):
    items = [{"question_id": "q1", "variant": "sft", "question": "Dose of paracetamol?", "answer": "10 g at once."}]
    out = run(items, fake_openai, JudgeCache(tmp_path / "c.jsonl"), kind="risk", max_tokens=64)
    assert out["results"][0]["verdict"]["level"] in {"none", "low", "medium", "high", "critical"}


def test_persistent_500_is_retried_a_bounded_number_of_times(fake_openai, tmp_path):
    fake_openai.default_fault = "500"
    out = run(pair_items(1), fake_openai, JudgeCache(tmp_path / "c.jsonl"), max_retries=3)
    r = out["results"][0]
    assert fake_openai.n_chat == 1 + 3
    assert (r["status"], r["verdict"], r["error"]) == ("unjudged", None, "InternalServerError")
    assert out["n_unjudged"] == 1 and not (tmp_path / "c.jsonl").exists()  # nothing cached


def test_429_then_success(fake_openai, tmp_path):
    fake_openai.script("429")
    out = run(pair_items(1), fake_openai, JudgeCache(tmp_path / "c.jsonl"))
    assert fake_openai.n_chat == 2 and out["results"][0]["status"] == "judged"


def test_timeout_is_unjudged(fake_openai, tmp_path):
    fake_openai.script("hang", "hang")
    out = run(pair_items(1), fake_openai, JudgeCache(tmp_path / "c.jsonl"), timeout_s=0.3, max_retries=1)
    r = out["results"][0]
    assert fake_openai.n_chat == 2
    assert (r["status"], r["verdict"], r["error"]) == ("unjudged", None, "APITimeoutError")


def test_malformed_body_and_unparsable_replies_never_become_verdicts(fake_openai, tmp_path):
    cache = JudgeCache(tmp_path / "c.jsonl")
    # item 0: a body that is not JSON; item 1: unparsable twice (re-asked once); item 2: re-ask succeeds
    fake_openai.script("malformed", "unparsable", "unparsable", "unparsable", "ok")
    out = run(pair_items(3), fake_openai, cache, concurrency=1, max_retries=0, max_reasks=1)
    r0, r1, r2 = out["results"]
    assert r0["status"] == "unjudged" and r0["verdict"] is None and r0["reason"] == "api_error"
    assert (r1["status"], r1["verdict"], r1["reason"], r1["n_requests"]) == ("unjudged", None, "unparsable", 2)
    assert "first answer is somewhat better" in r1["raw_reply"]
    assert r2["status"] == "judged" and r2["n_requests"] == 2 and r2["verdict"]["winner"] == "A"
    assert fake_openai.n_chat == 5
    rerun = run(pair_items(3), fake_openai, JudgeCache(tmp_path / "c.jsonl"), concurrency=1)
    assert rerun["n_cached"] == 1 and rerun["n_judged"] == 3  # unjudged items are asked again


def test_interrupted_run_resumes_with_only_the_rest(tmp_path):
    from tests.fakes import start_fake_openai

    path, items = tmp_path / "cache.jsonl", pair_items(12)

    async def interrupt(server):
        task = asyncio.create_task(judge_all(items, kind="pairwise", base_url=server.base_url, api_key=FAKE_KEY,
                                             model="judge-1", cache=JudgeCache(path), concurrency=2))
        while not path.exists() or len(path.read_text().splitlines()) < 3:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    with start_fake_openai(latency_ms=300) as server:
        asyncio.run(interrupt(server))
        done_before = len(path.read_text().splitlines())
        assert 3 <= done_before < 12
        before = server.n_chat
        out = run(items, server, JudgeCache(path))
        assert server.n_chat - before == 12 - done_before
        assert out["n_cached"] == done_before and out["n_judged"] == 12


def test_api_key_is_never_written(fake_openai, tmp_path):
    run(pair_items(2), fake_openai, JudgeCache(tmp_path / "c.jsonl"))
    wrong = "sk-wrong-SECRET-also-never-written"
    out = run(pair_items(2, prefix="w"), fake_openai, JudgeCache(tmp_path / "c.jsonl"), api_key=wrong)
    assert out["results"][0]["error"] == "AuthenticationError"
    (tmp_path / "summary.json").write_text(json.dumps(out))  # what a stage would write
    files = [p for p in Path(tmp_path).rglob("*") if p.is_file()]
    assert files
    for p in files:
        data = p.read_bytes()
        assert FAKE_KEY.encode() not in data and wrong.encode() not in data, p


def test_a_reply_that_echoes_the_key_in_any_field_never_writes_it(tmp_path, monkeypatch):
    """Issue 14 §5: only raw_reply and error_message were scrubbed; an endpoint that puts the key into the
    model id, the system fingerprint or the verdict's reason wrote it into the cache and the evidence."""
    from tests.fakes import openai_server
    from tests.fakes.openai_server import FakeOpenAI
    echo = json.dumps({"winner": "A", "reason": f"your key is {FAKE_KEY}"})
    monkeypatch.setattr(openai_server, "fake_reply", lambda messages: echo)
    with FakeOpenAI(api_key=FAKE_KEY, fingerprint=f"fp-{FAKE_KEY}", model_suffix=f"-{FAKE_KEY}") as server:
        out = run(pair_items(2), server, JudgeCache(tmp_path / "c.jsonl"))
    assert out["n_judged"] == 2
    from pipeline import evidence as ev
    ev.atomic_write_json(tmp_path / "summary.json", out)
    for p in tmp_path.rglob("*"):
        if p.is_file():
            assert FAKE_KEY.encode() not in p.read_bytes(), p
    assert out["results"][0]["verdict"]["reason"] == "your key is ***"
