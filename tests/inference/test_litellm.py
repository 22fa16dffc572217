"""LiteLLM, as a gateway in front of vLLM calls it (`hosted_vllm/` provider, an OpenAI-compatible base URL):
streamed completion, the chunks adding up to the non-streamed text."""

import litellm

from tests.inference.harness import RunningServer


def test_litellm_completion_streaming(server: RunningServer) -> None:
    arguments = {
        "model": "hosted_vllm/tiny",
        "api_base": f"{server.url}/v1",
        "api_key": "none",
        "messages": [{"role": "user", "content": "Hello"}],
        "max_tokens": 8,
        "temperature": 0,
    }
    whole = litellm.completion(**arguments)
    chunks = list(litellm.completion(**arguments, stream=True))
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in chunks)
    assert streamed == whole.choices[0].message.content and streamed
    assert chunks[-1].choices[0].finish_reason == "length"
