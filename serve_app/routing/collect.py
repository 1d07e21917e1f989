"""Bring your own data: every configured expert's answer to every prompt of a JSONL file, labelled.

    frugalserve calibrate --data prompts.jsonl --config configs/local.yaml --out DIR [--url URL]

A line of the data file is a JSON object with `prompt` (a string) or `messages` (OpenAI chat
messages), an optional `id` (default: a hash of the prompt) and `domain`, and one way to label
answers:

- `answer` (the reference) with `grader` (`frugalserve.cascade.graders`: exact, normalized,
  numeric, regex, contains, json; default `--grader`) and, for `numeric`, `tolerance`;
- `labels`: `{expert: true | false | score in [0, 1]}`, each expert's own label (≥ 0.5 is right);
- neither, with `--judge EXPERT`: the judge expert reads the question and the answer under
  `JUDGE_RUBRIC` and says YES or NO.

Experts run in process (local engines of the config, remote experts through their endpoint) or
through a running application (`--url`, `model` = the expert's name), at most `concurrency`
requests in flight, with a progress bar. Every answer is appended to the response matrix file as
it arrives (one row per prompt × expert, the rows of `frugalserve eval`), so an interrupted run
continues where it stopped: a rerun asks only for the rows the file lacks, and labels every row
afresh from its cached answer.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from frugalserve.cascade.graders import GRADERS, check_grader, grade
from frugalserve.experts.engine import Completion, GenerationRequest, SamplingParams
from frugalserve.serve_app.config import AppConfig, ExpertConfig
from frugalserve.serve_app.routing.featurizers import prompt_text
from tqdm import tqdm

JUDGE_RUBRIC = """You grade answers. Read the question and the answer below.
Reply with exactly one word: YES if the answer is correct and complete, NO otherwise.

Question:
{question}

Answer:
{answer}

Verdict (YES or NO):"""


class DataError(ValueError):
    """A data file line that cannot be used; the message names the line."""


@dataclass(frozen=True)
class Item:
    id: str
    messages: tuple[dict, ...]
    text: str  # what the router featurizes: the last user turn
    reference: str | None = None
    grader: str | None = None
    tolerance: float = 1e-6
    labels: dict[str, float] = field(default_factory=dict)
    domain: str = ""


def load_items(path: str | Path, default_grader: str = "normalized") -> list[Item]:
    """Parse and check every line; a bad line is a DataError naming its number."""
    path = Path(path)
    items, seen = [], set()
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            d = json.loads(line)
        except ValueError as exc:
            raise DataError(f"{where}: not JSON ({exc})") from None
        if not isinstance(d, dict):
            raise DataError(f"{where}: expected a JSON object")
        if "messages" in d:
            msgs = d["messages"]
            if not isinstance(msgs, list) or not msgs or not all(
                    isinstance(m, dict) and "role" in m and "content" in m for m in msgs):
                raise DataError(f"{where}: `messages` must be a non-empty list of "
                                "{role, content} objects")
            messages = tuple(msgs)
        elif isinstance(d.get("prompt"), str) and d["prompt"].strip():
            messages = ({"role": "user", "content": d["prompt"]},)
        else:
            raise DataError(f"{where}: a line needs `prompt` (a string) or `messages`")
        text = prompt_text(list(messages))
        item_id = str(d.get("id") or hashlib.sha256(json.dumps(messages).encode()).hexdigest()[:16])
        if item_id in seen:
            raise DataError(f"{where}: duplicate id {item_id!r}")
        seen.add(item_id)
        reference, grader_name = d.get("answer"), None
        if reference is not None:
            reference = reference if isinstance(reference, str) else json.dumps(reference)
            grader_name = d.get("grader", default_grader)
            try:
                check_grader(grader_name, reference)
            except ValueError as exc:
                raise DataError(f"{where}: {exc}") from None
        labels = d.get("labels") or {}
        if not isinstance(labels, dict) or not all(
                isinstance(v, (bool, int, float)) and 0 <= float(v) <= 1 for v in labels.values()):
            raise DataError(f"{where}: `labels` must map expert names to true/false or a score "
                            "in [0, 1]")
        items.append(Item(item_id, messages, text, reference, grader_name,
                          float(d.get("tolerance", 1e-6)), {k: float(v) for k, v in labels.items()},
                          str(d.get("domain", ""))))
    if not items:
        raise DataError(f"{path}: no data lines")
    return items


def items_from_logs(path: str | Path, grader: str = "normalized", *,
                    judge: bool = False) -> tuple[list[Item], dict[str, int]]:
    """Prompts of a routing log that got feedback, as data items: the expert that answered is
    labelled by the feedback's score; a well-scored answer (≥ 0.5) is the reference the other
    experts' answers are graded against; a badly scored one leaves them to the judge, and
    without a judge the prompt is left out. Returns (items, counts of what was used)."""
    from frugalserve.serve_app.routing.log import read_log

    requests, feedback = read_log(path)
    counts = {"requests": len(requests), "feedback": len(feedback), "used": 0,
              "no_text": 0, "left_to_judge": 0, "dropped_bad_answer": 0}
    items = []
    for rid, score in feedback.items():
        req = requests.get(rid)
        if req is None:
            continue
        expert = req.get("answered_by")
        run = next((r for r in req.get("runs", []) if r.get("expert") == expert), None)
        if "text" not in req or run is None or "answer" not in run:
            counts["no_text"] += 1
            continue
        reference = run["answer"] if score >= 0.5 else None
        if reference is None and not judge:
            counts["dropped_bad_answer"] += 1
            continue
        counts["left_to_judge"] += reference is None
        items.append(Item(rid, ({"role": "user", "content": req["text"]},), req["text"],
                          reference, grader if reference is not None else None,
                          labels={str(expert): score}, domain=str(req.get("policy", ""))))
        counts["used"] += 1
    if not items:
        raise DataError(f"{path}: no logged request with feedback can be used ({counts}); the "
                        "log needs routing.log_text: true for prompts and answers")
    return items, counts


# -- running the experts -------------------------------------------------------------------------


class LocalExpert:
    """An expert of the config in this process: its engine (local) or its endpoint (remote)."""

    def __init__(self, cfg: ExpertConfig, device: str = "cpu"):
        from frugalserve.experts.spec import default_cost_per_1k, resolve_model_path

        self.name, self.cfg, self.engine, self.remote = cfg.name, cfg, None, None
        if cfg.remote is not None:
            from frugalserve.serve_app.remote import RemoteClient

            self.remote = RemoteClient(cfg, deadline_s=120.0)
            params = 0
        else:
            # torch: only in-process local experts need it
            from frugalserve.experts.transformers_engine import TransformersEngine

            assert cfg.engine is not None
            self.engine = TransformersEngine.from_path(
                resolve_model_path(cfg.engine.model), device=device,
                dtype="float32" if device == "cpu" else "auto", name=cfg.name, use_kernels=False)
            params = sum(p.numel() for p in self.engine.model.parameters())
        default = default_cost_per_1k(params) if params else 0.0
        self.price_prompt = cfg.cost_per_1k_prompt if cfg.cost_per_1k_prompt is not None else default
        self.price_completion = (cfg.cost_per_1k_completion if cfg.cost_per_1k_completion is not None
                                 else default)

    async def generate(self, requests: Sequence[GenerationRequest]) -> list[Completion]:
        if self.engine is not None:
            return list(await self.engine.generate(list(requests)))
        assert self.remote is not None
        return list(await asyncio.gather(*(self.remote.generate(r) for r in requests)))

    def cost(self, c: Completion) -> float:
        return (c.prompt_tokens * self.price_prompt + c.completion_tokens * self.price_completion) / 1000


class UrlExpert:
    """An expert behind a running frugalserve application (`model` = its name)."""

    def __init__(self, name: str, url: str, timeout_s: float = 120.0):
        import httpx

        self.name, self.url = name, url.rstrip("/")
        self._client = httpx.AsyncClient(base_url=self.url, timeout=timeout_s)

    async def generate(self, requests: Sequence[GenerationRequest]) -> list[dict]:
        return list(await asyncio.gather(*(self._one(r) for r in requests)))

    async def _one(self, r: GenerationRequest) -> dict:
        body = {"model": self.name, "messages": list(r.messages or ()), "temperature": 0,
                "max_tokens": r.params.max_tokens, "logprobs": True}
        resp = await self._client.post("/v1/chat/completions", json=body)
        if resp.status_code != 200:
            raise RuntimeError(f"{self.url} answered {resp.status_code} for expert {self.name!r}: "
                               f"{resp.text[:300]}")
        return resp.json()


def _row(item: Item, expert: str, text: str, lps: Sequence[float], prompt_tokens: int,
         completion_tokens: int, cost: float, latency: float, finish: str | None) -> dict:
    lps = [float(x) for x in lps]
    return {"id": item.id, "expert": expert, "domain": item.domain, "difficulty": "",
            "prompt": item.text, "reference": item.reference, "answer": text, "correct": False,
            "logprob_mean": sum(lps) / len(lps) if lps else None,
            "logprob_min": min(lps) if lps else None, "logprob_first": lps[0] if lps else None,
            "token_logprobs": lps, "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens, "cost": round(cost, 9),
            "latency_s": round(latency, 6), "finish_reason": finish}


def _row_from_completion(item: Item, x: LocalExpert, c: Completion, latency: float) -> dict:
    return _row(item, x.name, c.text, c.token_logprobs, c.prompt_tokens, c.completion_tokens,
                x.cost(c), latency, c.finish_reason)


def _row_from_http(item: Item, name: str, data: dict, latency: float) -> dict:
    choice = data["choices"][0]
    lps = [t["logprob"] for t in ((choice.get("logprobs") or {}).get("content") or [])]
    usage = data.get("usage") or {}
    return _row(item, name, choice["message"]["content"] or "", lps, usage.get("prompt_tokens", 0),
                usage.get("completion_tokens", len(lps)),
                float((data.get("frugalserve") or {}).get("cost") or 0.0), latency,
                choice.get("finish_reason"))


def read_cache(path: Path) -> dict[tuple[str, str], dict]:
    """The rows already in the matrix file, by (id, expert); a torn last line is dropped."""
    out: dict[tuple[str, str], dict] = {}
    if not path.is_file():
        return out
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue  # an interrupted write
        out[(str(row["id"]), str(row["expert"]))] = row
    return out


async def _collect(items: Sequence[Item], experts: Sequence[str], cache_path: Path, *,
                   app: AppConfig, url: str | None, device: str, concurrency: int,
                   batch_size: int, max_tokens: int, progress: bool) -> dict[tuple[str, str], dict]:
    cache = read_cache(cache_path)
    todo = {e: [it for it in items if (it.id, e) not in cache] for e in experts}
    total = sum(len(v) for v in todo.values())
    configs = {x.name: x for x in app.experts}

    def params(name: str) -> SamplingParams:  # a remote endpoint may not return logprobs
        remote = configs[name].remote
        return SamplingParams(max_tokens=max_tokens, temperature=0.0,
                              logprobs=remote is None or remote.logprobs)
    sem = asyncio.Semaphore(max(1, concurrency))
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    if cache_path.is_file() and cache_path.stat().st_size:
        with cache_path.open("rb") as raw:
            raw.seek(-1, 2)
            torn = raw.read(1) != b"\n"
        if torn:  # an interrupted write: start the next row on a line of its own
            with cache_path.open("a") as text:
                text.write("\n")
    with cache_path.open("a") as out, tqdm(total=total, desc="experts", unit="answer",
                                           disable=not progress) as bar:
        for name in experts:
            if not todo[name]:
                continue
            bar.set_postfix(expert=name)
            runner: LocalExpert | UrlExpert = (UrlExpert(name, url) if url
                                               else LocalExpert(configs[name], device))
            step = batch_size if isinstance(runner, LocalExpert) and runner.engine else concurrency

            async def run(chunk: list[Item], runner=runner, name=name) -> None:
                async with sem:
                    reqs = [GenerationRequest(params=params(name), messages=it.messages,
                                              request_id=it.id) for it in chunk]
                    t0 = time.perf_counter()
                    done = await runner.generate(reqs)
                    latency = time.perf_counter() - t0
                for it, c in zip(chunk, done):
                    row = (_row_from_http(it, name, c, latency) if isinstance(c, dict)
                           else _row_from_completion(it, runner, c, latency))
                    cache[(it.id, name)] = row
                    out.write(json.dumps(row) + "\n")
                out.flush()
                bar.update(len(chunk))

            chunks = [todo[name][i:i + step] for i in range(0, len(todo[name]), step)]
            await asyncio.gather(*(run(c) for c in chunks))
    return cache


def judge_rows(rows: dict[tuple[str, str], dict], items: Sequence[Item], judge: str,
               cache_path: Path, **kw) -> dict[tuple[str, str], bool]:
    """The judge's verdict on every (item, expert) answer of unlabelled items, cached beside the
    matrix (`<matrix>.judge.jsonl`, keyed by a hash of question and answer)."""
    judged = {it.id for it in items if it.reference is None}
    jobs: dict[str, Item] = {}
    keys: dict[tuple[str, str], str] = {}
    by_id = {it.id: it for it in items}
    for (item_id, expert), row in rows.items():
        if item_id not in judged or expert in by_id[item_id].labels:
            continue
        item = by_id[item_id]
        prompt = JUDGE_RUBRIC.format(question=item.text, answer=row["answer"])
        key = hashlib.sha256(prompt.encode()).hexdigest()[:20]
        keys[(item_id, expert)] = key
        jobs[key] = Item(key, ({"role": "user", "content": prompt},), prompt)
    if not jobs:
        return {}
    cache = asyncio.run(_collect(list(jobs.values()), [judge], cache_path, **kw))
    return {k: str(cache[(key, judge)]["answer"]).strip().upper().startswith("YES")
            for k, key in keys.items()}


def label(rows: dict[tuple[str, str], dict], items: Sequence[Item],
          verdicts: dict[tuple[str, str], bool]) -> list[dict]:
    """Matrix rows with `correct` set from the reference, the labels or the judge."""
    out = []
    by_id = {it.id: it for it in items}
    for (item_id, expert), row in rows.items():
        it = by_id.get(item_id)
        if it is None:
            continue  # a row of a line no longer in the data file
        if expert in it.labels:
            ok, source = it.labels[expert] >= 0.5, "label"
        elif it.reference is not None:
            assert it.grader is not None
            ok, source = grade(it.grader, row["answer"], it.reference, tolerance=it.tolerance), it.grader
        elif (item_id, expert) in verdicts:
            ok, source = verdicts[(item_id, expert)], "judge"
        else:
            raise DataError(f"line {item_id!r} has no `answer`, no label for {expert!r}, and no "
                            "judge was named (--judge EXPERT)")
        out.append(dict(row, correct=bool(ok), label_source=source))
    return out


def collect(items: Sequence[Item], app: AppConfig, cache_path: Path, *, experts: Sequence[str],
            url: str | None = None, judge: str | None = None, device: str = "cpu",
            concurrency: int = 8, batch_size: int = 32, max_tokens: int = 64,
            progress: bool = True) -> list[dict]:
    """Run (or resume) every expert on every item and label the answers: the matrix rows."""
    names = {x.name for x in app.experts}
    unknown = [e for e in [*experts, *([judge] if judge else [])] if e not in names]
    if unknown:
        raise DataError(f"experts {unknown} are not in the config: {sorted(names)}")
    kw: dict[str, Any] = dict(app=app, url=url, device=device, concurrency=concurrency,
                              batch_size=batch_size, max_tokens=max_tokens, progress=progress)
    rows = asyncio.run(_collect(items, experts, cache_path, **kw))
    rows = {k: v for k, v in rows.items() if k[1] in experts}
    verdicts = judge_rows(rows, items, judge, cache_path.with_suffix(".judge.jsonl"),
                          **kw) if judge else {}
    return label(rows, items, verdicts)


__all__ = ["GRADERS", "JUDGE_RUBRIC", "DataError", "Item", "collect", "load_items"]
