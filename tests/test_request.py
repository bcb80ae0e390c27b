import pytest

from beam_caption import DEFAULT_SYSTEM_PROMPT
from beam_caption.core.errors import CaptionError
from beam_caption.core.request import (
    PromptSettings,
    RequestPlan,
    build_messages,
    image_paths,
    prompt_turns,
)

SETTINGS = PromptSettings(system_prompt=DEFAULT_SYSTEM_PROMPT)


def plan_request(record: dict, settings: PromptSettings) -> RequestPlan:
    """What the engine plans for a record asked the flags' prompt."""
    return RequestPlan(image_paths(record, settings.image_key), prompt_turns(record, settings))


def seed_record(**extra):
    record = {"image": ["./data/person.png"],
              "conversation": [{"from": "human",
                                "value": "Generate detailed captions based on image content."}]}
    record.update(extra)
    return record


def test_seed_record_becomes_system_then_user_with_image_first():
    plan = plan_request(seed_record(), SETTINGS)
    assert plan.image_paths == ("./data/person.png",)
    messages = build_messages(plan, ["data:image/jpeg;base64,AAA"], SETTINGS.system_prompt)
    assert messages == [
        {"role": "system", "content": DEFAULT_SYSTEM_PROMPT},
        {"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,AAA"}},
            {"type": "text", "text": "Generate detailed captions based on image content."}]},
    ]


def test_image_string_and_multiple_images_all_go_in_one_request():
    assert plan_request(seed_record(image="a.png"), SETTINGS).image_paths == ("a.png",)
    plan = plan_request(seed_record(image=["a.png", "b.png"]), SETTINGS)
    messages = build_messages(plan, ["u1", "u2"], None)
    assert [p["image_url"]["url"] for p in messages[0]["content"][:2]] == ["u1", "u2"]
    assert messages[0]["role"] == "user"  # no system prompt when none is set


def test_multi_turn_maps_roles_and_drops_the_answer_turn():
    record = seed_record(conversation=[
        {"from": "human", "value": "<image>\nWhat is this?"},
        {"from": "gpt", "value": "A dog."},
        {"from": "human", "value": "Describe it in detail."},
        {"from": "gpt", "value": "old answer to replace"},
    ])
    messages = build_messages(plan_request(record, SETTINGS), ["u"], "sys")
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert messages[1]["content"][-1] == {"type": "text", "text": "What is this?"}
    assert messages[3]["content"] == "Describe it in detail."


def test_prompt_flag_replaces_the_conversation():
    settings = PromptSettings(system_prompt="s", prompt="Alt text, please.")
    record = {"image": "a.png"}
    messages = build_messages(plan_request(record, settings), ["u"], settings.system_prompt)
    assert messages[1]["content"][-1]["text"] == "Alt text, please."


def test_record_system_turn_overrides_default_system_prompt():
    record = seed_record(conversation=[{"from": "system", "value": "custom"},
                                       {"from": "human", "value": "q"}])
    messages = build_messages(plan_request(record, SETTINGS), ["u"], SETTINGS.system_prompt)
    assert messages[0] == {"role": "system", "content": "custom"}
    assert len(messages) == 2


def test_custom_keys():
    settings = PromptSettings(system_prompt=None, image_key="img", conversation_key="conv")
    plan = plan_request({"img": "x.png", "conv": [{"from": "human", "value": "hi"}]}, settings)
    assert plan.image_paths == ("x.png",) and plan.turns == (("user", "hi"),)


@pytest.mark.parametrize("record, error_type", [
    ({"conversation": []}, "missing_image_key"),
    ({"image": [], "conversation": [{"from": "human", "value": "q"}]}, "no_images"),
    ({"image": [""], "conversation": [{"from": "human", "value": "q"}]}, "empty_image_path"),
    ({"image": 3, "conversation": [{"from": "human", "value": "q"}]}, "bad_image_field"),
    ({"image": "a.png"}, "no_prompt"),
    ({"image": "a.png", "conversation": [{"from": "gpt", "value": "a"}]}, "no_prompt"),
    ({"image": "a.png", "conversation": [{"from": "robot", "value": "a"}]}, "bad_conversation"),
    ({"image": "a.png", "conversation": ["text"]}, "bad_conversation"),
])
def test_bad_records_fail_at_read_stage(record, error_type):
    with pytest.raises(CaptionError) as info:
        plan_request(record, SETTINGS)
    assert info.value.stage == "read" and info.value.type == error_type


def test_image_detail_goes_with_every_image_and_changes_the_fingerprint():
    from beam_caption.core.client import ClientSettings
    from beam_caption.core.engine import WorkerConfig
    from beam_caption.core.images import ImageSettings

    plan = plan_request({"image": ["a.png", "b.png"], "conversation": [
        {"from": "human", "value": "q"}]}, PromptSettings(system_prompt=None))
    parts = build_messages(plan, ["data:a", "data:b"], None, "low")[0]["content"]
    assert [p["image_url"] for p in parts[:2]] == [{"url": "data:a", "detail": "low"},
                                                   {"url": "data:b", "detail": "low"}]
    assert "detail" not in build_messages(plan, ["data:a"], None)[0]["content"][0]["image_url"]

    def digest(detail):
        return WorkerConfig(ClientSettings(api_url="http://h/v1", model="m"),
                             PromptSettings(system_prompt=None, image_detail=detail),
                             ImageSettings(), image_root="/").settings_digest
    assert digest("low") != digest(None) != digest("high")  # --resume tells them apart
