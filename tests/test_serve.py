"""The OpenAI-compatible server (`serve/`), started for real on a free port.

A uvicorn server runs on a thread over a tiny dummy model on the CPU; the official
`openai` client and raw HTTP talk to it. Greedy outputs equal the in-process
`LLM.generate` / `LLM.chat` (text, finish reason, log-probabilities), streamed or not;
bad requests answer 400 with an OpenAI error naming the field and the server keeps
answering; streaming clients that leave mid-stream have their requests aborted (no
request left in the engine, every KV block free); a full server answers 503.
"""

import http.client
import json
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from conftest import REPO_ROOT, load_stage  # noqa: E402
from serve.__main__ import make_server, parse_args  # noqa: E402

MODEL = "dummy:tiny-llama"
KV = str(16 * 2 ** 20)  # bytes: plenty for the tiny model, little memory


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m serve ARGS`, in this process: uvicorn on a thread, the engine on its own."""

    def __init__(self, *args: str) -> None:
        self.port = free_port()
        package, parsed = parse_args(["--model", MODEL, "--device", "cpu", "--kv-cache-memory",
                                      KV, "--port", str(self.port), *args])
        self.package = package
        self.server, self.loop = make_server(package, parsed)
        self.loop.start()
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline, "the server did not start"
            time.sleep(0.05)
        self.client = openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1",
                                    api_key="none", max_retries=0)

    def post(self, path: str, body) -> tuple[int, dict]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        payload = body if isinstance(body, (bytes, str)) else json.dumps(body)
        conn.request("POST", path, payload, {"Content-Type": "application/json"})
        response = conn.getresponse()
        status, data = response.status, response.read()
        conn.close()
        return status, json.loads(data)

    def idle(self, timeout: float = 30) -> bool:
        """Wait until no request is left in the engine; True if so."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if (not self.loop.streams and not self.loop.engine.has_unfinished_requests()
                    and self.loop.open_requests == 0):
                return True
            time.sleep(0.05)
        return False

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.loop.stop()


@pytest.fixture(scope="module")
def server():
    s = Server("--stage", "m7")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def llm():
    return load_stage("m7_gptq").LLM(model=MODEL, device="cpu", kv_cache_memory=int(KV))


def greedy(llm, prompt, n_tokens=12, **kw):
    params = load_stage("m7_gptq").SamplingParams(temperature=0, max_tokens=n_tokens, **kw)
    return llm.generate([prompt], params, use_tqdm=False)[0].outputs[0]


def test_models_and_health(server):
    assert [m.id for m in server.client.models.list().data] == [MODEL]
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    conn.request("GET", "/health")
    assert conn.getresponse().status == 200


@pytest.mark.parametrize("prompt", ["Hello, server", [5, 77, 300, 12, 9, 401]])
def test_a_completion_equals_generate(server, llm, prompt):
    out = server.client.completions.create(model=MODEL, prompt=prompt, max_tokens=12,
                                           temperature=0)
    want = greedy(llm, prompt)
    assert out.choices[0].text == want.text and len(want.token_ids) == 12
    assert out.choices[0].finish_reason == "length"
    n_prompt = len(prompt) if isinstance(prompt, list) else len(llm.encode(prompt))
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (n_prompt, 12)


def test_a_streamed_completion_adds_up_to_the_same_text(server, llm):
    chunks = list(server.client.completions.create(
        model=MODEL, prompt="Stream me", max_tokens=12, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert len(texts) > 1  # token by token, not all at once
    assert "".join(texts) == greedy(llm, "Stream me").text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12


def test_chat_equals_llm_chat(server, llm):
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "What is 2 + 2?"}]
    params = load_stage("m7_gptq").SamplingParams(temperature=0, max_tokens=10)
    want = llm.chat(messages, params, use_tqdm=False)[0].outputs[0].text
    out = server.client.chat.completions.create(model=MODEL, messages=messages,
                                                max_tokens=10, temperature=0)
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == want
    stream = server.client.chat.completions.create(model=MODEL, messages=messages,
                                                   max_tokens=10, temperature=0, stream=True)
    deltas = [c.choices[0].delta for c in stream]
    assert deltas[0].role == "assistant"
    assert "".join(d.content or "" for d in deltas) == want


def test_stop_strings_and_n(server, llm):
    full = greedy(llm, "Stop here", 24).text
    stop = full[5:8]
    out = server.client.completions.create(model=MODEL, prompt="Stop here", max_tokens=24,
                                           temperature=0, stop=[stop])
    assert out.choices[0].text == full[:full.index(stop)]
    assert out.choices[0].finish_reason == "stop"
    two = server.client.completions.create(model=MODEL, prompt="Two of them", max_tokens=8,
                                           temperature=1.0, seed=3, n=2)
    assert sorted(c.index for c in two.choices) == [0, 1]
    again = server.client.completions.create(model=MODEL, prompt="Two of them", max_tokens=8,
                                             temperature=1.0, seed=3, n=2)
    assert [c.text for c in two.choices] == [c.text for c in again.choices]  # seeded
    assert two.usage.completion_tokens == 16


def test_logprobs_equal_the_engines(server, llm):
    want = greedy(llm, "Log me", 6, logprobs=2)
    out = server.client.completions.create(model=MODEL, prompt="Log me", max_tokens=6,
                                           temperature=0, logprobs=2)
    got = out.choices[0].logprobs
    engine = [pos[tid].logprob for pos, tid in zip(want.logprobs, want.token_ids)]
    assert got.token_logprobs == pytest.approx(engine, abs=1e-5)
    for top, position in zip(got.top_logprobs, want.logprobs):  # the top 2 and the chosen
        # (by their text, which byte tokens may share: at most 3 keys)
        assert 1 <= len(top) <= 3
        assert max(top.values()) == pytest.approx(max(lp.logprob for lp in position.values()),
                                                  abs=1e-5)
    chat = server.client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4,
        temperature=0, logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert len(content) == 4 and all(len(c.top_logprobs) == 3 for c in content)
    assert all(c.logprob <= 0 for c in content)


BAD_REQUESTS = [
    ("/v1/completions", {"prompt": "x"}, "model"),
    ("/v1/completions", {"model": "other", "prompt": "x"}, "model"),
    ("/v1/completions", {"model": MODEL}, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": ""}, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": ["a", "b"]}, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": [1, "x"]}, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": "5"}, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "temperature": -1}, "temperature"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "temperature": True}, "temperature"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "top_p": 0}, "top_p"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "top_k": -2}, "top_k"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "min_p": 2}, "min_p"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "n": 0}, "n"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "seed": -1}, "seed"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "stop": 5}, "stop"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "logprobs": 50}, "logprobs"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "presence_penalty": 3},
     "presence_penalty"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "stream_options": {}}, None),
    ("/v1/completions", {"model": MODEL, "prompt": [1] * 5000}, "prompt"),  # too long
    ("/v1/completions", {"model": MODEL, "prompt": [10 ** 6]}, "prompt"),  # not a token
    ("/v1/chat/completions", {"model": MODEL, "messages": []}, "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "robot",
                                                            "content": "x"}]}, "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                              "top_logprobs": 2}, "top_logprobs"),
    ("/v1/completions", b"{not json", None),
    ("/v1/completions", [1, 2], None),
]


@pytest.mark.parametrize("path, body, field", BAD_REQUESTS)
def test_a_bad_request_answers_400_naming_the_field(server, path, body, field):
    status, data = server.post(path, body)
    assert status == 400, data
    error = data["error"]
    assert error["type"] in ("invalid_request_error", "model_not_found")
    assert error["message"]
    if field is not None:
        assert error["param"] == field, error
    status, _ = server.post("/v1/completions", {"model": MODEL, "prompt": "ok",
                                                "max_tokens": 2})
    assert status == 200  # still serving


def test_a_stage_without_a_setting_refuses_it_by_name():
    s = Server("--stage", "m2")
    try:
        status, data = s.post("/v1/completions", {"model": MODEL, "prompt": "x", "n": 2})
        assert status == 400 and data["error"]["param"] == "n"
        status, data = s.post("/v1/completions", {"model": MODEL, "prompt": "x",
                                                  "max_tokens": 3, "temperature": 0})
        assert status == 200 and data["usage"]["completion_tokens"] == 3
    finally:
        s.stop()


def _stream_and_maybe_leave(port: int, index: int, leave: bool, results: list) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    # one that leaves asks for far more tokens than it reads: only an abort ends it soon
    body = {"model": MODEL, "prompt": f"client {index}", "max_tokens": 1000 if leave else 40,
            "stream": True, "temperature": 0, "ignore_eos": True}
    conn.request("POST", "/v1/completions", json.dumps(body),
                 {"Content-Type": "application/json"})
    response = conn.getresponse()
    text, events = "", 0
    while True:
        line = response.readline()
        if not line:
            break
        if line.startswith(b"data: ") and line.strip() != b"data: [DONE]":
            text += json.loads(line[6:])["choices"][0]["text"]
            events += 1
            if leave and events == 3:  # gone mid-stream
                conn.sock.shutdown(socket.SHUT_RDWR)
                conn.close()
                results[index] = "left"
                return
    conn.close()
    results[index] = text


def test_clients_that_leave_mid_stream_free_everything(server, llm):
    num_clients = 64
    results = [None] * num_clients
    engine = server.loop.engine
    aborted, abort = [], engine.abort_request

    def recorded_abort(request_id):  # what the engine thread asks of the engine
        aborted.append(request_id)
        abort(request_id)

    engine.abort_request = recorded_abort
    threads = [threading.Thread(target=_stream_and_maybe_leave,
                                args=(server.port, i, i % 5 == 0, results))
               for i in range(num_clients)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        assert all(r is not None for r in results)
        assert server.idle(), "requests were left in the engine"
    finally:
        del engine.abort_request  # the method again
    assert len(aborted) == len(set(aborted)) == len(range(0, num_clients, 5))
    stats = server.loop.engine.kv_cache_stats()
    assert stats["reserved_token_slots"] == 0, stats  # every KV block free
    for i, text in enumerate(results):  # the others got their whole answer
        if i % 5:
            assert text == greedy(llm, f"client {i}", 40, ignore_eos=True).text


def test_metrics_count_what_was_served(server):
    def scrape() -> dict:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        conn.request("GET", "/metrics")
        response = conn.getresponse()
        assert response.status == 200
        values = {}
        for line in response.read().decode().splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                values[name] = float(value)
        return values

    assert server.idle()
    before = scrape()
    server.client.completions.create(model=MODEL, prompt="count me", max_tokens=5,
                                     temperature=0)
    list(server.client.completions.create(model=MODEL, prompt="and me", max_tokens=3,
                                          temperature=0, stream=True))
    assert server.idle()
    after = scrape()

    def grew(name):
        return after.get(name, 0) - before.get(name, 0)

    assert grew("folovllm_generation_tokens_total") == 8
    assert grew('folovllm_requests_finished_total{reason="length"}') == 2
    assert grew("folovllm_time_to_first_token_seconds_count") == 2
    assert grew("folovllm_inter_token_latency_seconds_count") >= 4 + 2
    assert grew("folovllm_e2e_request_latency_seconds_count") == 2
    assert after["folovllm_requests_open"] == 0 and after["folovllm_sequences_running"] == 0
    assert after["folovllm_kv_reserved_token_slots"] == 0
    assert after['folovllm_e2e_request_latency_seconds_bucket{le="+Inf"}'] == \
        after["folovllm_e2e_request_latency_seconds_count"]


def test_a_full_server_answers_503():
    s = Server("--stage", "m7", "--max-batch-size", "1", "--max-waiting", "0")
    try:
        conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=60)
        conn.request("POST", "/v1/completions", json.dumps(
            {"model": MODEL, "prompt": "hold", "max_tokens": 200, "ignore_eos": True,
             "stream": True}), {"Content-Type": "application/json"})
        response = conn.getresponse()
        assert response.readline().startswith(b"data: ")  # running
        status, data = s.post("/v1/completions", {"model": MODEL, "prompt": "more"})
        assert status == 503 and data["error"]["type"] == "server_overloaded"
        conn.close()
        assert s.idle()
        status, _ = s.post("/v1/completions", {"model": MODEL, "prompt": "now",
                                               "max_tokens": 2})
        assert status == 200
    finally:
        s.stop()


def test_the_load_generator_drives_the_server(server, tmp_path):
    from serve import load

    out = tmp_path / "load.json"
    assert load.main(["--url", f"http://127.0.0.1:{server.port}", "--num-prompts", "8",
                      "--request-rate", "40", "--input-len", "16", "--output-len", "6",
                      "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    summary = data["summary"]
    assert summary["completed"] == 8 and summary["output_tokens"] == 8 * 6
    assert all(len(s["stamps"]) >= 2 for s in data["samples"])  # streamed, not in one piece
    assert 0 < summary["ttft_s"]["p50"] <= summary["e2e_s"]["p50"]
    assert summary["itl_s"]["mean"] > 0 and summary["output_tok_per_s"] > 0
    assert server.idle()


def test_the_load_generator_sends_all_at_once_or_a_few_at_a_time(server, tmp_path):
    """`--request-rate inf` sends every request at once, with the prompts of the bench's
    `throughput` workload; `--max-concurrency 1` sends the next only when one has ended."""
    from bench.workloads import build_workload
    from serve import load

    url = f"http://127.0.0.1:{server.port}"
    args = load.parse_args(["--num-prompts", "6", "--request-rate", "inf", "--input-len",
                            "8:16", "--output-len", "4"])
    wl = load.build_requests(args, 512)
    assert wl.name == "throughput" and set(wl.arrival_times) == {0.0}
    assert wl.prompts == build_workload("throughput", 512, 0, 6, (8, 16), 4).prompts
    for limit, out in ((None, tmp_path / "burst.json"), (1, tmp_path / "one.json")):
        extra = [] if limit is None else ["--max-concurrency", str(limit)]
        assert load.main(["--url", url, "--num-prompts", "6", "--request-rate", "inf",
                          "--input-len", "8:16", "--output-len", "8", "--out", str(out),
                          *extra]) == 0
        data = json.loads(out.read_text())
        assert data["workload"] == "throughput" and data["summary"]["completed"] == 6
        spans = sorted((s["sent_s"], s["sent_s"] + s["e2e_s"]) for s in data["samples"])
        overlaps = sum(b[0] < a[1] for a, b in zip(spans, spans[1:]))
        if limit is None:  # all sent before the first could end: every one overlaps
            assert overlaps == 5 and spans[-1][0] < spans[0][1]
        else:
            assert overlaps == 0
    assert server.idle()
    with pytest.raises(SystemExit, match="--max-concurrency must be >= 1"):
        load.main(["--url", url, "--max-concurrency", "0"])


def test_sigterm_ends_the_server_cleanly_with_a_stream_in_flight(tmp_path):
    """`python -m serve` as a newcomer runs it: it says where it serves, and SIGTERM ends
    it (exit status 0) while a client is still reading a stream."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "serve", "--stage", "m3", "--model",
                             MODEL, "--device", "cpu", "--kv-cache-memory", KV, "--port",
                             str(port), "--shutdown-timeout", "1"], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        first = proc.stdout.readline()
        assert f"http://127.0.0.1:{port}/v1" in first, first
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        conn.request("POST", "/v1/completions", json.dumps(
            {"model": MODEL, "prompt": "long", "max_tokens": 2000, "ignore_eos": True,
             "stream": True}), {"Content-Type": "application/json"})
        response = conn.getresponse()
        assert response.readline().startswith(b"data: ")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_cli_help_and_a_bad_stage(capsys):
    from serve.__main__ import main

    with pytest.raises(SystemExit) as exc:
        main(["--stage", "m7", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "--max-waiting" in out and "--quantization" in out and "--max-model-len" in out
    with pytest.raises(SystemExit, match="not a stage with a batching engine"):
        main(["--stage", "m1"])
