"""Pure builders: an LLMService in, plain dicts out (one test class per child)."""

import copy
import json
from typing import Any

import pytest

from llmservice_operator.builders import ChildRef, build_children
from llmservice_operator.builders.autoscaling import build_hpa, build_pdb, wants_pdb
from llmservice_operator.builders.config import build_config_map, config_hash
from llmservice_operator.builders.deployment import build_deployment
from llmservice_operator.builders.network import build_network_policy, wants_network_policy
from llmservice_operator.builders.service import build_service
from llmservice_operator.constants import ANNOTATION_CONFIG_HASH
from llmservice_operator.settings import OperatorSettings
from llmservice_operator.spec import LLMService, parse_spec
from tests.charts.rendering import KUBE_VERSIONS, schema_errors

SETTINGS = OperatorSettings(inference_image="registry.example/llm-server:1.0", hpa_metric_name="inflight")
LABELS = {
    "app.kubernetes.io/name": "llmservice",
    "app.kubernetes.io/instance": "bot",
    "app.kubernetes.io/component": "inference",
    "app.kubernetes.io/part-of": "llmservice",
    "app.kubernetes.io/managed-by": "llmservice-operator",
}
SELECTOR = {"app.kubernetes.io/name": "llmservice", "app.kubernetes.io/instance": "bot"}


def service(uid: str | None = "uid-1", **spec: Any) -> LLMService:
    spec.setdefault("model", {"source": "hf://acme/llama", "revision": "v2"})
    return LLMService(name="bot", namespace="team", spec=parse_spec(spec), uid=uid)


def deployment(**spec: Any) -> dict[str, Any]:
    svc = service(**spec)
    return build_deployment(svc, SETTINGS, build_config_map(svc))


def pod_spec(**spec: Any) -> dict[str, Any]:
    return deployment(**spec)["spec"]["template"]["spec"]


def server(**spec: Any) -> dict[str, Any]:
    return pod_spec(**spec)["containers"][0]


class TestMetadata:
    def test_children_carry_labels_and_a_controller_owner_reference(self) -> None:
        for child in build_children(service(), SETTINGS).desired:
            assert child["metadata"]["labels"] == LABELS
            assert child["metadata"]["namespace"] == "team"
            assert child["metadata"]["ownerReferences"] == [
                {
                    "apiVersion": "serving.llmservice.io/v1alpha1",
                    "kind": "LLMService",
                    "name": "bot",
                    "uid": "uid-1",
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ]

    def test_offline_render_claims_no_owner(self) -> None:
        for child in build_children(service(uid=None), SETTINGS).desired:
            assert "ownerReferences" not in child["metadata"]


class TestConfigMap:
    def test_server_settings(self) -> None:
        config = build_config_map(service(adapters=[{"name": "support", "source": "pvc://loras/support"}]))
        assert config["metadata"]["name"] == "bot-config"
        assert config["data"] == {
            "LLM_MODEL": "/var/cache/llm/models/acme--llama/v2",
            "LLM_SERVED_MODEL_NAME": "bot",
            "LLM_TASK": "generate",
            "LLM_HOST": "0.0.0.0",
            "LLM_PORT": "8000",
            "LLM_DEVICE": "cuda",
            "LLM_DTYPE": "auto",
            "LLM_MAX_BATCH_SIZE": "32",
            "LLM_MAX_QUEUED_REQUESTS": "256",
            "LLM_LOG_FORMAT": "json",
            "HF_HOME": "/var/cache/llm/hf-home",
            "HF_HUB_OFFLINE": "1",
            "LLM_ENABLE_RUNTIME_LORA": "true",
            "LLM_DOWNLOAD_DIR": "/var/cache/llm/models",
            "LLM_ADAPTERS": json.dumps(
                {"support": {"source": "/mnt/pvc/loras/support"}}, separators=(",", ":")
            ),
        }

    def test_adapters_as_the_server_takes_them(self) -> None:
        adapters = [
            {"name": "hub", "source": "hf://acme/support-lora", "revision": "r1"},
            {"name": "latest", "source": "hf://acme/sql-lora"},
            {"name": "claim", "source": "pvc://loras/claim"},
            {"name": "local", "source": "file:///adapters/local"},
        ]
        data = build_config_map(service(adapters=adapters))["data"]
        assert json.loads(data["LLM_ADAPTERS"]) == {
            "hub": {"source": "hf://acme/support-lora", "revision": "r1"},
            "latest": {"source": "hf://acme/sql-lora"},
            "claim": {"source": "/mnt/pvc/loras/claim"},
            "local": {"source": "/adapters/local"},
        }

    @pytest.mark.parametrize(
        "adapters",
        [
            [{"name": "support", "source": "hf://acme/support-lora", "revision": "r2"}],
            [{"name": "sql", "source": "file:///adapters/sql"}, {"name": "support", "source": "hf://acme/x"}],
            [],
        ],
    )
    def test_changing_the_adapters_leaves_the_pod_template_alone(
        self, adapters: list[dict[str, Any]]
    ) -> None:
        """No rollout: running pods get the new set through their API, new pods from the ConfigMap."""
        before = build_children(
            service(adapters=[{"name": "support", "source": "hf://acme/support-lora"}]), SETTINGS
        )
        after = build_children(service(adapters=adapters), SETTINGS)
        template = next(child for child in before.desired if child["kind"] == "Deployment")["spec"][
            "template"
        ]
        assert (
            next(child for child in after.desired if child["kind"] == "Deployment")["spec"]["template"]
            == template
        )
        assert before.desired[0]["data"]["LLM_ADAPTERS"] != after.desired[0]["data"]["LLM_ADAPTERS"]

    def test_the_hub_token_reaches_the_server_for_adapter_downloads(self) -> None:
        env = server(hfTokenSecretRef={"name": "hf"})["env"]
        assert {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}} in env
        assert "env" not in server()
        assert "env" not in server(task="embed", hfTokenSecretRef={"name": "hf"})

    def test_cpu_serving_and_limits(self) -> None:
        data = build_config_map(
            service(gpus=0, serving={"maxModelLen": 4096, "maxBatchSize": 8}, model={"source": "file:///m"})
        )["data"]
        assert (data["LLM_DEVICE"], data["LLM_MAX_MODEL_LEN"], data["LLM_MAX_BATCH_SIZE"]) == (
            "cpu",
            "4096",
            "8",
        )
        assert data["LLM_MODEL"] == "/m"

    @pytest.mark.parametrize("task", ["generate", "embed", "classify", "score"])
    def test_the_task_reaches_the_server(self, task: str) -> None:
        assert build_config_map(service(task=task))["data"]["LLM_TASK"] == task

    def test_hash_follows_the_data(self) -> None:
        first = config_hash(build_config_map(service()))
        assert first == config_hash(build_config_map(service()))
        assert first != config_hash(build_config_map(service(serving={"maxBatchSize": 64})))


class TestDeployment:
    def test_replicas_without_autoscaling_and_none_with_it(self) -> None:
        assert deployment(replicas=3)["spec"]["replicas"] == 3
        assert "replicas" not in deployment(replicas=3, autoscaling={"maxReplicas": 4})["spec"]

    def test_the_default_is_one_replica(self) -> None:
        assert deployment()["spec"]["replicas"] == 1

    def test_selector_is_the_immutable_subset(self) -> None:
        spec = deployment()["spec"]
        assert spec["selector"] == {"matchLabels": SELECTOR}
        assert spec["template"]["metadata"]["labels"] == LABELS

    def test_gpu_limits_and_toleration(self) -> None:
        assert server(gpus=2)["resources"]["limits"] == {"nvidia.com/gpu": "2"}
        assert pod_spec(gpus=2)["tolerations"] == [
            {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
        ]

    def test_cpu_serving_has_no_gpu_and_keeps_user_resources(self) -> None:
        container = server(gpus=0, resources={"requests": {"cpu": 2}, "limits": {"memory": "4Gi"}})
        assert container["resources"] == {
            "requests": {"cpu": "2", "ephemeral-storage": "50Gi"},
            "limits": {"memory": "4Gi"},
        }
        assert "tolerations" not in pod_spec(gpus=0)

    def test_every_container_requests_cpu_and_memory(self) -> None:
        """A namespace ResourceQuota on requests.cpu/memory refuses a pod where any container lacks them."""
        spec = pod_spec(adapters=[{"name": "support", "source": "hf://acme/support-lora"}])
        assert spec["containers"][0]["resources"]["requests"] == {
            "cpu": "2",
            "memory": "8Gi",
            "ephemeral-storage": "50Gi",
        }
        assert [init["resources"] for init in spec["initContainers"]] == [
            {"requests": {"cpu": "250m", "memory": "512Mi", "ephemeral-storage": "50Gi"}}
        ]
        cpu_serving = server(gpus=0)["resources"]
        assert cpu_serving == {"requests": {"cpu": "1", "memory": "2Gi", "ephemeral-storage": "50Gi"}}

    def test_user_requests_win_and_a_limit_alone_takes_no_default_request(self) -> None:
        # The API server sets a missing request to its limit; a default 8Gi over a 4Gi limit would be refused.
        resources = server(
            resources={"requests": {"cpu": "500m", "ephemeral-storage": "10Gi"}, "limits": {"memory": "4Gi"}}
        )["resources"]
        assert resources == {
            "requests": {"cpu": "500m", "ephemeral-storage": "10Gi"},
            "limits": {"memory": "4Gi", "nvidia.com/gpu": "1"},
        }

    def test_an_empty_dir_cache_is_requested_as_ephemeral_storage(self) -> None:
        """kubelet charges the emptyDir to the pod; the scheduler takes max(largest init, sum of the rest)."""
        spec = pod_spec(cache={"sizeLimit": "80Gi"})
        containers = spec["initContainers"] + spec["containers"]
        assert {c["resources"]["requests"]["ephemeral-storage"] for c in containers} == {"80Gi"}
        on_a_claim = pod_spec(cache={"claimName": "hf-cache"})
        assert [
            c
            for c in on_a_claim["initContainers"] + on_a_claim["containers"]
            if "ephemeral-storage" in c["resources"]["requests"]
        ] == []

    @pytest.mark.parametrize(
        "spec",
        [{"replicas": 3}, {"autoscaling": {"maxReplicas": 4}}],
        ids=["replicas", "autoscaling"],
    )
    def test_several_replicas_spread_across_nodes(self, spec: dict) -> None:
        assert pod_spec(**spec)["topologySpreadConstraints"] == [
            {
                "maxSkew": 1,
                "topologyKey": "kubernetes.io/hostname",
                "whenUnsatisfiable": "ScheduleAnyway",
                "labelSelector": {"matchLabels": SELECTOR},
                "matchLabelKeys": ["pod-template-hash"],
            }
        ]

    def test_the_pod_template_does_not_change_with_the_replica_count(self) -> None:
        """A spread that came and went with the count would roll every pod on `kubectl scale` from 1."""
        one, three = deployment(replicas=1)["spec"]["template"], deployment(replicas=3)["spec"]["template"]
        assert one == three

    def test_the_users_pod_affinity_replaces_the_spread_and_node_affinity_keeps_it(self) -> None:
        anti = {
            "podAntiAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": [
                    {"labelSelector": {"matchLabels": SELECTOR}, "topologyKey": "topology.kubernetes.io/zone"}
                ]
            }
        }
        spec = pod_spec(replicas=3, affinity=anti)
        assert spec["affinity"] == anti
        assert "topologySpreadConstraints" not in spec
        nodes = {
            "nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": []}}
        }
        spec = pod_spec(replicas=3, affinity=nodes)
        assert spec["affinity"] == nodes
        assert len(spec["topologySpreadConstraints"]) == 1

    def test_user_tolerations_follow_the_gpu_one(self) -> None:
        tolerations = pod_spec(
            tolerations=[{"key": "pool", "operator": "Equal", "value": "a100", "effect": "NoSchedule"}]
        )["tolerations"]
        assert tolerations[1] == {"key": "pool", "operator": "Equal", "value": "a100", "effect": "NoSchedule"}

    def test_image_and_server_arguments(self) -> None:
        assert server()["image"] == "registry.example/llm-server:1.0"
        container = server(image="mine:2", imagePullPolicy="Always", args=["--log-requests"])
        assert (container["image"], container["imagePullPolicy"]) == ("mine:2", "Always")
        assert container["args"] == ["serve", "--log-requests"]
        assert container["envFrom"] == [{"configMapRef": {"name": "bot-config"}}]

    def test_the_operators_config_map_wins_over_the_users_env_from(self) -> None:
        container = server(envFrom=[{"secretRef": {"name": "extra"}}])
        assert container["envFrom"][-1] == {"configMapRef": {"name": "bot-config"}}

    def test_init_containers_fetch_hub_sources_only(self) -> None:
        init = pod_spec(
            adapters=[
                {"name": "support", "source": "hf://acme/support-lora", "revision": "r1"},
                {"name": "local", "source": "file:///adapters/local"},
            ],
            hfTokenSecretRef={"name": "hf"},
        )["initContainers"]
        # Adapters are fetched by the server at run time: an init container each would roll the pods.
        assert [item["name"] for item in init] == ["fetch-model"]
        assert init[0]["args"] == [
            "download",
            "--source",
            "hf://acme/llama",
            "--dest",
            "/var/cache/llm/models/acme--llama/v2",
            "--revision",
            "v2",
        ]
        assert {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}} in init[0][
            "env"
        ]
        assert init[0]["volumeMounts"][0] == {"name": "cache", "mountPath": "/var/cache/llm"}

    def test_no_init_container_when_nothing_to_fetch(self) -> None:
        assert "initContainers" not in pod_spec(model={"source": "pvc://weights/llama"})

    def test_pvc_sources_are_mounted_read_only(self) -> None:
        spec = pod_spec(
            model={"source": "pvc://weights/llama/8b"}, adapters=[{"name": "a", "source": "pvc://loras/a"}]
        )
        assert spec["volumes"][3:] == [
            {"name": "weights-0", "persistentVolumeClaim": {"claimName": "weights", "readOnly": True}},
            {"name": "weights-1", "persistentVolumeClaim": {"claimName": "loras", "readOnly": True}},
        ]
        assert spec["containers"][0]["volumeMounts"][3:] == [
            {"name": "weights-0", "mountPath": "/mnt/pvc/weights", "readOnly": True},
            {"name": "weights-1", "mountPath": "/mnt/pvc/loras", "readOnly": True},
        ]

    def test_cache_volume_is_an_empty_dir_or_a_claim(self) -> None:
        assert pod_spec()["volumes"][0] == {"name": "cache", "emptyDir": {"sizeLimit": "50Gi"}}
        assert pod_spec(cache={"claimName": "hf-cache"})["volumes"][0] == {
            "name": "cache",
            "persistentVolumeClaim": {"claimName": "hf-cache"},
        }
        assert pod_spec()["volumes"][1] == {
            "name": "shm",
            "emptyDir": {"medium": "Memory", "sizeLimit": "2Gi"},
        }

    def test_probes_allow_slow_model_loads(self) -> None:
        container = server()
        assert container["startupProbe"] == {
            "httpGet": {"path": "/health/ready", "port": "http"},
            "periodSeconds": 10,
            "failureThreshold": 180,
            "timeoutSeconds": 5,
        }
        assert container["readinessProbe"]["httpGet"] == {"path": "/health/ready", "port": "http"}
        assert container["livenessProbe"]["httpGet"] == {"path": "/health/live", "port": "http"}

    def test_restricted_security_context(self) -> None:
        spec = pod_spec(hfTokenSecretRef={"name": "hf"})
        assert spec["securityContext"] == {
            "runAsNonRoot": True,
            "runAsUser": 1000,
            "runAsGroup": 1000,
            "fsGroup": 1000,
            "seccompProfile": {"type": "RuntimeDefault"},
        }
        assert spec["automountServiceAccountToken"] is False
        for container in spec["containers"] + spec["initContainers"]:
            assert container["securityContext"] == {
                "allowPrivilegeEscalation": False,
                "readOnlyRootFilesystem": True,
                "runAsNonRoot": True,
                "capabilities": {"drop": ["ALL"]},
            }

    def test_openshift_leaves_uid_gid_and_fs_group_to_the_scc(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """restricted-v2 assigns them from the namespace's range and refuses a pod fixing them outside it."""
        monkeypatch.setenv("LLMSERVICE_PLATFORM", "openshift")
        svc = service(hfTokenSecretRef={"name": "hf"})
        spec = build_deployment(svc, OperatorSettings(), build_config_map(svc))["spec"]["template"]["spec"]
        assert spec["securityContext"] == {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}
        for container in spec["containers"] + spec["initContainers"]:
            assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
            assert container["securityContext"]["runAsNonRoot"] is True

    def test_secrets_reach_the_pod_only_by_reference(self) -> None:
        container = server(apiKeySecretRef={"name": "keys", "key": "bot"})
        assert container["env"] == [
            {"name": "LLM_API_KEY", "valueFrom": {"secretKeyRef": {"name": "keys", "key": "bot"}}}
        ]

    def test_scrape_annotations_and_config_hash(self) -> None:
        svc = service()
        annotations = build_deployment(svc, SETTINGS, build_config_map(svc))["spec"]["template"]["metadata"][
            "annotations"
        ]
        assert annotations == {
            "prometheus.io/scrape": "true",
            "prometheus.io/port": "8000",
            "prometheus.io/path": "/metrics",
            "serving.llmservice.io/config-hash": config_hash(build_config_map(svc)),
        }

    def test_scheduling_fields_pass_through(self) -> None:
        affinity = {
            "nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": []}}
        }
        spec = pod_spec(
            nodeSelector={"gpu": "a100"},
            affinity=affinity,
            runtimeClassName="nvidia",
            imagePullSecrets=[{"name": "r"}],
        )
        assert spec["nodeSelector"] == {"gpu": "a100"}
        assert spec["affinity"] == affinity
        assert spec["runtimeClassName"] == "nvidia"
        assert spec["imagePullSecrets"] == [{"name": "r"}]


class TestService:
    def test_cluster_ip_port_80_to_http(self) -> None:
        assert build_service(service())["spec"] == {
            "type": "ClusterIP",
            "selector": SELECTOR,
            "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}],
        }


class TestAutoscaling:
    def test_hpa_targets_in_flight_requests_per_pod(self) -> None:
        hpa = build_hpa(
            service(autoscaling={"minReplicas": 2, "maxReplicas": 6, "targetInFlightRequests": 12}), SETTINGS
        )
        spec = hpa["spec"]
        assert spec["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "bot"}
        assert (spec["minReplicas"], spec["maxReplicas"]) == (2, 6)
        assert spec["metrics"] == [
            {
                "type": "Pods",
                "pods": {
                    "metric": {"name": "inflight"},
                    "target": {"type": "AverageValue", "averageValue": "12"},
                },
            }
        ]
        assert spec["behavior"]["scaleDown"]["stabilizationWindowSeconds"] == 300

    @pytest.mark.parametrize(
        ("spec", "wanted"),
        [
            ({"replicas": 1}, False),
            ({"replicas": 2}, True),
            ({"autoscaling": {"maxReplicas": 1}}, False),
            ({"autoscaling": {"maxReplicas": 3}}, True),
        ],
    )
    def test_pdb_only_where_more_than_one_replica_can_run(self, spec: dict, wanted: bool) -> None:
        assert wants_pdb(service(**spec)) is wanted

    def test_pdb_allows_one_pod_down(self) -> None:
        assert build_pdb(service(replicas=2))["spec"] == {
            "maxUnavailable": 1,
            "selector": {"matchLabels": SELECTOR},
            "unhealthyPodEvictionPolicy": "AlwaysAllow",
        }

    @pytest.mark.parametrize("version", KUBE_VERSIONS)
    def test_pdb_validates_against_the_kubernetes_schema(self, version: str) -> None:
        assert schema_errors(build_pdb(service(replicas=2)), version) is None

    def test_children_and_leftovers(self) -> None:
        fixed = build_children(service(replicas=1), SETTINGS)
        assert [child["kind"] for child in fixed.desired] == ["ConfigMap", "Service", "Deployment"]
        assert [ref.kind for ref in fixed.absent] == [
            "HorizontalPodAutoscaler",
            "PodDisruptionBudget",
            "NetworkPolicy",
        ]
        scaled = build_children(service(autoscaling={"maxReplicas": 4}), SETTINGS)
        assert [child["kind"] for child in scaled.desired][-2:] == [
            "HorizontalPodAutoscaler",
            "PodDisruptionBudget",
        ]
        assert [ref.kind for ref in scaled.absent] == ["NetworkPolicy"]


PEERS = [
    {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "gateway"}}},
    {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
        "podSelector": {
            "matchLabels": {"app.kubernetes.io/name": "prometheus"},
            "matchExpressions": [{"key": "tier", "operator": "NotIn", "values": ["test"]}],
        },
    },
    {"podSelector": {"matchExpressions": [{"key": "llm-client", "operator": "Exists"}]}},
    {"podSelector": {}},
]


class TestNetworkPolicy:
    def test_off_by_default_and_deleted_when_off(self) -> None:
        assert wants_network_policy(service()) is False
        children = build_children(service(networkPolicy={"enabled": False, "ingressFrom": PEERS}), SETTINGS)
        assert "NetworkPolicy" not in [child["kind"] for child in children.desired]
        assert ChildRef("networking.k8s.io/v1", "NetworkPolicy", "bot") in children.absent

    def test_ingress_to_the_server_port_from_the_peers_only(self) -> None:
        policy = build_network_policy(service(networkPolicy={"enabled": True, "ingressFrom": PEERS}))
        assert (policy["apiVersion"], policy["kind"]) == ("networking.k8s.io/v1", "NetworkPolicy")
        assert policy["metadata"]["name"] == "bot"
        assert policy["spec"] == {
            "podSelector": {"matchLabels": SELECTOR},
            "policyTypes": ["Ingress"],  # egress stays open: weights come from the hub
            "ingress": [{"from": PEERS, "ports": [{"protocol": "TCP", "port": 8000}]}],
        }

    def test_is_a_child_like_the_others(self) -> None:
        children = build_children(
            service(networkPolicy={"enabled": True, "ingressFrom": PEERS[:1]}), SETTINGS
        )
        assert children.desired[-1]["kind"] == "NetworkPolicy"
        assert "NetworkPolicy" not in [ref.kind for ref in children.absent]

    def test_selects_the_pods_of_the_deployment(self) -> None:
        svc = service(networkPolicy={"enabled": True, "ingressFrom": PEERS[:1]})
        template_labels = build_deployment(svc, SETTINGS, build_config_map(svc))["spec"]["template"][
            "metadata"
        ]["labels"]
        selector = build_network_policy(svc)["spec"]["podSelector"]["matchLabels"]
        assert selector.items() <= template_labels.items()

    @pytest.mark.parametrize("version", KUBE_VERSIONS)
    def test_validates_against_the_kubernetes_schema(self, version: str) -> None:
        policy = build_network_policy(service(networkPolicy={"enabled": True, "ingressFrom": PEERS}))
        assert schema_errors(policy, version) is None


class TestPoolingModels:
    """An embedding, classification or scoring model runs as a generative one does: the same probes, metrics
    annotations, HPA on in-flight requests, PDB and NetworkPolicy; only LLM_TASK differs."""

    @pytest.mark.parametrize("task", ["embed", "classify", "score"])
    def test_children_differ_from_a_generative_models_only_in_the_task(self, task: str) -> None:
        spec = {
            "gpus": 0,
            "autoscaling": {"maxReplicas": 4},
            "networkPolicy": {"enabled": True, "ingressFrom": PEERS},
        }
        generative = build_children(service(**spec), SETTINGS)
        pooling = build_children(service(task=task, **spec), SETTINGS)
        assert [child["kind"] for child in pooling.desired] == [
            "ConfigMap",
            "Service",
            "Deployment",
            "HorizontalPodAutoscaler",
            "PodDisruptionBudget",
            "NetworkPolicy",
        ]
        assert pooling.absent == generative.absent == []
        # The task is in the ConfigMap, so in the hash on the pod template that rolls the pods; nowhere else.
        expected = copy.deepcopy(generative.desired)
        config_map, _, server_deployment = expected[:3]
        config_map["data"]["LLM_TASK"] = task
        # Adapters are for generation: the adapter settings and the operator's way into the pods go.
        for key in ("LLM_ENABLE_RUNTIME_LORA", "LLM_DOWNLOAD_DIR", "LLM_ADAPTERS"):
            del config_map["data"][key]
        server_deployment["spec"]["template"]["metadata"]["annotations"][ANNOTATION_CONFIG_HASH] = (
            config_hash(config_map)
        )
        assert pooling.desired == expected


def test_the_operators_namespace_is_admitted_to_generation_pods() -> None:
    """The operator sets the adapters through each pod's port; pooling models take no adapters."""
    operator_peer = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "llm-system"}}}
    policy = build_network_policy(
        service(networkPolicy={"enabled": True, "ingressFrom": PEERS}), "llm-system"
    )
    assert policy["spec"]["ingress"][0]["from"] == [*PEERS, operator_peer]
    pooling = build_network_policy(
        service(task="embed", networkPolicy={"enabled": True, "ingressFrom": PEERS}), "llm-system"
    )
    assert pooling["spec"]["ingress"][0]["from"] == PEERS
    settings = OperatorSettings(operator_namespace="llm-system")
    children = build_children(service(networkPolicy={"enabled": True, "ingressFrom": PEERS}), settings)
    assert operator_peer in children.desired[-1]["spec"]["ingress"][0]["from"]
