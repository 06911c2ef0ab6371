"""``chat.completions.parse(response_format=<pydantic model>)``: the structured-outputs snippet
of the openai docs, on cometkit.Client."""

from __future__ import annotations

import json
import pickle

import pytest
from scripted_server import ScriptedServer, chat_body, json_reply

import cometkit
from cometkit.sandbox import Sandbox

pydantic = pytest.importorskip("pydantic")

KEY = "sk-test-parse-77"


class Step(pydantic.BaseModel):
    explanation: str
    output: str


class MathReasoning(pydantic.BaseModel):
    steps: list[Step]
    final_answer: str


MESSAGES = [{"role": "system", "content": "You are a helpful math tutor."},
            {"role": "user", "content": "how can I solve 8x + 7 = -23"}]


def test_parse_fills_message_parsed_with_the_model_as_the_openai_sdk_does():
    with Sandbox() as sandbox, cometkit.Client(KEY, sandbox.base_url) as client:
        completion = client.chat.completions.parse(model="gpt-4o-mini", messages=MESSAGES,
                                                   response_format=MathReasoning)
    message = completion.choices[0].message
    assert isinstance(message.parsed, MathReasoning)
    assert message.parsed.final_answer and all(isinstance(s, Step) for s in message.parsed.steps)
    assert json.loads(message.content) == message.parsed.model_dump()
    again = pickle.loads(pickle.dumps(completion.choices[0].message))
    assert again.parsed == message.parsed  # results cross process pools, parsed included


def test_the_model_goes_out_as_a_strict_json_schema():
    seen = []

    def handler(request):
        seen.append(request.json())
        return json_reply(200, chat_body('{"steps": [], "final_answer": "x = -3.75"}'))

    with ScriptedServer(handler) as server, cometkit.Client(KEY, server.base_url,
                                                           config={"plugins": {}}) as client:
        answer = client.chat.completions.parse(model="m1", messages=MESSAGES,
                                               response_format=MathReasoning)
    assert answer.choices[0].message.parsed.final_answer == "x = -3.75"
    spec = seen[0]["response_format"]
    assert spec["type"] == "json_schema" and spec["json_schema"]["strict"] is True
    schema = spec["json_schema"]["schema"]
    assert spec["json_schema"]["name"] == "MathReasoning"
    assert schema["additionalProperties"] is False
    assert sorted(schema["required"]) == ["final_answer", "steps"]
    step = schema["$defs"]["Step"]
    assert step["additionalProperties"] is False and sorted(step["required"]) == \
        ["explanation", "output"]


def test_an_answer_that_does_not_fit_is_a_cometkit_error_and_other_formats_a_type_error():
    def handler(request):
        return json_reply(200, chat_body('{"final_answer": 3}'))

    with ScriptedServer(handler) as server, cometkit.Client(KEY, server.base_url,
                                                           config={"plugins": {}}) as client:
        with pytest.raises(cometkit.APIError, match="does not fit MathReasoning"):
            client.chat.completions.parse(model="m1", messages=MESSAGES,
                                          response_format=MathReasoning)
        with pytest.raises(TypeError, match="pydantic model class"):
            client.chat.completions.parse(model="m1", messages=MESSAGES,
                                          response_format={"type": "json_object"})
        with pytest.raises(TypeError, match="stream"):
            client.chat.completions.parse(model="m1", messages=MESSAGES,
                                          response_format=MathReasoning, stream=True)
        assert server.count == 1  # the last two were refused before anything was sent
