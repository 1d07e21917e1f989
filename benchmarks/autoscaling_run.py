"""A real run of memory-per-token autoscaling: replicas against tokens in flight, plotted.

Starts an application whose one expert (the demo Llama) has a deliberately small memory budget,
sends a bounded burst of long streamed requests, then goes idle, and samples every 0.25 s the
expert's running replicas (Serve's status) and the tokens in flight (prompt + tokens streamed
so far, summed over the open requests, counted by the client). Writes JSON and a PNG.

    python benchmarks/autoscaling_run.py [--burst-s 25] [--idle-s 25]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import date
from pathlib import Path

import httpx

APP, DEPLOYMENT = "autoscale", "expert-demo-llama"
PROMPT = "Tell me a long story about a cheap model and an expensive one."


def args_for(usable: int, weights: int) -> dict:
    return {
        "gpus": "never",
        "router": {"num_cpus": 0.1},
        "experts": [{
            "name": "demo-llama",
            "engine": {"model": "builtin:demo-llama", "scheduler": {"max_batch_size": 8},
                       "kv_cache": {"memory_budget_bytes": weights + usable,
                                    "memory_fraction": 1.0}},
            "deployment": {
                "resources": {"num_cpus": 0.25}, "batch_wait_timeout_s": 0.05,
                "autoscaling": {
                    "min_replicas": 1, "max_replicas": 4, "target_utilisation": 0.5,
                    "target_ongoing_requests": 1000,  # no request floor: memory alone decides
                    "upscale_delay_s": 0, "downscale_delay_s": 5,
                    "look_back_period_s": 1.0, "metrics_interval_s": 0.25,
                },
            },
        }],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--burst-s", type=float, default=25.0)
    p.add_argument("--idle-s", type=float, default=25.0)
    p.add_argument("--concurrency", type=int, default=12)
    p.add_argument("--usable-bytes", type=int, default=150_000)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/autoscaling-run.json"))
    p.add_argument("--plot", type=Path, default=Path("docs/img/autoscaling-run.png"))
    a = p.parse_args(argv)

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from frugalserve.experts.spec import resolve_model_path
    from frugalserve.serve_app.app import build_app
    from ray import serve
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_model_path("builtin:demo-llama"))
    prompt_tokens = len(tok(tok.apply_chat_template([{"role": "user", "content": PROMPT}],
                                                    add_generation_prompt=True, tokenize=False),
                            add_special_tokens=False)["input_ids"])
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(args_for(a.usable_bytes, 361_760)), name=APP, route_prefix="/")
    memory = serve.get_deployment_handle(DEPLOYMENT, APP).info.remote().result()["memory"]
    url = f"http://127.0.0.1:{port}"
    in_flight: dict[int, int] = {}
    lock, stop_burst, stop_all = threading.Lock(), threading.Event(), threading.Event()
    samples, answered, failed = [], [0], [0]
    t0 = time.monotonic()

    def replicas() -> int:
        app = serve.status().applications.get(APP)
        if app is None or DEPLOYMENT not in app.deployments:
            return 0
        return app.deployments[DEPLOYMENT].replica_states.get("RUNNING", 0)

    def sampler():
        while not stop_all.is_set():
            with lock:
                tokens = sum(in_flight.values())
            samples.append({"t": round(time.monotonic() - t0, 2), "replicas": replicas(),
                            "tokens_in_flight": tokens})
            time.sleep(0.25)

    def user(uid: int):
        with httpx.Client(base_url=url, timeout=120) as c:
            n = 0
            while not stop_burst.is_set():
                key = uid * 1_000_000 + n
                n += 1
                with lock:
                    in_flight[key] = prompt_tokens
                try:
                    with c.stream("POST", "/v1/chat/completions", json={
                            "model": "demo-llama", "max_tokens": 400, "stream": True,
                            "messages": [{"role": "user", "content": PROMPT}]}) as r:
                        for line in r.iter_lines():
                            if line.startswith("data: {") and '"content":"' in line:
                                with lock:
                                    in_flight[key] += 1
                    answered[0] += r.status_code == 200
                    failed[0] += r.status_code != 200
                except httpx.HTTPError:
                    failed[0] += 1
                finally:
                    with lock:
                        in_flight.pop(key, None)

    watcher = threading.Thread(target=sampler, daemon=True)
    watcher.start()
    with ThreadPoolExecutor(a.concurrency) as pool:
        for uid in range(a.concurrency):
            pool.submit(user, uid)
        time.sleep(a.burst_s)
        stop_burst.set()
    time.sleep(a.idle_s)
    stop_all.set()
    watcher.join()
    serve.shutdown()
    ray.shutdown()

    result = {"date": date.today().isoformat(), "machine": f"x86_64 {os.cpu_count()} CPUs",
              "memory": memory, "burst_s": a.burst_s, "idle_s": a.idle_s,
              "concurrency": a.concurrency, "answered": answered[0], "failed": failed[0],
              "max_replicas_seen": max(s["replicas"] for s in samples), "samples": samples,
              "command": "python benchmarks/autoscaling_run.py " + " ".join(argv or sys.argv[1:])}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per_replica = memory["usable_bytes"] * 0.5 / memory["kv_bytes_per_token"]
    fig, ax = plt.subplots(figsize=(8, 4))
    ts = [s["t"] for s in samples]
    ax.plot(ts, [s["tokens_in_flight"] for s in samples], color="tab:blue",
            label="tokens in flight")
    ax.axhline(per_replica, color="tab:blue", ls=":", lw=1,
               label=f"one replica's target ({per_replica:.0f} tokens)")
    ax.axvline(a.burst_s, color="gray", ls="--", lw=1, label="burst ends")
    ax.set_xlabel("seconds")
    ax.set_ylabel("tokens in flight")
    ax2 = ax.twinx()
    ax2.step(ts, [s["replicas"] for s in samples], where="post", color="tab:red",
             label="running replicas")
    ax2.set_ylabel("replicas")
    ax2.set_ylim(0, 5)
    lines = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    labels = ax.get_legend_handles_labels()[1] + ax2.get_legend_handles_labels()[1]
    ax.legend(lines, labels, fontsize=8, loc="upper right")
    ax.set_title("memory-per-token autoscaling (demo Llama, small memory budget)")
    fig.tight_layout()
    a.plot.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(a.plot, dpi=120)
    print(f"answered {answered[0]}, failed {failed[0]}, replicas up to "
          f"{result['max_replicas_seen']}; wrote {a.out} and {a.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
