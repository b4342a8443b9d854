"""`pagedllm serve` as a process: config-file launch, banner and request log, graceful SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai

from pagedllm.testing.tiny import make_tiny_model

ENV = dict(os.environ, HF_HUB_OFFLINE="1")


def _serve(*args: str, log=subprocess.PIPE) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pagedllm.entrypoints.cli", "serve", *args],
                            stdout=log, stderr=log, text=True, env=ENV)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_unknown_config_key_is_an_error_naming_it(tmp_path):
    config = tmp_path / "launch.yaml"
    config.write_text("port: 8123\nmax_num_seqz: 4\n")
    process = _serve("--config", str(config))
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 2
    assert "max_num_seqz" in stderr


def test_config_file_launch_serves_and_shuts_down_gracefully(tmp_path):
    model = make_tiny_model(tmp_path / "tiny", "llama", vocab_size=400)
    port = _free_port()
    config = tmp_path / "launch.yaml"
    config.write_text(
        f"model: {model}\nport: {port}\napi_key: sk-file\nserved_model_name: [tiny]\n"
        "num_kv_blocks: 128\nmax_model_len: 256\nmax_log_len: 40\nshutdown_timeout: 30\n"
    )
    log_path = tmp_path / "serve.log"
    with open(log_path, "w") as log:  # a file, not a pipe: a full pipe would stall the server
        process = _serve("--config", str(config), "--max-num-seqs", "8", log=log)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            assert process.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, "the server did not come up"
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="sk-file", max_retries=0)
        answer = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hello there"}],
                                                max_tokens=4)
        assert answer.usage.completion_tokens >= 1

        # A stream in flight when SIGTERM arrives is allowed to finish; then the process exits 0.
        events: list[str] = []
        first_event = threading.Event()

        def stream() -> None:
            body = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 200, "ignore_eos": True, "stream": True}
            headers = {"Authorization": "Bearer sk-file"}
            with httpx.stream("POST", f"{url}/v1/completions", json=body, headers=headers, timeout=60) as response:
                for line in response.iter_lines():
                    if line:
                        events.append(line)
                        first_event.set()

        reader = threading.Thread(target=stream)
        reader.start()
        assert first_event.wait(60)
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=120)
        reader.join(60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    stderr = log_path.read_text()
    assert process.returncode == 0, stderr
    assert events[-1] == "data: [DONE]"
    assert '"finish_reason":"length"' in events[-2]
    assert "KV cache: 128 blocks" in stderr and "plugins:" in stderr  # the start-up banner
    assert "prompt_tokens=" in stderr and "Hello there" in stderr  # one line per request
