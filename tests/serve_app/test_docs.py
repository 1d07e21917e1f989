"""The config reference documents every field the config models accept."""

from __future__ import annotations

from frugalserve.experts.spec import EngineSpec, KVCacheSpec, SchedulerSpec
from frugalserve.serve_app.config import AppConfig, ExpertConfig, RouterConfig, RoutingConfig
from frugalserve.serve_app.specs import (
    AutoscalingSpec,
    DeploymentSpec,
    RemoteSpec,
    ReplicaResources,
)

from tests.conftest import REPO

SECTIONS = {  # where a model's fields appear in docs/configuration.md
    "": ExpertConfig, "engine.": EngineSpec, "engine.scheduler.": SchedulerSpec,
    "engine.kv_cache.": KVCacheSpec, "deployment.": DeploymentSpec,
    "deployment.resources.": ReplicaResources, "deployment.autoscaling.": AutoscalingSpec,
    "remote.": RemoteSpec,
}


def test_every_config_field_is_documented():
    doc = (REPO / "docs/configuration.md").read_text()
    expected = [f"`{n}`" for n in AppConfig.model_fields]
    expected += [f"`router.{n}`" for n in RouterConfig.model_fields]
    expected += [f"`routing.{n}`" for n in RoutingConfig.model_fields]
    expected += [f"`{prefix}{n}`" for prefix, model in SECTIONS.items() for n in model.model_fields]
    missing = [e for e in expected if e not in doc]
    assert not missing, f"docs/configuration.md lacks {missing}"


def test_the_old_shape_table_lists_every_moved_field():
    from frugalserve.serve_app.config import MOVED

    table = (REPO / "docs/configuration.md").read_text().split("### Configs in the old shape")[1]
    missing = [f for f in MOVED if f"`{f}`" not in table]
    assert not missing, f"docs/configuration.md's old-shape table lacks {missing}"
