from __future__ import annotations

import numpy as np
import pytest
from frugalserve.cascade.matrix import ResponseMatrix

EXPERTS = ("tier-s", "tier-m", "tier-l", "expert-arith")
SIZES = {"tier-s": 0.5, "tier-m": 2.5, "tier-l": 10.0, "expert-arith": 1.5}


def synthetic_rows(n: int, seed: int) -> list[dict]:
    """A matrix where skill grows with size, the arithmetic expert is strong on its domain only,
    and a correct answer tends to have a higher mean logprob (as in real models)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        domain = ["arith", "text", "facts"][i % 3]
        diff = int(rng.integers(1, 6))
        prompt = f"[{domain}] item {i} " + "9" * diff
        for e in EXPERTS:
            base = {"tier-s": 0.55, "tier-m": 0.75, "tier-l": 0.95}.get(e)
            if base is None:
                base = 1.0 if domain == "arith" else 0.1
            ok = bool(rng.random() < base - 0.08 * diff)
            lp = (-0.2 if ok else -1.2) + rng.normal(0, 0.4)
            rows.append(dict(id=f"p{i}", expert=e, domain=domain, difficulty=str(diff),
                             prompt=prompt, answer="42" if ok else "x", correct=ok,
                             logprob_mean=lp, logprob_min=lp - 0.3, logprob_first=lp,
                             prompt_tokens=12, completion_tokens=3,
                             cost=15 * SIZES[e] / 1000))
    return rows


@pytest.fixture(scope="session")
def calib_matrix():
    return ResponseMatrix.from_rows(synthetic_rows(450, seed=1))


@pytest.fixture(scope="session")
def test_matrix():
    return ResponseMatrix.from_rows(synthetic_rows(300, seed=2))
