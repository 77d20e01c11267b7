"""`VLLM_ATTENTION_BACKEND=VATTENTION vllm serve` answers the OpenAI API, streams, rejects bad
input with vLLM's usual errors, survives clients that disconnect, and keeps serving."""

import http.client
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from vllm_vattention.bench.suite import wait_healthy

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODEL = os.path.join(ROOT, "models", "tiny-llama-kv8b")
PORT = 8123


def _post(path, body, timeout=60):
    c = http.client.HTTPConnection("127.0.0.1", PORT, timeout=timeout)
    c.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    r = c.getresponse()
    return r.status, r.read().decode()


@pytest.fixture(scope="module")
def server(cuda, tmp_path_factory):
    log = open(tmp_path_factory.mktemp("srv") / "server.log", "w+")
    env = {**os.environ, "VLLM_ATTENTION_BACKEND": "VATTENTION", "VLLM_USE_FLASHINFER_SAMPLER": "0"}
    p = subprocess.Popen([sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", MODEL,
                          "--load-format", "dummy", "--max-model-len", "2048", "--port", str(PORT),
                          "--gpu-memory-utilization", "0.3", "--enforce-eager"],
                         env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_healthy(PORT, p, 400)
    except RuntimeError as e:
        log.seek(0)
        pytest.fail(f"{e}:\n" + log.read()[-4000:])
    yield p, log
    p.terminate()
    p.wait(60)
    log.seek(0)
    text = log.read()
    assert "vAttention KV:" in text  # our KV manager really served
    serving = text.split("shutdown triggered")[0]  # SIGTERM's abort-mode teardown logs vLLM's own noise
    assert "Traceback" not in serving, serving[-4000:]
    assert "hazard_waits" in text  # the worker shut the manager down and reported its stats


def test_completion_and_chat(server):
    st, body = _post("/v1/completions", {"model": MODEL, "prompt": "hello world", "max_tokens": 8})
    assert st == 200 and len(json.loads(body)["choices"][0]["text"]) > 0
    st, body = _post("/v1/chat/completions", {"model": MODEL, "max_tokens": 8,
                                               "messages": [{"role": "user", "content": "hello"}]})
    assert st == 200 and json.loads(body)["choices"][0]["message"]["content"] is not None


def test_streaming(server):
    st, body = _post("/v1/completions", {"model": MODEL, "prompt": "memory page", "max_tokens": 12,
                                          "stream": True, "ignore_eos": True,
                                          "stream_options": {"include_usage": True}})
    events = [json.loads(l[6:]) for l in body.splitlines() if l.startswith("data: ") and l != "data: [DONE]"]
    assert st == 200 and body.rstrip().endswith("data: [DONE]")
    assert len([e for e in events if e["choices"]]) >= 2  # really streamed, not one block
    assert events[-1]["usage"]["completion_tokens"] == 12


def test_prompt_longer_than_max_model_len_is_a_400(server):
    st, body = _post("/v1/completions", {"model": MODEL, "prompt": "hello " * 3000, "max_tokens": 4})
    assert st == 400, body


def test_disconnecting_clients_and_a_burst_do_not_hurt_the_server(server):
    for _ in range(4):  # open a long stream, read a little, hang up
        s = socket.create_connection(("127.0.0.1", PORT))
        body = json.dumps({"model": MODEL, "prompt": "stream " * 200, "max_tokens": 500, "stream": True,
                           "ignore_eos": True})
        s.sendall((f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                   f"Content-Length: {len(body)}\r\n\r\n{body}").encode())
        assert s.recv(200)
        s.close()
    import concurrent.futures as cf
    with cf.ThreadPoolExecutor(32) as ex:  # a burst larger than comfortable for the KV budget
        res = list(ex.map(lambda i: _post("/v1/completions", {"model": MODEL, "prompt": "x " * (20 + 15 * i),
                                                              "max_tokens": 64, "ignore_eos": True}, 300),
                          range(48)))
    assert [st for st, _ in res] == [200] * len(res), [b for st, b in res if st != 200][:2]
    st, _ = _post("/v1/completions", {"model": MODEL, "prompt": "still there?", "max_tokens": 4})
    assert st == 200
    # Every block came back: once idle, vLLM reports no KV in use (cached prefixes count as free).
    deadline = time.time() + 30
    while time.time() < deadline:
        c = http.client.HTTPConnection("127.0.0.1", PORT, timeout=10)
        c.request("GET", "/metrics")
        lines = [l for l in c.getresponse().read().decode().splitlines() if l.startswith("vllm:kv_cache_usage_perc")]
        usage = float(lines[0].rsplit(" ", 1)[1])
        if usage == 0.0:
            break
        time.sleep(1)
    assert usage == 0.0, lines


def test_unservable_model_fails_at_start_with_the_fix(cuda, tmp_path):
    cfg = json.load(open(os.path.join(MODEL, "config.json")))
    cfg.update(architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=512)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / f).write_text(open(os.path.join(MODEL, f)).read())
    env = {**os.environ, "VLLM_ATTENTION_BACKEND": "VATTENTION"}
    r = subprocess.run([sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", str(tmp_path),
                        "--load-format", "dummy", "--port", str(PORT + 1)],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    assert "sliding-window attention" in r.stdout + r.stderr and "stock vLLM" in r.stdout + r.stderr


def test_served_with_the_flag_alone(cuda, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ATTENTION_BACKEND"}
    env["VLLM_USE_FLASHINFER_SAMPLER"] = "0"
    log = open(tmp_path / "flag.log", "w+")
    p = subprocess.Popen([sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", MODEL, "--load-format",
                          "dummy", "--max-model-len", "1024", "--port", str(PORT + 2), "--enforce-eager",
                          "--gpu-memory-utilization", "0.3", "--attention-backend", "CUSTOM"],
                         env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline, status = time.time() + 300, None
        while time.time() < deadline and p.poll() is None:
            try:
                c = http.client.HTTPConnection("127.0.0.1", PORT + 2, timeout=60)
                c.request("POST", "/v1/completions", json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": 4}),
                          {"Content-Type": "application/json"})
                status = c.getresponse().status
                break
            except OSError:
                time.sleep(2)
        assert status == 200
    finally:
        p.terminate()
        p.wait(60)
    log.seek(0)
    assert "vAttention KV:" in log.read()
