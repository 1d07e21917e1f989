"""`model:` as a Hugging Face hub id, resolved offline from a cache built on disk from a zoo
model (the cache's own layout: refs/REVISION -> commit, snapshots/COMMIT/files)."""

from __future__ import annotations

import asyncio
import shutil

import pytest
from frugalserve.experts.engine import GenerationRequest, SamplingParams
from frugalserve.experts.spec import EngineSpec, resolve_model_path
from frugalserve.experts.transformers_engine import TransformersEngine

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    repo = tmp_path / "hub" / "models--zoo-org--tier-s"
    shutil.copytree(resolve_model_path("builtin:tier-s"), repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    for ref in ("main", "v1"):
        (repo / "refs" / ref).write_text(COMMIT)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return repo / "snapshots" / COMMIT


def test_hub_id_loads_from_an_offline_cache(offline_cache):
    assert resolve_model_path("zoo-org/tier-s") == offline_cache
    assert EngineSpec(model="zoo-org/tier-s@v1").model_path == offline_cache
    engine = TransformersEngine.from_path(resolve_model_path("zoo-org/tier-s@main"), device="cpu",
                                          dtype="float32")
    done = asyncio.run(engine.generate([GenerationRequest(
        messages=({"role": "user", "content": "What is 2 + 3?"},),
        params=SamplingParams(max_tokens=4, temperature=0.0))]))
    assert done[0].text.strip() == "5"


def test_a_hub_id_missing_from_the_cache_is_a_clear_error(offline_cache):
    with pytest.raises(ValueError, match="neither a local folder nor in the Hugging Face cache.*offline"):
        resolve_model_path("zoo-org/tier-xl")
    with pytest.raises(ValueError, match="tier-s@v9"):
        resolve_model_path("zoo-org/tier-s@v9")


def test_local_paths_win_over_hub_ids(tmp_path, monkeypatch):
    (tmp_path / "org" / "name").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert resolve_model_path("org/name") == tmp_path.joinpath("org", "name").relative_to(tmp_path)


def test_a_home_folder_of_an_unknown_user_is_a_clear_error():
    with pytest.raises(ValueError, match="cannot resolve the path '~no-such-user-0/model'"):
        resolve_model_path("~no-such-user-0/model")
