"""Answer objects round-trip as the openai SDK's do: dumped, pickled, copied, sent back in a
request, paged; method-like names that are no field raise; children are wrapped once."""

from __future__ import annotations

import copy
import json
import multiprocessing
import pickle
import threading
from concurrent.futures import ProcessPoolExecutor

import pytest
from scripted_server import ScriptedServer, chat_body, json_reply

import cometkit
from cometkit import ApiObject, ListObject

KEY = "sk-test-objects"
ANSWER = {
    "id": "chatcmpl-1", "object": "chat.completion", "model": "m1",
    "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                 "message": {"role": "assistant", "content": "héllo", "refusal": None}}],
    "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
}
WITHOUT_NONE = {
    "id": "chatcmpl-1", "object": "chat.completion", "model": "m1",
    "choices": [{"index": 0, "finish_reason": "stop",
                 "message": {"role": "assistant", "content": "héllo"}}],
    "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
}


@pytest.fixture
def no_plugins(monkeypatch):
    monkeypatch.setenv("COMETKIT_LOAD_PLUGINS", "")


def answer() -> ApiObject:
    return ApiObject(copy.deepcopy(ANSWER), "req-9")


# -- dumping --------------------------------------------------------------------------------


def test_model_dump_gives_a_new_dict_of_the_json():
    obj = answer()
    dumped = obj.model_dump()
    assert dumped == ANSWER and type(dumped) is dict
    dumped["choices"][0]["message"]["content"] = "changed"
    assert obj.choices[0].message.content == "héllo"  # a copy, not the answer itself
    assert obj.model_dump(mode="json") == ANSWER
    assert obj.model_dump(exclude_unset=True) == ANSWER  # every field present was sent


def test_exclude_none_drops_nulls_at_every_depth():
    assert answer().model_dump(exclude_none=True) == WITHOUT_NONE
    assert answer().to_dict(exclude_none=True) == WITHOUT_NONE


def test_include_and_exclude_pick_top_level_fields():
    assert answer().model_dump(include={"id", "model"}) == {"id": "chatcmpl-1", "model": "m1"}
    assert set(answer().model_dump(exclude={"choices", "usage"})) == {"id", "object", "model"}


@pytest.mark.parametrize("kwargs,error", [
    ({"mode": "yaml"}, ValueError), ({"include": "id"}, TypeError),
    ({"exclude": {"choices": {0}}}, TypeError), ({"round_robin": True}, TypeError),
])
def test_a_dump_keyword_it_cannot_honour_is_refused(kwargs, error):
    with pytest.raises(error):
        answer().model_dump(**kwargs)


def test_model_dump_json_is_compact_or_indented_like_pydantic():
    obj = answer()
    assert obj.model_dump_json() == json.dumps(ANSWER, ensure_ascii=False,
                                               separators=(",", ":"))
    assert obj.model_dump_json(indent=2) == json.dumps(ANSWER, ensure_ascii=False, indent=2)
    assert json.loads(obj.model_dump_json(exclude_none=True)) == WITHOUT_NONE


def test_to_json_indents_by_two_and_to_dict_copies():
    obj = answer()
    assert obj.to_json() == json.dumps(ANSWER, ensure_ascii=False, indent=2)
    assert obj.to_json(indent=None) == obj.model_dump_json()
    assert obj.to_dict() == ANSWER and obj.to_dict() is not obj._data


# -- pickling and copying -------------------------------------------------------------------


@pytest.mark.parametrize("clone", [
    lambda o: pickle.loads(pickle.dumps(o)), copy.copy, copy.deepcopy,
])
def test_pickle_copy_and_deepcopy_keep_json_and_request_id(clone):
    obj = answer()
    assert obj.choices[0].message.role == "assistant"  # a filled cache travels fine
    twin = clone(obj)
    assert type(twin) is ApiObject
    assert twin == obj and twin._request_id == "req-9"
    assert twin.choices[0].message.content == "héllo"


def _read_in_another_process(obj: ApiObject) -> tuple:
    return obj.choices[0].message.content, obj._request_id, obj


@pytest.mark.timeout(120)
def test_an_answer_crosses_a_process_pool_both_ways(cometkit_sandbox, no_plugins):
    with cometkit.Client(KEY, cometkit_sandbox.base_url) as client:
        completion = client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "over there"}])
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=spawn) as pool:
        content, request_id, back = pool.submit(_read_in_another_process, completion).result(
            timeout=90)
    assert content == "echo: over there"
    assert request_id == completion._request_id and request_id.startswith("req_sandbox_")
    assert back == completion and back._request_id == request_id


# -- sent back in a request -------------------------------------------------------------------


def test_an_answer_message_put_back_into_messages_is_sent_as_its_json(no_plugins):
    with ScriptedServer(lambda seen: json_reply(200, chat_body())) as srv, \
            cometkit.Client(KEY, srv.base_url) as client:
        messages = [{"role": "user", "content": "hello"}]
        first = client.chat.completions.create(model="m1", messages=messages)
        messages.append(first.choices[0].message)
        messages.append({"role": "user", "content": "and?"})
        client.chat.completions.create(model="m1", messages=messages)
        client.request("POST", "/things", json={"items": first.choices})
    sent = srv.seen[1].json()["messages"]
    assert sent[1] == chat_body()["choices"][0]["message"]
    assert srv.seen[2].json() == {"items": chat_body()["choices"]}


def test_a_value_json_cannot_encode_is_still_refused(no_plugins):
    with ScriptedServer() as srv, cometkit.Client(KEY, srv.base_url) as client:
        with pytest.raises(TypeError, match="not JSON serializable"):
            client.chat.completions.create(model="m1", messages=[{"content": object()}])
    assert srv.count == 0


# -- attribute access -------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["model_fields", "model_validate", "to_pandas",
                                  "with_raw_response", "parse", "_private", "model_extra"])
def test_method_like_names_that_are_no_field_raise_attribute_error(name):
    obj = answer()
    with pytest.raises(AttributeError, match=name):
        getattr(obj, name)
    assert not hasattr(obj, name)


def test_a_real_field_with_a_method_like_name_still_reads():
    obj = ApiObject({"parse": "yes", "model_name": "m", "to_address": None})
    assert obj.parse == "yes" and obj.model_name == "m" and obj.to_address is None


def test_an_absent_optional_field_still_reads_none():
    assert answer().system_fingerprint is None
    assert answer().choices[0].message.tool_calls is None


def test_children_are_wrapped_once():
    obj = answer()
    assert obj.choices is obj.choices
    assert obj.choices[0].message is obj.choices[0].message
    assert obj["usage"] is obj.usage is obj.get("usage")
    assert obj.get("absent", 7) == 7


def test_threads_racing_for_a_child_all_get_the_same_wrapper():
    obj = answer()
    barrier = threading.Barrier(8)
    seen: list = []

    def read() -> None:
        barrier.wait(timeout=10)
        seen.append(obj.choices)

    threads = [threading.Thread(target=read) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert len(seen) == 8 and all(child is seen[0] for child in seen)


# -- list answers -----------------------------------------------------------------------------


def test_a_list_answer_iterates_its_items(cometkit_sandbox, no_plugins):
    with cometkit.Client(KEY, cometkit_sandbox.base_url) as client:
        models = client.models.list()
    assert isinstance(models, ListObject)
    ids = [model.id for model in models]
    assert ids == list(cometkit_sandbox.models) and len(models) == len(ids)
    assert models[0].id == ids[0] and models["object"] == "list"
    assert models.has_more is False
    assert [model.id for model in models.auto_paging_iter()] == ids
    assert pickle.loads(pickle.dumps(models)) == models


def _pages(seen):
    after = seen.path.partition("after=")[2]
    if not after:
        return json_reply(200, {"object": "list", "has_more": True,
                                "data": [{"id": "a", "object": "batch"},
                                         {"id": "b", "object": "batch"}]})
    return json_reply(200, {"object": "list", "has_more": False,
                            "data": [{"id": f"after-{after}", "object": "batch"}]})


def test_auto_paging_iter_follows_the_after_cursor(no_plugins):
    with ScriptedServer(_pages) as srv, cometkit.Client(KEY, srv.base_url) as client:
        page = client.request("GET", "/batches", params={"limit": 2})
        assert page.has_more is True and len(page) == 2
        assert [item.id for item in page.auto_paging_iter()] == ["a", "b", "after-b"]
    assert [seen.path for seen in srv.seen] == ["/v1/batches?limit=2",
                                                "/v1/batches?limit=2&after=b"]


def test_a_server_that_repeats_its_page_stops_the_paging(no_plugins):
    page = {"object": "list", "has_more": True, "data": [{"id": "a"}]}
    with ScriptedServer(lambda seen: json_reply(200, page)) as srv, \
            cometkit.Client(KEY, srv.base_url) as client:
        with pytest.raises(cometkit.APIError, match="same page again"):
            list(client.request("GET", "/batches").auto_paging_iter())
    assert srv.count == 2
