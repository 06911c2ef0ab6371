"""Common openai-SDK snippets, written as the openai README and cookbook write them, run on
``cometkit.Client`` against the sandbox with only the import and the constructor changed.

Each test's body below the two marked lines is the snippet as published (names of models
and the printing aside); what it asserts is what the snippet's reader relies on.
"""

from __future__ import annotations

import json
import pickle
import socket

import httpx
import pytest

# -- the import, changed ---------------------------------------------------------------------
import cometkit as openai
from cometkit import Client as OpenAI


@pytest.fixture
def sandbox(cometkit_sandbox_factory):
    return cometkit_sandbox_factory(api_key="sk-port-test", rpm=60_000)


@pytest.fixture
def client(sandbox):
    # -- the constructor, changed --------------------------------------------------------------
    with OpenAI(api_key="sk-port-test", base_url=sandbox.base_url) as client:
        yield client


def get_current_weather(location, unit="fahrenheit"):
    """The cookbook's stand-in for a real weather service."""
    return json.dumps({"location": location, "temperature": "72", "unit": unit})


def test_tool_call_loop(client):
    messages = [{"role": "user", "content": "What's the weather like in Boston today?"}]
    tools = [{
        "type": "function",
        "function": {
            "name": "get_current_weather",
            "description": "Get the current weather in a given location",
            "parameters": {
                "type": "object",
                "properties": {
                    "location": {"type": "string",
                                 "description": "The city and state, e.g. San Francisco, CA"},
                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                },
                "required": ["location"],
            },
        },
    }]
    response = client.chat.completions.create(model="gpt-4o-mini", messages=messages,
                                              tools=tools, tool_choice="auto")
    response_message = response.choices[0].message
    tool_calls = response_message.tool_calls
    assert tool_calls
    available_functions = {"get_current_weather": get_current_weather}
    messages.append(response_message)  # the answer object itself goes back in
    for tool_call in tool_calls:
        function_name = tool_call.function.name
        function_to_call = available_functions[function_name]
        function_args = json.loads(tool_call.function.arguments)
        function_response = function_to_call(location=function_args.get("location"),
                                             unit=function_args.get("unit"))
        messages.append({"tool_call_id": tool_call.id, "role": "tool", "name": function_name,
                         "content": function_response})
    second_response = client.chat.completions.create(model="gpt-4o-mini", messages=messages)
    answer = second_response.choices[0].message.content
    assert json.loads(answer[len("echo: "):]) == {
        "location": "What's the weather like in Boston today?", "temperature": "72",
        "unit": "celsius"}


def test_json_schema_response_format(client):
    response = client.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "system", "content": "You are a helpful math tutor."},
                  {"role": "user", "content": "solve 8x + 31 = 2"}],
        response_format={
            "type": "json_schema",
            "json_schema": {
                "name": "math_response",
                "schema": {
                    "type": "object",
                    "properties": {
                        "steps": {"type": "array", "items": {
                            "type": "object",
                            "properties": {"explanation": {"type": "string"},
                                           "output": {"type": "string"}},
                            "required": ["explanation", "output"],
                            "additionalProperties": False}},
                        "final_answer": {"type": "string"},
                    },
                    "required": ["steps", "final_answer"],
                    "additionalProperties": False,
                },
                "strict": True,
            },
        },
    )
    math = json.loads(response.choices[0].message.content)
    assert set(math) == {"steps", "final_answer"}
    assert math["steps"][0]["explanation"] == "solve 8x + 31 = 2"


def test_streaming_with_usage(client):
    stream = client.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "Say this is a test"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    text, usage = "", None
    for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
        if chunk.usage:
            usage = chunk.usage
    assert text == "echo: Say this is a test"
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens > 0


def test_raw_response_headers(client):
    response = client.chat.completions.with_raw_response.create(
        messages=[{"role": "user", "content": "Say this is a test"}],
        model="gpt-4o-mini",
    )
    remaining = response.headers.get("x-ratelimit-remaining-requests")
    completion = response.parse()  # get the object that `chat.completions.create()` would
    assert int(remaining) >= 0
    assert completion.choices[0].message.content == "echo: Say this is a test"


def test_model_dump_json_and_to_dict(client):
    completion = client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "Say this is a test"}])
    as_json = completion.model_dump_json(indent=2)
    assert json.loads(as_json) == completion.to_dict() == completion.model_dump()
    assert json.loads(completion.to_json())["choices"][0]["message"]["role"] == "assistant"
    assert "refusal" not in completion.model_dump(exclude_none=True)["choices"][0]["message"]


def test_embeddings(client):
    response = client.embeddings.create(input="Your text string goes here",
                                        model="text-embedding-3-small")
    embedding = response.data[0].embedding
    assert len(embedding) == 32 and response.usage.prompt_tokens > 0


def test_with_options(client):
    completion = client.with_options(max_retries=5).chat.completions.create(
        messages=[{"role": "user", "content": "How can I get the name of the current day in "
                                              "JavaScript?"}],
        model="gpt-4o-mini",
    )
    assert completion.choices[0].message.content.startswith("echo: How can I")
    timed = client.with_options(timeout=5.0).chat.completions.create(
        messages=[{"role": "user", "content": "How can I list all files in a directory "
                                              "using Python?"}],
        model="gpt-4o-mini",
    )
    assert timed.choices[0].finish_reason == "stop"


def test_httpx_timeout_in_the_constructor(sandbox):
    client = OpenAI(api_key="sk-port-test", base_url=sandbox.base_url,
                    timeout=httpx.Timeout(60.0, read=5.0, write=10.0, connect=2.0))
    with client:
        client.chat.completions.create(model="gpt-4o-mini",
                                       messages=[{"role": "user", "content": "hi"}])
    assert client.timeout_s == (2.0, 5.0)


def test_extra_body_extra_query_extra_headers(client):
    response = client.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "a long enough question"}],
        extra_headers={"x-foo": "true"},
        extra_query={"my_query_param": "bar"},
        extra_body={"max_completion_tokens": 1},
    )
    assert response.choices[0].finish_reason == "length"  # the body field took effect


def test_handling_errors(sandbox, cometkit_sandbox_factory):
    outcomes = []

    def call(client):
        try:
            client.chat.completions.create(model="gpt-4o-mini",
                                           messages=[{"role": "user", "content": "hi"}])
        except openai.APIConnectionError as e:
            outcomes.append(("connection", e.__cause__))
        except openai.RateLimitError as e:
            outcomes.append(("rate limit", e.status_code))
        except openai.APIStatusError as e:
            outcomes.append(("status", e.status_code, e.code, e.type, e.body["message"]))

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        nowhere = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    busy = cometkit_sandbox_factory(always_429=True, retry_after_value_s=0.01)
    with OpenAI(api_key="sk-port-test", base_url=nowhere, max_retries=0) as client:
        call(client)
    with OpenAI(api_key="sk-port-test", base_url=busy.base_url, max_retries=0) as client:
        call(client)
    with OpenAI(api_key="sk-wrong", base_url=sandbox.base_url) as client:
        call(client)
    (kind, cause), rate_limited, status = outcomes
    assert kind == "connection" and cause is not None
    assert rate_limited == ("rate limit", 429)
    assert status == ("status", 401, "invalid_api_key", "invalid_request_error",
                      "Incorrect API key provided.")
    try:
        raise openai.NotFoundError("x", status_code=404)
    except openai.OpenAIError as e:  # the base of them all
        assert e.status_code == 404


def test_models_list_and_retrieve(client, sandbox):
    ids = [model.id for model in client.models.list()]
    assert ids == list(sandbox.models)
    model = client.models.retrieve("gpt-4o-mini")
    assert model.id == "gpt-4o-mini" and model.object == "model"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-nonexistent")


def test_pickling_a_result(client):
    completion = client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "keep me"}])
    restored = pickle.loads(pickle.dumps(completion))
    assert restored == completion and restored._request_id == completion._request_id
    assert restored.choices[0].message.content == "echo: keep me"


# -- the rest of the surface, as the openai docs write it ---------------------------------------


def test_responses(client):
    response = client.responses.create(model="gpt-4o-mini",
                                       input="Write a one-sentence bedtime story about a unicorn.")
    assert isinstance(response.output_text, str) and response.output_text
    fetched = client.responses.retrieve(response.id)
    assert fetched.output_text == response.output_text
    client.responses.delete(response.id)


def test_responses_streaming(client):
    stream = client.responses.create(model="gpt-4o-mini", input="Say 'double bubble bath'.",
                                     stream=True)
    deltas = []
    for event in stream:
        if event.type == "response.output_text.delta":
            deltas.append(event.delta)
        elif event.type == "response.completed":
            usage = event.response.usage
    assert "".join(deltas) and usage.input_tokens > 0


def test_legacy_completions(client):
    completion = client.completions.create(model="gpt-3.5-turbo-instruct",
                                           prompt="Say this is a test", max_tokens=7)
    assert isinstance(completion.choices[0].text, str)


def test_moderations(client):
    response = client.moderations.create(model="omni-moderation-latest",
                                         input="...text to classify goes here...")
    assert response.results[0].flagged in (True, False)


def test_images(client):
    result = client.images.generate(model="dall-e-3", prompt="a white siamese cat",
                                    size="1024x1024", n=1)
    assert result.data[0].url or result.data[0].b64_json


def test_speech_to_file_and_transcription(client, tmp_path):
    speech_file_path = tmp_path / "speech.mp3"
    response = client.audio.speech.create(model="gpt-4o-mini-tts", voice="coral",
                                          input="Today is a wonderful day to build something!")
    response.write_to_file(speech_file_path)
    assert speech_file_path.stat().st_size > 0
    with open(speech_file_path, "rb") as audio_file:
        transcription = client.audio.transcriptions.create(model="gpt-4o-transcribe",
                                                           file=audio_file)
    assert isinstance(transcription.text, str)


def test_files_and_batches(client, tmp_path):
    requests_file = tmp_path / "batchinput.jsonl"
    requests_file.write_text("\n".join(json.dumps({
        "custom_id": f"request-{i}", "method": "POST", "url": "/v1/chat/completions",
        "body": {"model": "gpt-4o-mini",
                 "messages": [{"role": "user", "content": f"Hello world {i}"}]}})
        for i in (1, 2)) + "\n")
    batch_input_file = client.files.create(file=open(requests_file, "rb"), purpose="batch")
    batch = client.batches.create(input_file_id=batch_input_file.id,
                                  endpoint="/v1/chat/completions", completion_window="24h",
                                  metadata={"description": "nightly eval job"})
    batch = client.batches.retrieve(batch.id)
    assert batch.status == "completed"
    file_response = client.files.content(batch.output_file_id)
    lines = [json.loads(line) for line in file_response.text.splitlines()]
    assert sorted(line["custom_id"] for line in lines) == ["request-1", "request-2"]
    assert any(b.id == batch.id for b in client.batches.list(limit=10))
