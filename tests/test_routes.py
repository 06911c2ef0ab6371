"""The OpenAI surface beyond chat and embeddings, on ``cometkit.Client`` against the sandbox:
each route's answer shape, its operation name and tokens in the metrics, the limiter and the
retry policy applied to it, uploads, binary answers and the Batch API round trip."""

from __future__ import annotations

import base64
import csv
import json

import pytest
from fakes import FakeClock
from scripted_server import Reply, ScriptedServer, json_reply

import cometkit
from cometkit import BinaryAnswer, Client
from cometkit.sandbox.routes import PNG_BYTES


def make_client(sandbox, tmp_path, **plugins):
    config = {"plugins": {"csv_metrics": {"path": str(tmp_path / "attempts.csv")}, **plugins}}
    return Client(api_key="sk-test", base_url=sandbox.base_url, config=config)


def rows(tmp_path):
    with open(tmp_path / "attempts.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def test_responses_create_retrieve_delete_with_output_text_and_usage(cometkit_sandbox, tmp_path):
    with make_client(cometkit_sandbox, tmp_path) as client:
        answer = client.responses.create(model="gpt-4o-mini", input="Say hi",
                                         instructions="Be brief.")
        assert answer.object == "response" and answer.status == "completed"
        assert answer.output_text == "echo: Say hi"
        assert answer.usage.input_tokens == 4 and answer.usage.output_tokens == 3
        again = client.responses.retrieve(answer.id)
        assert again.output_text == answer.output_text and again.id == answer.id
        assert client.responses.delete(answer.id) is None
        with pytest.raises(cometkit.NotFoundError):
            client.responses.retrieve(answer.id)
    first, retrieved, deleted, missing = rows(tmp_path)
    assert (first["operation"], first["route"], first["model"]) == (
        "generate_content", "/responses", "gpt-4o-mini")
    assert (first["input_tokens"], first["output_tokens"]) == ("4", "3")
    assert retrieved["operation"] == deleted["operation"] == missing["operation"] == "responses"
    assert (deleted["method"], missing["status_code"]) == ("DELETE", "404")


def test_output_text_joins_every_output_text_part_and_skips_the_rest():
    from cometkit._routes import Response

    answer = Response({"output": [
        {"type": "reasoning", "content": [{"type": "output_text", "text": "hidden"}]},
        {"type": "message", "content": [{"type": "output_text", "text": "a"},
                                        {"type": "refusal", "refusal": "no"},
                                        {"type": "output_text", "text": "b"}]},
        {"type": "message", "content": [{"type": "output_text", "text": "c"}]}]})
    assert answer.output_text == "abc"
    assert Response({"output": []}).output_text == ""


def test_responses_stream_yields_the_api_events_and_records_usage(cometkit_sandbox, tmp_path):
    with make_client(cometkit_sandbox, tmp_path) as client:
        with client.responses.create(model="gpt-4o-mini", input="one two three",
                                     stream=True) as stream:
            events = list(stream)
        assert isinstance(stream, cometkit.Stream)
    kinds = [event.type for event in events]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == "echo: one two three"
    assert events[-1].response.usage.output_tokens == 5
    (row,) = rows(tmp_path)
    assert (row["operation"], row["input_tokens"], row["output_tokens"]) == (
        "generate_content", "4", "5")
    assert row["response_model"] == "gpt-4o-mini" and row["ttfc_s"] != ""


def test_legacy_completions_whole_and_streamed(cometkit_sandbox, tmp_path):
    with make_client(cometkit_sandbox, tmp_path) as client:
        answer = client.completions.create(model="gpt-3.5-turbo-instruct", prompt="Once",
                                           max_tokens=20)
        assert answer.object == "text_completion"
        assert answer.choices[0].text == "echo: Once"
        chunks = list(client.completions.create(model="gpt-3.5-turbo-instruct", prompt="Once",
                                                stream=True,
                                                stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "echo: Once"
    whole, streamed = rows(tmp_path)
    for row in (whole, streamed):
        assert (row["operation"], row["input_tokens"], row["output_tokens"]) == (
            "text_completion", "1", "3")


def test_anthropic_messages_record_usage_whole_and_streamed(cometkit_sandbox, tmp_path):
    body = {"model": "claude-3-5-haiku", "max_tokens": 100,
            "messages": [{"role": "user", "content": "Hello there"}]}
    with make_client(cometkit_sandbox, tmp_path) as client:
        answer = client.request("POST", "/messages", json=body)
        assert answer.type == "message" and answer.content[0].text == "echo: Hello there"
        events = list(client.request("POST", "/messages", json={**body, "stream": True},
                                     stream=True))
    assert [e.type for e in events][:1] == ["message_start"]
    assert events[-1].type == "message_stop"
    whole, streamed = rows(tmp_path)
    for row in (whole, streamed):
        # input tokens from message_start, output tokens from message_delta
        assert (row["operation"], row["input_tokens"], row["output_tokens"]) == (
            "chat", "3", "5")


def test_moderations_images_and_models_retrieve(cometkit_sandbox, tmp_path):
    with make_client(cometkit_sandbox, tmp_path) as client:
        moderation = client.moderations.create(input=["a nice day", "I will kill it"])
        assert [r.flagged for r in moderation.results] == [False, True]
        assert moderation.results[1].categories["violence"] is True
        b64 = client.images.generate(prompt="a cat", response_format="b64_json", n=2)
        assert [base64.b64decode(d.b64_json) for d in b64.data] == [PNG_BYTES, PNG_BYTES]
        linked = client.images.generate(prompt="a cat", model="dall-e-3")
        url = linked.data[0].url
        assert url.startswith(cometkit_sandbox.base_url[:-3]) and url.endswith(".png")
        model = client.models.retrieve("gpt-4o-mini")
        assert model.id == "gpt-4o-mini" and model.object == "model"
        with pytest.raises(ValueError, match="model"):
            client.models.retrieve("")
    import requests

    assert requests.get(url, timeout=10).content == PNG_BYTES
    operations = [(r["operation"], r["route"], r["model"]) for r in rows(tmp_path)]
    assert operations == [("moderations", "/moderations", ""),
                          ("images", "/images/generations", ""),
                          ("images", "/images/generations", "dall-e-3"),
                          ("models", "/models/gpt-4o-mini", "")]
    assert rows(tmp_path)[0]["response_model"] == "omni-moderation-latest"


def test_speech_is_a_binary_answer_written_to_a_file(cometkit_sandbox, tmp_path):
    with make_client(cometkit_sandbox, tmp_path) as client:
        speech = client.audio.speech.create(model="tts-1", voice="alloy", input="Hello world")
        raw = client.request("POST", "/audio/speech", raw=True,
                             json={"model": "tts-1", "voice": "alloy", "input": "Hello world"})
    assert isinstance(speech, BinaryAnswer) and speech.content_type == "audio/mpeg"
    assert speech.content.startswith(b"ID3") and speech.read() == raw.content
    assert b"".join(speech.iter_bytes(7)) == speech.content
    assert max(len(piece) for piece in speech.iter_bytes(7)) == 7
    target = tmp_path / "out.mp3"
    speech.write_to_file(target)
    assert target.read_bytes() == speech.content
    assert {r["operation"] for r in rows(tmp_path)} == {"audio.speech"}
    with make_client(cometkit_sandbox, tmp_path) as client:
        with pytest.raises(ValueError, match="raw=True"):
            client.request("POST", "/audio/speech", json={}, raw=True, stream=True)


def test_transcription_is_a_multipart_upload(cometkit_sandbox, tmp_path):
    audio = tmp_path / "clip.wav"
    audio.write_bytes(b"RIFF" + bytes(996))
    with make_client(cometkit_sandbox, tmp_path) as client:
        with audio.open("rb") as handle:
            answer = client.audio.transcriptions.create(model="whisper-1", file=handle)
        assert answer.text == "sandbox transcript of clip.wav: 1000 bytes"
        text = client.audio.transcriptions.create(model="whisper-1", response_format="text",
                                                  file=("other.mp3", b"12345"))
        assert text == "sandbox transcript of other.mp3: 5 bytes"
        with pytest.raises(TypeError, match="text mode"):
            with audio.open("r") as handle:
                client.audio.transcriptions.create(model="whisper-1", file=handle)
        with pytest.raises(TypeError, match="files="):
            client.request("POST", "/audio/transcriptions", data={"model": "whisper-1"})
    first, second = rows(tmp_path)
    assert (first["operation"], first["model"], first["input_tokens"]) == (
        "audio.transcriptions", "whisper-1", "10")
    assert second["operation"] == "audio.transcriptions"


def test_a_429_on_a_new_route_is_retried_and_the_upload_resent(cometkit_sandbox_factory,
                                                                tmp_path):
    clock = FakeClock()  # shared: the client's back-off sleep refills the sandbox's bucket
    sandbox = cometkit_sandbox_factory(rpm=60, burst=1, clock=clock)
    config = {"plugins": {"limiter": False, "backoff": {"max_attempts": 5},
                          "csv_metrics": {"path": str(tmp_path / "attempts.csv")}}}
    with Client(api_key="sk-test", base_url=sandbox.base_url, config=config,
                clock=clock) as client:
        first = client.audio.transcriptions.create(model="whisper-1", file=("a.wav", b"x" * 300))
        again = client.audio.transcriptions.create(model="whisper-1", file=("a.wav", b"x" * 300))
    assert first.text == again.text == "sandbox transcript of a.wav: 300 bytes"
    assert [r["outcome"] for r in rows(tmp_path)] == ["ok", "retry", "ok"]
    assert [r["status_code"] for r in rows(tmp_path)] == ["200", "429", "200"]
    assert clock.sleeps and sandbox.stats()["rate_limited"]["requests"] == 1


def test_the_limiter_admits_every_new_route(cometkit_sandbox_factory, tmp_path):
    sandbox = cometkit_sandbox_factory(max_in_flight=2, latency_s=0.05)
    plugins = {"limiter": {"max_concurrency": 2}}
    with make_client(sandbox, tmp_path, **plugins) as client:
        calls = [lambda: client.responses.create(model="m", input="x"),
                 lambda: client.moderations.create(input="x", model="m"),
                 lambda: client.images.generate(prompt="x", model="m"),
                 lambda: client.completions.create(model="m", prompt="x"),
                 lambda: client.audio.speech.create(model="m", voice="v", input="x")] * 3
        results = list(client.map(lambda call: call(), calls))
    assert len(results) == 15
    assert sandbox.stats()["rate_limited"].get("in_flight", 0) == 0
    assert sandbox.stats()["max_in_flight_seen"] <= 2
    assert all(r["outcome"] == "ok" for r in rows(tmp_path))


def test_files_and_batches_round_trip(cometkit_sandbox, tmp_path):
    lines = [{"custom_id": f"q{i}", "method": "POST", "url": "/v1/responses",
              "body": {"model": "gpt-4o-mini", "input": f"question {i}"}} for i in range(3)]
    source = tmp_path / "batch.jsonl"
    source.write_text("".join(json.dumps(line) + "\n" for line in lines))
    with make_client(cometkit_sandbox, tmp_path) as client:
        uploaded = client.files.create(file=source, purpose="batch")
        assert (uploaded.object, uploaded.filename, uploaded.bytes) == (
            "file", "batch.jsonl", source.stat().st_size)
        assert client.files.content(uploaded.id).content == source.read_bytes()
        with pytest.raises(cometkit.NotFoundError, match="file-missing"):
            client.files.content("file-missing")  # a raw answer's error status is typed too
        with pytest.raises(cometkit.BadRequestError, match="endpoint"):
            client.batches.create(input_file_id=uploaded.id, endpoint="/v1/audio/speech")
        batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/responses")
        other = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/responses")
        assert batch.status == "in_progress" and batch.request_counts.total == 3
        assert client.batches.cancel(other.id).status == "cancelled"
        done = client.batches.retrieve(batch.id)
        assert done.status == "completed" and done.request_counts.completed == 3
        output = client.files.content(done.output_file_id)
        with pytest.raises(cometkit.APIStatusError) as refused:
            client.batches.cancel(batch.id)
        page = client.batches.list(limit=1)
        rest = client.batches.list(after=page.data[0].id)
    assert refused.value.status_code == 409
    answers = [json.loads(line) for line in output.content.splitlines()]
    assert [a["custom_id"] for a in answers] == ["q0", "q1", "q2"]
    assert answers[2]["response"]["body"]["output"][0]["content"][0]["text"] == \
        "echo: question 2"
    assert [b.id for b in page.data] == [other.id] and page.has_more is True
    assert [b.id for b in rest.data] == [batch.id] and rest.has_more is False
    assert {r["operation"] for r in rows(tmp_path)} == {"files", "batches"}


def test_route_ids_are_checked_before_sending(cometkit_sandbox, tmp_path):
    with make_client(cometkit_sandbox, tmp_path) as client:
        for call in (lambda: client.responses.retrieve(""),
                     lambda: client.batches.retrieve(None),
                     lambda: client.files.content("")):
            with pytest.raises(ValueError, match="non-empty"):
                call()
    assert cometkit_sandbox.stats()["attempts"] == 0


@pytest.mark.parametrize("failure, message", [
    ({"type": "error", "code": "server_error", "message": "boom", "sequence_number": 2},
     "boom"),
    ({"type": "response.failed", "sequence_number": 2,
      "response": {"id": "resp_1", "error": {"code": "server_error", "message": "gone"}}},
     "gone"),
])
def test_a_responses_stream_ending_in_an_error_event_raises_it(failure, message, tmp_path):
    created = {"type": "response.created", "sequence_number": 0,
               "response": {"id": "resp_1", "model": "m1", "error": None, "usage": None}}
    delta = {"type": "response.output_text.delta", "delta": "he", "sequence_number": 1}
    events = [json.dumps(created), json.dumps(delta), json.dumps(failure)]
    with ScriptedServer(lambda seen: Reply(200, events=events)) as srv:
        config = {"plugins": {"limiter": False, "backoff": False,
                              "csv_metrics": {"path": str(tmp_path / "attempts.csv")}}}
        with Client(api_key="sk-test", base_url=srv.base_url, config=config) as client:
            stream = client.responses.create(model="m1", input="x", stream=True)
            seen = []
            with pytest.raises(cometkit.APIError, match=message) as raised:
                for event in stream:
                    seen.append(event.type)
    assert seen == ["response.created", "response.output_text.delta"]
    assert raised.value.code == "server_error"
    (row,) = rows(tmp_path)
    assert (row["outcome"], row["response_model"]) == ("error", "m1")


def test_a_whole_response_to_a_stream_request_is_no_error(tmp_path):
    """A Responses API object carries ``"error": null``: answered whole to ``stream=True``,
    it is the stream's one event, not a failure."""
    body = {"id": "resp_1", "object": "response", "model": "m1", "error": None,
            "output": [], "usage": {"input_tokens": 2, "output_tokens": 1}}
    with ScriptedServer(lambda seen: json_reply(200, body)) as srv:
        with Client(api_key="sk-test", base_url=srv.base_url,
                    config={"plugins": {"limiter": False}}) as client:
            events = list(client.responses.create(model="m1", input="x", stream=True))
    assert [event.id for event in events] == ["resp_1"]


def test_an_upload_through_the_requests_adapter_records_its_model_and_operation(
        cometkit_sandbox, tmp_path):
    import requests

    from cometkit.adapters import CometAdapter

    config = {"plugins": {"csv_metrics": {"path": str(tmp_path / "attempts.csv")}}}
    adapter = CometAdapter.from_config(config, base_url=cometkit_sandbox.base_url)
    with requests.Session() as session:
        session.mount(cometkit_sandbox.base_url, adapter)
        answer = session.post(cometkit_sandbox.base_url + "/audio/transcriptions",
                              files={"file": ("a.wav", b"x" * 100)},
                              data={"model": "whisper-1"}, timeout=10)
    adapter.close()
    assert answer.json()["text"] == "sandbox transcript of a.wav: 100 bytes"
    (row,) = rows(tmp_path)
    assert (row["operation"], row["model"], row["input_tokens"]) == (
        "audio.transcriptions", "whisper-1", "1")


def test_every_route_takes_the_per_call_options_of_create():
    """``extra_body`` merged into the body, ``extra_query`` into the query, ``extra_headers``
    sent, ``priority`` checked against the client's lanes, and ``with_raw_response``."""

    def handler(seen):
        return json_reply(200, {"id": "modr-1", "results": [{"flagged": False}]},
                          **{"x-ratelimit-remaining-requests": "41"})

    with ScriptedServer(handler) as server, cometkit.Client(
            "sk-test-routes-options", server.base_url, config={"plugins": {}}) as client:
        answer = client.moderations.create(
            input="hi", extra_body={"provider_field": 1}, extra_query={"region": "eu"},
            extra_headers={"X-Trace": "t1"}, priority="interactive")
        assert answer.results[0].flagged is False
        raw = client.moderations.with_raw_response.create(input="hi")
        assert raw.headers["x-ratelimit-remaining-requests"] == "41"
        assert raw.parse().id == "modr-1"
        with pytest.raises(cometkit.ConfigError):
            client.moderations.create(input="hi", priority="urgent")
        with pytest.raises(TypeError, match="extra_body must be a mapping"):
            client.moderations.create(input="hi", extra_body=["provider_field"])
        assert server.count == 2  # neither refusal sent anything
        seen = server.seen[0]
    assert seen.json() == {"input": "hi", "provider_field": 1}
    assert seen.path.endswith("/moderations?region=eu")
    assert seen.headers.get("X-Trace") == "t1"

