"""The routes beyond chat through the real ``openai`` SDK on ``client.openai()`` (the httpx
transport): the SDK parses the sandbox's answers, and the metrics name each route's
operation and count its tokens."""

from __future__ import annotations

import csv

import pytest

from cometkit import Client

openai = pytest.importorskip("openai")


@pytest.fixture
def sdk_and_rows(cometkit_sandbox, tmp_path):
    path = tmp_path / "attempts.csv"
    client = Client(api_key="sk-test", base_url=cometkit_sandbox.base_url,
                    config={"plugins": {"csv_metrics": {"path": str(path)}}})

    def rows():
        client.close()
        with open(path, newline="") as handle:
            return list(csv.DictReader(handle))

    try:
        yield client.openai(), rows
    finally:
        client.close()


def test_responses_through_the_sdk_whole_and_streamed(sdk_and_rows):
    sdk, rows = sdk_and_rows
    answer = sdk.responses.create(model="gpt-4o-mini", input="Say hi")
    assert answer.output_text == "echo: Say hi"
    with sdk.responses.create(model="gpt-4o-mini", input="one two", stream=True) as stream:
        events = list(stream)
    assert events[-1].type == "response.completed"
    assert events[-1].response.output_text == "echo: one two"
    whole, streamed = rows()
    assert (whole["operation"], whole["input_tokens"], whole["output_tokens"]) == (
        "generate_content", "2", "3")
    assert (streamed["operation"], streamed["input_tokens"], streamed["output_tokens"]) == (
        "generate_content", "2", "4")


def test_moderations_images_and_speech_through_the_sdk(sdk_and_rows, tmp_path):
    sdk, rows = sdk_and_rows
    assert sdk.moderations.create(input="I will kill it").results[0].flagged is True
    image = sdk.images.generate(prompt="a cat", model="dall-e-3", response_format="b64_json")
    assert image.data[0].b64_json
    speech = sdk.audio.speech.create(model="tts-1", voice="alloy", input="Hello")
    target = tmp_path / "hello.mp3"
    speech.write_to_file(target)
    assert target.read_bytes().startswith(b"ID3")
    transcript = sdk.audio.transcriptions.create(model="whisper-1", file=("a.wav", b"x" * 200))
    assert transcript.text == "sandbox transcript of a.wav: 200 bytes"
    operations = [(r["operation"], r["model"], r["status_code"]) for r in rows()]
    assert operations == [("moderations", "", "200"), ("images", "dall-e-3", "200"),
                          ("audio.speech", "tts-1", "200"),
                          # the model of an upload is read from its form fields
                          ("audio.transcriptions", "whisper-1", "200")]
