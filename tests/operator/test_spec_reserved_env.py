"""spec.py's reserved env names are exactly what the builders set on the server container."""

from llmservice_operator.builders.config import build_config_map
from llmservice_operator.builders.deployment import build_deployment
from llmservice_operator.settings import OperatorSettings
from llmservice_operator.spec import API_KEY_ENV, CONFIG_MAP_ENV, LLMService, parse_spec

# Every optional setting that adds a variable to the server (adapters, maxModelLen, apiKeySecretRef) or
# might (hfTokenSecretRef, envFrom).
EVERYTHING = {
    "model": {"source": "hf://acme/llama"},
    "adapters": [{"name": "support", "source": "hf://acme/support"}],
    "serving": {"maxModelLen": 4096},
    "apiKeySecretRef": {"name": "keys"},
    "hfTokenSecretRef": {"name": "hf"},
    "envFrom": [{"secretRef": {"name": "extra"}}],
}


def _server_and_config_map() -> tuple[dict, dict]:
    svc = LLMService(name="bot", namespace="team", spec=parse_spec(EVERYTHING))
    config_map = build_config_map(svc)
    deployment = build_deployment(svc, OperatorSettings(), config_map)
    return deployment["spec"]["template"]["spec"]["containers"][0], config_map


def test_the_only_env_entry_the_operator_sets_is_the_api_key() -> None:
    server, _ = _server_and_config_map()
    assert [entry["name"] for entry in server["env"]] == [API_KEY_ENV]


def test_the_config_map_sets_exactly_the_reserved_names() -> None:
    server, config_map = _server_and_config_map()
    assert server["envFrom"][-1] == {"configMapRef": {"name": config_map["metadata"]["name"]}}
    assert sorted(config_map["data"]) == sorted(CONFIG_MAP_ENV)
