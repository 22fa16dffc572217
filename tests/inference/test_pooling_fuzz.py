"""schemathesis against pooling models (test_openapi_fuzz.py covers a generating one): every route of
theirs, and every other, answers as the OpenAPI document declares, never a 5xx."""

from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from tests.inference.harness import running_server
from tests.inference.pooling_models import MINILM, build_classifier


@pytest.mark.parametrize("kind", ["embed", "cross-encoder"])
def test_every_operation_answers_as_documented(kind: str, tmp_path: Path, figure) -> None:  # type: ignore[no-untyped-def]
    model = MINILM if kind == "embed" else build_classifier(tmp_path / "reranker", ["relevance"])
    with running_server(model, served_model_name="pooled", max_queued_requests=64) as server:
        schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
        operations = [result.ok() for result in schema.get_all_operations()]
        cases = 0
        for operation in operations:

            @given(case=operation.as_strategy())
            @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None)
            def answers_as_documented(case: schemathesis.Case) -> None:
                nonlocal cases
                cases += 1
                # Limits known at run time (the model's length, its task's routes) reject some schema-valid
                # bodies with a documented 400 or 404; every other default check applies.
                case.call_and_validate(excluded_checks=[schemathesis.checks.positive_data_acceptance])

            answers_as_documented()
    figure(f"{kind}: {cases} generated requests over {len(operations)} operations: no 5xx, all as documented")
