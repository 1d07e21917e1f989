"""`/v1/models`: every model id a client can send — experts (and their LoRA adapters), the
routing policies, a calibrated budget per cascade operating point (`cascade:budget=...`), and
the config's aliases — each an OpenAI model object with a `frugalserve` object beside."""

from __future__ import annotations

from typing import Any

from frugalserve.serve_app import naming

MAX_BUDGET_NAMES = 6  # operating points listed as `cascade:budget=...` (spread over the frontier)


def _model(model_id: str, detail: dict[str, Any], max_len: int | None = None) -> dict[str, Any]:
    entry: dict[str, Any] = {"id": model_id, "object": "model", "created": 0,
                             "owned_by": "frugalserve", "frugalserve": detail}
    if max_len is not None:
        entry["max_model_len"] = max_len
    return entry


async def model_entries(router) -> list[dict[str, Any]]:
    data = []
    for name in router.names:
        info = await router.clients[name].info()
        data.append(_model(name, {
            "kind": "expert", "num_parameters": info["num_parameters"],
            "cost_per_1k_prompt": info["cost_per_1k_prompt"],
            "cost_per_1k_completion": info["cost_per_1k_completion"],
            "engine": info["engine"], "batching": info["batching"], "attention": info["attention"],
            **({"adapter_of": info["adapter_of"]} if "adapter_of" in info else {}),
            **({"circuit": info["circuit"]} if "circuit" in info else {}),  # a remote's breaker
        }, info["max_context"]))
    if router.policies is not None:
        art = router.policies.art
        for name in router.policies.names:
            if name == "cascade":
                detail = {"tiers": list(art.cascade.order), "expected_cost": art.cascade.cost,
                          "calibrated_accuracy": art.cascade.accuracy,
                          "name_options": sorted(naming.OPTIONS)}
            else:
                detail = {"experts": art.gate.experts}
            data.append(_model(name, {"kind": "policy", **detail}))
        points = sorted(art.frontier, key=lambda p: p.cost)
        step = max(1, len(points) // MAX_BUDGET_NAMES)
        for p in points[::step][:MAX_BUDGET_NAMES]:
            data.append(_model(naming.budget_name("cascade", p.cost), {
                "kind": "policy", "policy": "cascade", "budget": p.cost,
                "tiers": list(p.order), "calibrated_accuracy": p.accuracy}))
    for alias, target in router.config.aliases.items():
        data.append(_model(alias, {"kind": "alias", "alias_of": target}))
    return data
