"""`frugalserve serve` end to end: a process of its own (its own Ray instance), the readiness
message it promises, an answer to the request it prints, and a clean stop on SIGTERM."""

from __future__ import annotations

import copy
import shlex
import signal
import subprocess
import sys

import httpx
import pytest
import yaml

from tests.conftest import REPO, TEST_APP_ARGS, free_port

pytestmark = pytest.mark.slow


@pytest.mark.timeout(300)  # a server that never gets ready would hang here
def test_serve_command_starts_answers_and_stops(tmp_path):
    args = copy.deepcopy(TEST_APP_ARGS)
    expert = copy.deepcopy(args["experts"][0])
    expert["deployment"]["autoscaling"] = {"enabled": False}
    args["experts"] = [expert]
    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump({"applications": [{
        "name": "frugalserve", "route_prefix": "/", "args": args,
        "import_path": "frugalserve.serve_app.app:build_app"}]}))
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "frugalserve.cli", "serve", "--config", str(config),
         "--port", str(port), "--num-cpus", "4"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if "frugalserve is ready at" in line:
                break
        assert proc.poll() is None, "".join(lines[-30:])
        url = f"http://127.0.0.1:{port}"
        assert f"ready at {url}/v1" in lines[-1]
        # the high-throughput endpoint (Ray Serve's direct ingress), then the example request,
        # sent as printed
        fast = next(proc.stdout)
        assert "high-throughput endpoint" in fast and "/v1" in fast, fast
        example = []
        while not example or "-d" not in example[-1]:
            example.append(next(proc.stdout))
        curl = shlex.split("".join(example).replace("\\\n", " "))
        assert curl[1].startswith(fast.split(": ", 1)[1].strip().removesuffix("/v1"))
        body = curl[curl.index("-d") + 1]
        r = httpx.post(curl[1], content=body, headers={"Content-Type": "application/json"},
                       timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["model"] == "demo-llama" and r.json()["choices"][0]["message"]["content"]
        assert httpx.get(f"{url}/healthz", timeout=10).json()["experts"] == ["demo-llama"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
