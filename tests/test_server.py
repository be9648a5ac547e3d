"""The HTTP server: a real uvicorn on 127.0.0.1 (a free port) serving the embedded model, driven by the `openai`
client and by httpx. Served greedy output equals `pyrajax.generate` of the same prompt alone, token for token,
one request at a time and 32 at once (mixed lengths, policies, chat and completions, streaming or not).
Every network wait is bounded in count and time."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest

import pyrajax
from pyrajax.engine import make_engine, resolve_policies
from pyrajax.server import create_app

POLICIES = ["budget-128", "full"]  # budget-128 compresses prompts longer than its 128-token floor
MAX_PROMPT, MAX_NEW = 256, 32
TIMEOUT = 300  # seconds for one request: the first of each bucket compiles on a shared CPU
ESSAY = Path(__file__).resolve().parents[2] / "shared" / "data" / "paul-graham-essays" / "gh.txt"


def free_socket() -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@pytest.fixture(scope="module")
def server(smol):
    import uvicorn
    params, cfg = smol
    policies = resolve_policies(POLICIES)
    # one prefill per arrival: each prompt bucket compiles one prefill program (batched prefill: test_engine)
    engine = make_engine(params, cfg, list(policies.values()), slots=8, max_prompt=MAX_PROMPT, max_new=MAX_NEW,
                         max_waiting=64, max_prefill_batch=1)
    app = create_app(engine, pyrajax.get_tokenizer(cfg), "smol", policies)
    sock = free_socket()
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=srv.run, kwargs=dict(sockets=[sock]), daemon=True)
    thread.start()
    for _ in range(600):
        if srv.started:
            break
        time.sleep(0.1)
    assert srv.started, "uvicorn did not start in 60 s"
    host, port = sock.getsockname()
    yield dict(url=f"http://{host}:{port}", engine=engine)
    srv.should_exit = True
    thread.join(30)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server["url"] + "/v1", api_key="none", timeout=TIMEOUT, max_retries=0)


def texts(smol, n):
    """n prompts of mixed lengths: short questions (under every floor) and essay passages (compressed by
    budget-128: 150-240 tokens)."""
    tok = pyrajax.get_tokenizer(smol[1])
    essay = tok.encode(ESSAY.read_text())
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        if i % 2:
            start, length = int(rng.integers(0, 2000)), int(rng.integers(140, 200))
            out.append(tok.decode(essay[start:start + length]) + "\n\nIn one sentence, the passage says")
        else:
            out.append(["What is the capital of France?", "Name three colours.", "Why is the sky blue?",
                        "Write a haiku about rain."][i // 2 % 4])
    return out


def alone(smol, prompt, max_new, cache, **kw):
    """Token ids of `pyrajax.generate` on this prompt (a string or a conversation) alone, EOS dropped."""
    params, cfg = smol
    r = pyrajax.generate(params, [prompt], pyrajax.GenerationConfig(model=cfg, max_new_tokens=max_new,
                                                                    cache=cache, **kw))
    return r.tokens[0], r.texts[0]


def served_ids(token_ids, cfg):
    return [t for t in token_ids if t not in cfg.eos_ids]


def stream_ids(chunks) -> tuple[list[int], str, str | None]:
    """Token ids, text and finish reason of a stream's chunks (chat deltas or completion texts)."""
    ids, text, finish = [], [], None
    for c in chunks:
        if not c.choices:
            continue
        ch = c.choices[0]
        ids += getattr(ch, "token_ids", None) or []
        text.append((ch.delta.content or "") if hasattr(ch, "delta") else ch.text)
        finish = ch.finish_reason or finish
    return ids, "".join(text), finish


# ---------------------------------------------------------------------------------------------------------

def test_models_health_and_metrics(server, client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["smol"] and models.data[0].object == "model"
    assert httpx.get(server["url"] + "/health", timeout=10).json() == {"status": "ok"}
    text = httpx.get(server["url"] + "/metrics", timeout=10).text
    for name in ("pyrajax_requests_running", "pyrajax_requests_waiting", "pyrajax_generation_tokens_total",
                 "pyrajax_kv_cache_allocated_bytes", "pyrajax_kv_cache_live_bytes",
                 "pyrajax_time_to_first_token_seconds_bucket", "pyrajax_time_per_output_token_seconds_count"):
        assert f"\n{name}" in text, name


def test_completions_and_chat_equal_generate(smol, client):
    prompt = "The capital of France is"
    want, want_text = alone(smol, prompt, 12, "budget-128")
    r = client.completions.create(model="smol", prompt=prompt, max_tokens=12, temperature=0)
    assert served_ids(r.choices[0].token_ids, smol[1]) == want and r.choices[0].text == want_text
    assert r.usage.prompt_tokens == len(pyrajax.get_tokenizer(smol[1]).encode(prompt))
    ids, text, finish = stream_ids(client.completions.create(model="smol", prompt=prompt, max_tokens=12,
                                                             temperature=0, stream=True))
    assert served_ids(ids, smol[1]) == want and text == want_text and finish in ("stop", "length")

    conv = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is 2 + 2?"}]
    want, want_text = alone(smol, conv, 16, "budget-128")
    r = client.chat.completions.create(model="smol", messages=conv, max_tokens=16, temperature=0)
    assert served_ids(r.choices[0].token_ids, smol[1]) == want and r.choices[0].message.content == want_text
    chunks = list(client.chat.completions.create(model="smol", messages=conv, max_tokens=16, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(r.choices[0].token_ids)
    ids, text, _ = stream_ids(chunks)
    assert served_ids(ids, smol[1]) == want and text == want_text


def test_stop_strings_and_ids(smol, client):
    _, full_text = alone(smol, "The capital of France is", 12, "budget-128")
    word = full_text.split()[1]  # a word inside the answer
    r = client.completions.create(model="smol", prompt="The capital of France is", max_tokens=12, temperature=0,
                                  stop=[word])
    assert r.choices[0].finish_reason == "stop" and r.choices[0].text == full_text[:full_text.index(word)]
    ids, _ = alone(smol, "The capital of France is", 12, "budget-128")
    r = client.completions.create(model="smol", prompt="The capital of France is", max_tokens=12, temperature=0,
                                  extra_body={"stop_token_ids": [ids[2]]})
    assert r.choices[0].finish_reason == "stop" and r.choices[0].token_ids == ids[:3]


def test_32_concurrent_mixed_requests_equal_each_alone(smol, server):
    """32 requests at once through 8 slots: chat and completions, streaming and not, two policies, greedy and
    seeded sampling, 150-240-token essay passages and short questions, 1-16 new tokens. Each one's tokens, in
    order, are exactly what `generate` gives its prompt alone."""
    rng = np.random.default_rng(1)
    jobs = []
    for i, text in enumerate(texts(smol, 32)):
        chat = i % 4 in (0, 3)
        prompt = [{"role": "user", "content": text}] if chat else text
        kw = dict(temperature=0.0) if i % 3 else dict(temperature=0.8, top_p=0.9, seed=int(rng.integers(1000)))
        jobs.append(dict(prompt=prompt, chat=chat, stream=i % 2 == 0, cache=POLICIES[i // 2 % 2],
                         max_tokens=int(rng.integers(1, 17)), kw=kw))

    def call(job):
        c = openai.OpenAI(base_url=server["url"] + "/v1", api_key="none", timeout=TIMEOUT, max_retries=0)
        common = dict(model="smol", max_tokens=job["max_tokens"], stream=job["stream"],
                      extra_body={"cache": job["cache"]}, **job["kw"])
        if job["chat"]:
            r = c.chat.completions.create(messages=job["prompt"], **common)
        else:
            r = c.completions.create(prompt=job["prompt"], **common)
        if job["stream"]:
            return stream_ids(r)[:2]
        return r.choices[0].token_ids, (r.choices[0].message.content if job["chat"] else r.choices[0].text)

    with ThreadPoolExecutor(32) as pool:
        got = list(pool.map(call, jobs))
    for job, (ids, text) in zip(jobs, got):
        want, want_text = alone(smol, job["prompt"], job["max_tokens"], job["cache"], **job["kw"])
        assert served_ids(ids, smol[1]) == want and text == want_text, job
    assert server["engine"].running == 0


def test_cancel_mid_stream_frees_the_slot(server, client):
    engine = server["engine"]
    before = engine.generated_tokens
    stream = client.completions.create(model="smol", prompt="Count: 1, 2, 3,", max_tokens=MAX_NEW, temperature=0,
                                       stream=True, extra_body={"ignore_eos": True})
    got = 0
    for chunk in stream:
        got += len(chunk.choices[0].token_ids)
        if got:
            break
    stream.close()  # the client goes away mid-stream
    for _ in range(200):
        if engine.running == 0:
            break
        time.sleep(0.05)
    assert engine.running == 0, "the cancelled request still holds its slot after 10 s"
    # freed within two decode chunks of 8 tokens after the one the client saw, never run to max_tokens
    assert engine.generated_tokens - before <= got + 2 * engine.steps + engine.steps < MAX_NEW


def test_queue_full_is_503_with_retry_after(server, client):
    engine = server["engine"]
    limit, engine.max_waiting = engine.max_waiting, 0
    try:
        with pytest.raises(openai.APIStatusError) as e:
            client.completions.create(model="smol", prompt="Hello", max_tokens=2)
    finally:
        engine.max_waiting = limit
    assert e.value.status_code == 503 and e.value.response.headers["retry-after"] == "1"
    assert e.value.body["message"].startswith("the server is busy")


@pytest.mark.parametrize("path,body,param", [
    ("completions", {"prompt": "x " * 600, "max_tokens": 4}, "prompt"),  # longer than --max-prompt: refused
    ("completions", {"prompt": "Hi", "max_tokens": MAX_NEW + 1}, None),
    ("completions", {"prompt": "Hi", "max_tokens": 0}, "max_tokens"),
    ("completions", {"prompt": "Hi", "n": 2}, "n"),
    ("completions", {"prompt": "Hi", "temperature": -1}, "temperature"),
    ("completions", {"prompt": "Hi", "top_p": 0}, "top_p"),
    ("completions", {"prompt": "Hi", "top_k": "5"}, "top_k"),
    ("completions", {"prompt": "Hi", "seed": -3}, "seed"),
    ("completions", {"prompt": "Hi", "top_k": 10**6}, "top_k"),
    ("completions", {"prompt": "Hi", "stop": [10**9]}, "stop"),
    ("completions", {"prompt": "Hi", "stop_token_ids": [-1]}, "stop"),
    ("completions", {"prompt": "Hi", "stop": {"a": 1}}, "stop"),
    ("completions", {"prompt": "Hi", "cache": "h2o-0.5"}, "cache"),
    ("completions", {"prompt": [], "max_tokens": 2}, "prompt"),
    ("completions", {"prompt": [10**9], "max_tokens": 2}, None),
    ("completions", {"max_tokens": 2}, "prompt"),
    ("chat/completions", {"messages": []}, "messages"),
    ("chat/completions", {"messages": [{"role": "robot", "content": "hi"}]}, "messages"),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi"}], "logprobs": True}, "logprobs"),
])
def test_bad_requests_are_400_with_the_error_body(server, path, body, param):
    r = httpx.post(f"{server['url']}/v1/{path}", json=body, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"] and err["param"] == param
    if body.get("prompt") == "x " * 600:
        assert err["code"] == "context_length_exceeded" and "maximum context" in err["message"]


def test_engine_failure_mid_stream_is_an_error_chunk_then_the_server_recovers(server, client):
    engine = server["engine"]
    step = engine.step

    def failing():
        del engine.step  # fail once, then the class's own step again
        raise RuntimeError("injected failure")

    body = {"prompt": "Count: 1, 2, 3,", "max_tokens": MAX_NEW, "temperature": 0, "ignore_eos": True,
            "stream": True}
    events = []
    with httpx.stream("POST", f"{server['url']}/v1/completions", json=body, timeout=TIMEOUT) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
                if len(events) == 1:
                    engine.step = failing
    assert engine.step == step
    assert events[-1] == "[DONE]" and "injected failure" in json.loads(events[-2])["error"]["message"]
    r = client.completions.create(model="smol", prompt="The capital of France is", max_tokens=3, temperature=0)
    assert len(r.choices[0].token_ids) == 3 and engine.running == 0


def test_invalid_json_and_unknown_model(server):
    r = httpx.post(f"{server['url']}/v1/completions", content=b"{not json", timeout=30,
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = httpx.post(f"{server['url']}/v1/completions", json={"model": "gpt-9", "prompt": "Hi"}, timeout=30)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = httpx.post(f"{server['url']}/v1/completions", json={"prompt": "Hi", "max_tokens": 2, "frobnicate": [1]},
                   timeout=TIMEOUT)  # unknown fields are ignored
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2


def test_sigterm_drains_running_requests_then_exits():
    """A server in its own process (random SmolLM2-shaped weights, token ids in and out): SIGTERM closes the
    socket at once (new connections are refused while the running stream goes on), the running stream still
    ends normally, then the process exits 0."""
    sock = free_socket()
    port = sock.getsockname()[1]
    sock.close()
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.Popen([sys.executable, "-m", "pyrajax.cli", "serve", "--random", "smollm2-135m",
                             "--port", str(port), "--slots", "2", "--max-prompt", "16", "--max-new", "64",
                             "--steps", "4", "--drain-timeout", "120"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"

    def refused() -> bool:
        try:
            httpx.get(url + "/health", timeout=5)
            return False
        except httpx.TransportError:
            return True

    try:
        for _ in range(240):
            if not refused():
                break
            time.sleep(0.5)
        else:
            pytest.fail("the server did not come up in 2 minutes")
        body = {"prompt": [5, 6, 7, 8], "max_tokens": 64, "temperature": 0, "ignore_eos": True, "stream": True}
        ids, finish, done = [], None, False
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=TIMEOUT) as r:
            lines = r.iter_lines()
            for line in lines:
                if line.startswith("data: {"):
                    ids += json.loads(line[6:])["choices"][0]["token_ids"]
                    break
            proc.send_signal(signal.SIGTERM)
            for _ in range(100):  # admission stops: the listening socket closes while the stream goes on
                if refused():
                    break
                time.sleep(0.1)
            else:
                pytest.fail("the server still accepts connections 10 s after SIGTERM")
            for line in lines:
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: {"):
                    choice = json.loads(line[6:])["choices"][0]
                    ids += choice["token_ids"]
                    finish = choice["finish_reason"] or finish
        assert done and finish == "length" and len(ids) == 64
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
