"""The RayService generator: Ray accepts the embedded Serve config, it is configs/local.yaml's, the
manifest passes the RayService CRD's schema with unknown fields rejected, and the GPU worker
group matches the experts."""

from __future__ import annotations

import copy
import os
import shlex
from pathlib import Path

import pytest
import yaml
from frugalserve.cluster import kuberay

from tests.conftest import REPO

LOCAL = REPO / "configs/local.yaml"
SAMPLES = REPO / "cluster/kuberay"
# KubeRay's RayService CRD, kept as data beside the checkout (not in the project):
# ../shared/kuberay, or wherever FRUGALSERVE_KUBERAY_DATA points.
KUBERAY_DATA = Path(os.environ.get("FRUGALSERVE_KUBERAY_DATA")
                    or Path(__file__).resolve().parents[2].parent / "shared" / "kuberay")
CRD = KUBERAY_DATA / "ray.io_rayservices.yaml"


def generate(*argv: str, capsys) -> tuple[str, dict]:
    assert kuberay.main(list(argv)) == 0
    text = capsys.readouterr().out
    return text, yaml.safe_load(text)


@pytest.fixture(scope="module")
def validator():
    """A Draft 7 validator over the CRD's v1 openAPIV3Schema, closed against unknown fields."""
    if not CRD.is_file():
        why = (f"RayService CRD not found at {CRD}: check out KubeRay's data beside the project "
               "(../shared/kuberay) or set FRUGALSERVE_KUBERAY_DATA")
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(why)  # in CI a manifest must be checked against the schema, never skipped
        pytest.skip(why)
    import jsonschema

    crd = yaml.safe_load(CRD.read_text())
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return jsonschema.Draft7Validator(closed(v1["schema"]["openAPIV3Schema"]))


def closed(schema):
    """Copy of an OpenAPI schema where every object that lists `properties` rejects others,
    unless Kubernetes keeps unknown fields there (`x-kubernetes-preserve-unknown-fields`)."""
    if isinstance(schema, list):
        return [closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: closed(v) for k, v in schema.items()}
    if ("properties" in schema and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


def errors(validator, manifest) -> list[str]:
    return sorted(f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
                  for e in validator.iter_errors(manifest))


def local_config() -> dict:
    return yaml.safe_load(LOCAL.read_text())


# -- serveConfigV2 ---------------------------------------------------------------------------


def test_serve_config_is_local_yaml_with_cluster_host(capsys):
    from ray.serve.schema import ServeDeploySchema

    _, manifest = generate("--config", str(LOCAL), capsys=capsys)
    embedded = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(embedded)
    expected = local_config()
    assert expected["http_options"]["host"] != "0.0.0.0"  # else the test proves nothing
    expected["http_options"]["host"] = "0.0.0.0"  # the one documented change
    assert embedded == expected


def test_pin_gpus_changes_only_gpus(capsys):
    _, manifest = generate("--config", str(LOCAL), "--pin-gpus", capsys=capsys)
    embedded = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    assert embedded["applications"][0]["args"]["gpus"] == "always"
    expected = local_config()
    expected["http_options"]["host"] = "0.0.0.0"
    expected["applications"][0]["args"]["gpus"] = "always"
    assert embedded == expected


def test_serve_fields_ray_would_ignore_are_rejected():
    config = local_config()
    config["applications"][0]["import_pth"] = config["applications"][0].pop("import_path")
    with pytest.raises(kuberay.KubeRayError, match="import_pth"):
        kuberay.check_serve_config(config)


def test_bad_app_args_name_the_field(tmp_path, capsys):
    config = local_config()
    config["applications"][0]["args"]["experts"][0]["deployment"]["resources"]["num_gpu"] = 1
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    assert kuberay.main(["--config", str(path)]) == 2
    assert "num_gpu" in capsys.readouterr().err


# -- the CRD ---------------------------------------------------------------------------------


def test_manifest_validates_against_crd(validator, capsys):
    _, manifest = generate("--config", str(LOCAL), capsys=capsys)
    assert errors(validator, manifest) == []
    _, manifest = generate("--config", str(LOCAL), "--gpu-type", "NVIDIA-H100-80GB-HBM3",
                           "--namespace", "llm", "--gpus-per-worker", "2", capsys=capsys)
    assert errors(validator, manifest) == []


def test_operator_sample_validates(validator):
    """The closed schema accepts KubeRay's own sample, so a rejection means a real typo."""
    sample = CRD.parent / "ray-service.sample.yaml"
    if not sample.is_file():
        pytest.skip(f"{sample} not found")
    assert errors(validator, yaml.safe_load(sample.read_text())) == []


@pytest.mark.parametrize("path, typo", [
    (("spec",), ("rayClusterConfig", "rayClusterConfg")),
    (("spec", "rayClusterConfig"), ("headGroupSpec", "headGroupSpecs")),
    (("spec", "rayClusterConfig", "workerGroupSpecs", 0), ("groupName", "groupNme")),
    (("spec", "rayClusterConfig", "headGroupSpec", "template", "spec", "containers", 0),
     ("resources", "resource")),
])
def test_misspelled_field_is_caught(validator, capsys, path, typo):
    _, manifest = generate("--config", str(LOCAL), capsys=capsys)
    bad = copy.deepcopy(manifest)
    node = bad
    for key in path:
        node = node[key]
    right, wrong = typo
    node[wrong] = node.pop(right)
    found = errors(validator, bad)
    assert any(f"'{wrong}' was unexpected" in e for e in found), found


def test_committed_samples_are_current(validator, capsys, monkeypatch):
    """Each sample names the command that made it in its first line; rerunning it gives the
    same text, so the samples cannot drift from the generator or configs/."""
    monkeypatch.chdir(REPO)
    samples = sorted(SAMPLES.glob("*.yaml"))
    assert samples, f"no sample manifests in {SAMPLES}"
    for sample in samples:
        text = sample.read_text()
        first = text.splitlines()[0]
        command = first.split("`")[1]
        argv = shlex.split(command)[2:]  # drop "frugalserve kuberay"
        assert kuberay.main(argv) == 0, command
        assert capsys.readouterr().out == text, f"{sample.name} is stale: rerun `{command}`"
        assert errors(validator, yaml.safe_load(text)) == [], sample.name


# -- sizing ----------------------------------------------------------------------------------


def workers(manifest) -> tuple[int, int]:
    (group,) = manifest["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    (container,) = group["template"]["spec"]["containers"]
    assert container["resources"]["limits"] == container["resources"]["requests"]
    assert group["minReplicas"] == group["replicas"] <= group["maxReplicas"]
    gpus = int(container["resources"]["limits"].get("nvidia.com/gpu", 0))
    assert int(group["rayStartParams"].get("num-gpus", 0)) == gpus
    return group["replicas"], gpus


def test_gpu_workers_match_experts(capsys):
    config = local_config()
    experts = config["applications"][0]["args"]["experts"]
    # every expert autoscales by default: from 1 replica each up to 4 (AutoscalingSpec defaults)
    low = sum(e["deployment"]["resources"]["num_gpus"] for e in experts)
    _, manifest = generate("--config", str(LOCAL), capsys=capsys)
    pods, gpus = workers(manifest)
    assert (pods, gpus) == (low, 1)
    cluster = manifest["spec"]["rayClusterConfig"]
    assert cluster["workerGroupSpecs"][0]["maxReplicas"] == 4 * low
    assert cluster["enableInTreeAutoscaling"] is True
    head = manifest["spec"]["rayClusterConfig"]["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert "nvidia.com/gpu" not in head["template"]["spec"]["containers"][0]["resources"]["limits"]
    for group in (head, manifest["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]):
        ports = {p["name"]: p["containerPort"] for p in group["template"]["spec"]["containers"][0]["ports"]}
        assert ports["metrics"] == 8080
        assert group["rayStartParams"]["metrics-export-port"] == "8080"


def write_config(tmp_path, experts, gpus="auto") -> Path:
    config = local_config()
    config["applications"][0]["args"]["experts"] = experts
    config["applications"][0]["args"]["gpus"] = gpus
    config["applications"][0]["args"]["default_model"] = experts[0]["name"]
    config["applications"][0]["args"].pop("routing", None)  # its artifact routes to the zoo
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def expert(name, num_gpus, replicas=1, num_cpus=1, autoscaling=None):
    return {"name": name, "engine": {"model": "builtin:demo-llama"},
            "deployment": {"num_replicas": replicas, "autoscaling": autoscaling or {"enabled": False},
                           "resources": {"num_cpus": num_cpus, "num_gpus": num_gpus}}}


def test_autoscaled_experts_size_the_worker_group_from_min_to_max(tmp_path, capsys):
    path = write_config(tmp_path, [
        expert("a", 1, autoscaling={"min_replicas": 1, "max_replicas": 3}),
        expert("b", 1, autoscaling={"min_replicas": 2, "max_replicas": 2})])
    assert kuberay.main(["--config", str(path)]) == 0
    doc = yaml.safe_load(capsys.readouterr().out)
    cluster = doc["spec"]["rayClusterConfig"]
    group = cluster["workerGroupSpecs"][0]
    assert (group["minReplicas"], group["maxReplicas"]) == (3, 5)
    assert cluster["enableInTreeAutoscaling"] is True


REMOTE = {"name": "hosted", "remote": {"base_url": "http://example.invalid/v1",
                                       "api_key_env": "HOSTED_KEY"},
          "cost_per_1k_prompt": 1.0, "cost_per_1k_completion": 1.0}


@pytest.mark.parametrize("experts, per_worker, want", [
    ([expert("a", 1, replicas=3), expert("b", 1)], 1, (4, 1)),
    ([expert("a", 1, replicas=3), expert("b", 1)], 2, (2, 2)),
    ([expert("a", 0.5, replicas=3), expert("b", 1)], 1, (3, 1)),  # two halves share a GPU
    ([expert("a", 0.6, replicas=3)], 1, (3, 1)),  # 0.6 + 0.6 > 1: no sharing
    ([expert("a", 1), REMOTE], 1, (1, 1)),  # remote experts take no GPU
])
def test_worker_count_from_expert_resources(tmp_path, capsys, experts, per_worker, want):
    path = write_config(tmp_path, experts)
    _, manifest = generate("--config", str(path), "--gpus-per-worker", str(per_worker),
                           capsys=capsys)
    assert workers(manifest) == want


def test_remote_expert_keys_come_from_a_secret(tmp_path, capsys):
    path = write_config(tmp_path, [expert("a", 1), REMOTE])
    _, manifest = generate("--config", str(path), "--name", "fs", capsys=capsys)
    _, env = manifest["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"][
        "containers"][0]["env"]
    assert env == {"name": "HOSTED_KEY", "valueFrom": {"secretKeyRef": {
        "name": "fs-api-keys", "key": "HOSTED_KEY", "optional": True}}}


def test_ray_containers_run_serve_in_high_throughput_mode_unless_asked_not_to(tmp_path, capsys):
    path = write_config(tmp_path, [expert("a", 1)])
    mode = {"name": "RAY_SERVE_THROUGHPUT_OPTIMIZED", "value": "1"}
    _, manifest = generate("--config", str(path), capsys=capsys)
    cluster = manifest["spec"]["rayClusterConfig"]
    containers = [cluster["headGroupSpec"]["template"]["spec"]["containers"][0],
                  *(g["template"]["spec"]["containers"][0] for g in cluster["workerGroupSpecs"])]
    assert all(mode in c["env"] for c in containers)
    _, manifest = generate("--config", str(path), "--no-throughput-mode", capsys=capsys)
    cluster = manifest["spec"]["rayClusterConfig"]
    assert "env" not in cluster["headGroupSpec"]["template"]["spec"]["containers"][0]


def test_cpu_only_config_gets_cpu_workers(tmp_path, capsys):
    path = write_config(tmp_path, [expert("a", 1, replicas=3)], gpus="never")
    _, manifest = generate("--config", str(path), "--worker-cpus", "2", capsys=capsys)
    (group,) = manifest["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert group["groupName"] == "cpu-workers"
    assert workers(manifest) == (2, 0)  # 3 replicas + 0.5 router CPUs on 2-CPU pods


def test_overrides(capsys):
    _, manifest = generate("--config", str(LOCAL), "--image", "reg.example/fs:1", "--name", "fs",
                           "--namespace", "llm", "--gpu-type", "NVIDIA-L4",
                           "--worker-cpus", "16", "--worker-memory", "64Gi", capsys=capsys)
    assert manifest["metadata"]["name"] == "fs"
    assert manifest["metadata"]["namespace"] == "llm"
    cluster = manifest["spec"]["rayClusterConfig"]
    worker = cluster["workerGroupSpecs"][0]["template"]["spec"]
    assert worker["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-L4"}
    assert worker["containers"][0]["image"] == "reg.example/fs:1"
    assert cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["image"] == "reg.example/fs:1"
    assert worker["containers"][0]["resources"]["limits"] == {
        "cpu": "16", "memory": "64Gi", "nvidia.com/gpu": "1"}


@pytest.mark.parametrize("argv, message", [
    (["--gpus-per-worker", "1"], "raise --gpus-per-worker"),
    (["--gpus-per-worker", "2", "--worker-cpus", "1"], "raise --worker-cpus"),
])
def test_impossible_sizes_are_refused(tmp_path, capsys, argv, message):
    path = write_config(tmp_path, [expert("a", 2, num_cpus=1), expert("b", 1)])
    assert kuberay.main(["--config", str(path), *argv]) == 2
    assert message in capsys.readouterr().err


def test_out_writes_file(tmp_path, capsys):
    out = tmp_path / "m" / "rayservice.yaml"
    assert kuberay.main(["--config", str(LOCAL), "--out", str(out)]) == 0
    text = out.read_text()
    assert text.startswith(f"# Generated by `frugalserve kuberay --config {LOCAL}`")
    assert yaml.safe_load(text)["kind"] == "RayService"
