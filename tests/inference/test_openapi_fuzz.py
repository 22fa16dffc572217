"""schemathesis against the server's own OpenAPI document: no 5xx, and every answer matches what the
document declares (status codes, content types, bodies)."""

from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from tests.inference.harness import RunningServer, running_server


@pytest.fixture(scope="module")
def fuzz_server(demo: tuple[Path, Path]) -> Iterator[RunningServer]:
    # Short generations keep a few hundred cases quick; the limits still apply to every request.
    with running_server(
        demo[0],
        adapters={"support": demo[1]},
        served_model_name="tiny",
        max_new_tokens=16,
        default_max_tokens=8,
        max_queued_requests=64,
    ) as server:
        yield server


@pytest.fixture(scope="module")
def api_schema(fuzz_server: RunningServer) -> schemathesis.BaseSchema:
    return schemathesis.openapi.from_url(f"{fuzz_server.url}/openapi.json")


def test_every_operation_answers_as_documented(api_schema: schemathesis.BaseSchema, figure) -> None:  # type: ignore[no-untyped-def]
    # schemathesis's pytest plugin does not load under pytest 9, so hypothesis drives each operation here.
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 12
    cases = 0
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=75, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def answers_as_documented(case: schemathesis.Case) -> None:
            nonlocal cases
            cases += 1
            # Limits set at run time (max_tokens, the context length) reject some schema-valid bodies
            # with a documented 400; every other default check applies.
            case.call_and_validate(excluded_checks=[schemathesis.checks.positive_data_acceptance])

        answers_as_documented()
    figure(f"{cases} generated requests over {len(operations)} operations: no 5xx, all as documented")
