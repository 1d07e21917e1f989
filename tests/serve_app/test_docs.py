"""The config reference documents every field the config models accept."""

from __future__ import annotations

from frugalserve.experts.spec import (
    AutoscalingSpec,
    BatchingConfig,
    ExpertSpec,
    KVCacheConfig,
    ReplicaResources,
)
from frugalserve.serve_app.config import AppConfig, RouterConfig, RoutingConfig

from tests.conftest import REPO


def test_every_config_field_is_documented():
    doc = (REPO / "docs/configuration.md").read_text()
    expected = [f"`{n}`" for n in AppConfig.model_fields]
    expected += [f"`router.{n}`" for n in RouterConfig.model_fields]
    expected += [f"`routing.{n}`" for n in RoutingConfig.model_fields]
    expected += [f"`{n}`" for n in ExpertSpec.model_fields if n not in ("batching", "resources")]
    expected += [f"`batching.{n}`" for n in BatchingConfig.model_fields]
    expected += [f"`resources.{n}`" for n in ReplicaResources.model_fields]
    expected += [f"`kv_cache.{n}`" for n in KVCacheConfig.model_fields]
    expected += [f"`autoscaling.{n}`" for n in AutoscalingSpec.model_fields]
    missing = [e for e in expected if e not in doc]
    assert not missing, f"docs/configuration.md lacks {missing}"
