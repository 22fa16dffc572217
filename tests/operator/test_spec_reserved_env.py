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


def test_the_env_entries_the_operator_sets_are_the_api_key_and_the_hub_token() -> None:
    server, _ = _server_and_config_map()
    assert [entry["name"] for entry in server["env"]] == [API_KEY_ENV, "HF_TOKEN"]


def test_a_users_own_hub_token_entry_is_kept_instead_of_the_operators() -> None:
    """HF_TOKEN is not reserved (specs set it before the server downloaded adapters): the user's wins."""
    own = {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "mine", "key": "t"}}}
    svc = LLMService(name="bot", namespace="team", spec=parse_spec({**EVERYTHING, "env": [own]}))
    config_map = build_config_map(svc)
    server = build_deployment(svc, OperatorSettings(), config_map)["spec"]["template"]["spec"]["containers"][
        0
    ]
    assert [entry for entry in server["env"] if entry["name"] == "HF_TOKEN"] == [own]


def test_the_config_map_sets_exactly_the_reserved_names() -> None:
    server, config_map = _server_and_config_map()
    assert server["envFrom"][-1] == {"configMapRef": {"name": config_map["metadata"]["name"]}}
    assert sorted(config_map["data"]) == sorted(CONFIG_MAP_ENV)
