"""Event data survives clients that split lines like str.splitlines (httpx's aiter_lines does)."""

import json

from llm_server.api.streaming import event_json


def test_generated_line_separators_do_not_cut_an_event() -> None:
    # A random-weight model streamed U+2028 in `make bench` and httpx cut the event in two.
    payload = {"choices": [{"text": "a\u2028b\x85c\u2029d\ne", "index": 0}], "note": "é 字"}
    data = event_json(payload)
    assert len(f"data: {data}".splitlines()) == 1
    assert json.loads(data) == payload
    assert "é 字" in data  # other text stays UTF-8, not escaped
