"""`vllm_thinkv.bench.server` against a stand-in OpenAI server (standard library, no
engine): the streamed token ids and times, the sampled running count, the
preemption delta and the KV size read from Prometheus text in vLLM's format."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from vllm_thinkv.bench import server, summary
from vllm_thinkv.errors import ThinKVError

METRICS = """# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig
# TYPE vllm:cache_config_info gauge
vllm:cache_config_info{block_size="32",cache_dtype="auto",engine="0",num_gpu_blocks="812",prefix_caching_hash_algo="sha256"} 1.0
vllm:num_requests_running{engine="0",model_name="m"} %d
vllm:num_requests_waiting{engine="0",model_name="m"} 0.0
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.5
vllm:num_preemptions_total{engine="0",model_name="m"} %d
"""


class FakeVLLM(BaseHTTPRequestHandler):
    state = {"running": 0, "preemptions": 3, "bodies": []}
    lock = threading.Lock()

    def log_message(self, *args):
        pass

    def _send(self, body: str, ctype: str = "application/json"):
        data = body.encode()
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        s = self.state
        if self.path == "/metrics":
            self._send(METRICS % (s["running"], s["preemptions"]), "text/plain")
        elif self.path == "/v1/models":
            self._send(json.dumps({"data": [{"id": "m"}]}))
        elif self.path == "/version":
            self._send(json.dumps({"version": "9.9.9"}))
        else:
            self.send_error(404)

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if body["model"] != "m":
            self.send_error(404, "model not found")
            return
        with self.lock:
            self.state["bodies"].append(body)
            self.state["running"] += 1
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        # "generate" token i + first prompt token, one chunk per token, 0.05 s apart
        for i in range(body["max_tokens"]):
            time.sleep(0.05)
            chunk = {"choices": [{"text": "x", "token_ids": [body["prompt"][0] + i]}]}
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            self.wfile.flush()
        with self.lock:
            self.state["running"] -= 1
            self.state["preemptions"] += 1
        self.wfile.write(b"data: [DONE]\n\n")


@pytest.fixture()
def fake_server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), FakeVLLM)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_parse_prometheus_labels_with_commas():
    samples = server.parse_prometheus('a{x="1,2",y="z"} 3.5\n# c\nb 2\n')
    assert samples == [("a", {"x": "1,2", "y": "z"}, 3.5), ("b", {}, 2.0)]


def test_workload_against_a_stand_in_server(fake_server):
    prompts = [[100, 1, 2], [200, 3], [300, 4, 5, 6]]
    raw = server.run(fake_server, prompts, output_tokens=6, poll_s=0.02)
    assert raw["num_gpu_blocks"] == 812 and raw["block_size"] == 32 and raw["vllm_version"] == "9.9.9"
    assert raw["preemptions"] == 3  # one per finished request in the stand-in
    assert [r["token_ids"] for r in raw["requests"]] == [[p[0] + i for i in range(6)] for p in prompts]
    body = FakeVLLM.state["bodies"][0]
    assert body["stream"] and body["ignore_eos"] and body["return_token_ids"] and body["temperature"] == 0
    s = summary.summarize(raw)
    assert s["kv_cache_tokens"] == 812 * 32
    assert s["peak_running"] == 3
    assert s["output_tokens"] == 18
    assert 0.05 <= s["ttft_s"]["mean"] < 1.0
    assert 40 <= s["itl_ms"]["mean"] < 500


def test_unknown_model_is_a_clear_error(fake_server):
    with pytest.raises(ThinKVError, match="answered 404"):
        server.run(fake_server, [[1, 2]], output_tokens=2, model="other")


def test_agreement():
    ref = [[1, 2, 3, 4], [5, 6, 7, 8]]
    a = summary.agreement(ref, [[1, 2, 9, 4], [5, 6, 7, 8]])
    assert a == {"requests": 2, "prefix_fraction": (0.5 + 1.0) / 2, "identical": 1}
