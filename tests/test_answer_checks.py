"""Answer checks (core/answer_checks.py): loops, refusals written as text and short answers are
retried, then typed failures, never captions; online and in batch mode, through the real CLI."""

from __future__ import annotations

import asyncio
import glob
import json

import pytest
from aiohttp import web
from conftest import TEST_RUNNER, run_cli
from test_client import RED_PNG, completion_body, messages
from test_fake_vlm import RED, chat, chat_body, data_url

import beam_caption as bc
from beam_caption.core.answer_checks import (
    CHECKS,
    MAX_PHRASES_FILE_BYTES,
    REFUSAL_PHRASES_BY_LANGUAGE,
    TAIL_CHARS,
    AnswerChecks,
    load_refusal_phrases,
    parse_checks,
)
from beam_caption.core.client import ClientSettings, VLMClient, nudged, request_body
from beam_caption.core.errors import CaptionError, UsageError
from beam_caption.core.structured import answer_checker
from beam_caption.testing import FakeVLMConfig, FakeVLMServer
from beam_caption.testing.fake_vlm import (
    LOOP_CHARS,
    LOOP_PHRASE,
    SHORT_ANSWER,
    TEXT_REFUSAL,
    _config_from_args,
    _parse_args,
)

ORDINARY = [
    "A dog.",
    "3", "No", "猫",
    "A brown dog runs across a green field, chasing a red ball.",
    "Two people sitting on a bench in a park. One person is reading a book while the other "
    "person is looking at a phone. Behind them, there are tall trees and a small pond.",
    "The image shows a busy city street at dusk. On the left side of the image, a row of shops "
    "with lit windows lines the sidewalk; on the right side of the image, cars wait at a red "
    "traffic light. In the background, tall buildings rise against an orange sky, and in the "
    "foreground a cyclist in a yellow jacket crosses the street. The image has a warm tone, and "
    "the lights of the shops reflect on the wet pavement. On the left side of the image, a "
    "woman with an umbrella walks a small white dog, and on the right side of the image a bus "
    "stop sign stands next to a bench.",
    "Objects: dog, cat, tree, car, bicycle, bench, lamp post, fence, house, cloud, sun, bird",
    "- a red apple\n- a green apple\n- a yellow banana\n- a bunch of purple grapes\n- a sliced "
    "orange\n- a ripe pear\n- a small lemon\n- a bowl of cherries\n- a pineapple",
    "1. A man wearing a blue shirt and black pants. 2. A woman wearing a red dress and black "
    "shoes. 3. A child wearing a yellow shirt and black pants. 4. An old man wearing a grey coat "
    "and black pants. 5. A girl wearing a white shirt and black pants.",
    " ".join(f"There is a {thing} on the kitchen table." for thing in (
        "cup", "plate", "fork", "knife", "napkin", "glass", "bowl", "spoon", "jar", "bottle",
        "pan", "pot", "kettle", "mug", "tray", "vase", "candle", "book", "phone", "key")),
    "The photo shows a kitchen. The kitchen has white cabinets. The kitchen has a wooden floor. "
    "The kitchen has a large window. The kitchen has a steel fridge. The kitchen has a stove.",
    "A sign saying \"Sorry, we can't open today\" hangs on the door of a bakery.",
    "I can see a dog lying on a sofa next to a sleeping cat.",
    "Ein brauner Hund läuft über eine grüne Wiese und jagt einen roten Ball. Im Hintergrund "
    "stehen hohe Bäume.",
    "Un chien brun court dans un champ vert en poursuivant une balle rouge. À l'arrière-plan, "
    "on voit de grands arbres.",
    "Un perro marrón corre por un campo verde persiguiendo una pelota roja.",
    "Um cão castanho corre por um campo verde atrás de uma bola vermelha.",
    "Un cane marrone corre in un prato verde inseguendo una palla rossa.",
    "一只棕色的狗在绿色的草地上奔跑，追逐一个红色的球。背景中有高大的树木和一个小池塘，池塘里有几只鸭子在游泳。",
    "茶色の犬が緑の野原を走り、赤いボールを追いかけています。背景には高い木々と小さな池があります。",
    "갈색 개가 빨간 공을 쫓아 푸른 들판을 달리고 있습니다. "
    "배경에는 키 큰 나무들과 작은 연못이 있습니다.",
    "Бурая собака бежит по зелёному полю за красным мячом. На заднем плане высокие деревья.",
    "สุนัขสีน้ำตาลวิ่งข้ามทุ่งหญ้าสีเขียวไล่ตามลูกบอลสีแดง ด้านหลังมีต้นไม้สูงและสระน้ำเล็กๆ",
    "A fake caption: square image, colour #ff0000" + "." * 30_000,  # padding is no loop
]
LOOPS = [
    "A photo of a wall" + " and a wall" * 180,
    "A living room with a sofa, a coffee table and a lamp. " + "The sofa is red. " * 60,
    "wall " * 300,
    "wallwallwallwall" * 100,
    "The image shows " + "a cat, a cat, a cat, " * 50,
    "Ein Hund und ein Hund" + " und ein Hund" * 100,
    "一面墙" + "和一面墙" * 200,
    "一面墙，" * 200,
    "壁と" * 300,
]
REFUSALS = {
    "en": ["I'm sorry, but I can't help with describing this image.",
           "I’M SORRY, BUT I CAN’T assist with that.", "**I cannot help with this request.**",
           "Sorry, I can't describe people.", "I apologize, but I cannot provide that."],
    "zh": ["抱歉，我无法描述这张图片。", "很抱歉，我無法提供這張圖片的描述。"],
    "ja": ["申し訳ありませんが、この画像については説明できません。"],
    "ko": ["죄송하지만 이 이미지에 대해서는 설명할 수 없습니다."],
    "es": ["Lo siento, pero no puedo ayudar con esta imagen."],
    "fr": ["Je suis désolé, mais je ne peux pas décrire cette image."],
    "de": ["Es tut mir leid, aber ich kann dieses Bild nicht beschreiben."],
    "pt": ["Desculpe, mas não posso descrever esta imagem."],
    "it": ["Mi dispiace, ma non posso descrivere questa immagine."],
    "ru": ["Извините, но я не могу описать это изображение."],
}


def failed(check: AnswerChecks, text: str) -> CaptionError:
    with pytest.raises(CaptionError) as info:
        check.check(text)
    assert info.value.stage == "response" and info.value.retryable
    return info.value


@pytest.mark.parametrize("caption", ORDINARY, ids=range(len(ORDINARY)))
def test_ordinary_captions_lists_and_short_answers_pass_every_check(caption):
    assert AnswerChecks().check(caption) == caption
    assert AnswerChecks(min_chars=6).check("A dog.") == "A dog."


@pytest.mark.parametrize("loop", LOOPS, ids=range(len(LOOPS)))
def test_a_repetition_loop_is_degenerate_with_the_answers_start_in_the_message(loop):
    error = failed(AnswerChecks(), loop)
    assert error.type == "degenerate" and "repetition loop" in error.message
    start = " ".join(loop[:200].split())
    assert f'"{start}..."' in error.message and len(error.message) < 400
    assert AnswerChecks(frozenset({"refusal", "short"})).check(loop) == loop  # switched off


def test_a_long_answer_is_judged_by_its_end_where_loops_run():
    detailed = " ".join(ORDINARY[4:16])
    assert len(detailed) > TAIL_CHARS
    assert AnswerChecks().check(detailed) == detailed
    error = failed(AnswerChecks(), detailed + " And a wall" * 120)
    assert error.type == "degenerate" and detailed[:100] in error.message


@pytest.mark.parametrize("language", sorted(REFUSALS))
def test_a_refusal_in_each_language_is_typed_refusal(language):
    assert language in REFUSAL_PHRASES_BY_LANGUAGE
    for refusal in REFUSALS[language]:
        error = failed(AnswerChecks(), refusal)
        assert error.type == "refusal" and refusal[:20] in error.message
        assert AnswerChecks(frozenset({"repetition"})).check(refusal) == refusal


def test_an_answer_under_min_caption_chars_is_too_short_only_when_asked():
    error = failed(AnswerChecks(min_chars=10), "Red.")
    assert error.type == "too_short" and "--min_caption_chars 10" in error.message
    assert AnswerChecks().check("Red.") == "Red."  # the default floor, 0, fails nothing
    assert AnswerChecks(frozenset({"repetition"}), min_chars=10).check("Red.") == "Red."
    for wrong in ("5", -1, True, 2.5):  # a library user's value: refused once, not per answer
        with pytest.raises(UsageError, match="min_caption_chars must be an integer >= 0"):
            AnswerChecks.from_settings("short", wrong, None)  # type: ignore[arg-type]


def test_answer_checks_names_checks_or_none():
    assert parse_checks("repetition, refusal") == {"repetition", "refusal"}
    assert parse_checks(",".join(CHECKS)) == set(CHECKS)
    assert parse_checks("none") == frozenset()
    assert AnswerChecks(parse_checks("none")).checker() is None
    for wrong in ("loops", "none,refusal", ""):
        with pytest.raises(UsageError, match="repetition, refusal, short, or none"):
            parse_checks(wrong)
    with pytest.raises(UsageError, match="answer_checks"):
        bc.CaptionConfig(api_url="http://h/v1", model="m", answer_checks="loops")


def test_a_refusal_phrases_file_replaces_the_list(tmp_path):
    phrases = tmp_path / "phrases.txt"
    phrases.write_text("# ours\n\nNope, not this one\n  I’d rather NOT  \n", encoding="utf-8")
    assert load_refusal_phrases(str(phrases)) == ("nope not this one", "i'd rather not")
    config = bc.CaptionConfig(api_url="http://h/v1", model="m",
                              refusal_phrases_file=str(phrases)).worker_config()
    checks = config.answer_checks
    assert failed(checks, "I'd rather not, thanks.").type == "refusal"
    assert checks.check(REFUSALS["en"][0]) == REFUSALS["en"][0]  # the built-ins are replaced


@pytest.mark.parametrize("content, problem", [
    (b"# only a comment\n\n", "holds no phrase"),
    (b"...\n", "no letter or digit"),
    (b"\xff\xfe sorry", "cannot read it"),
    (b"x" * (MAX_PHRASES_FILE_BYTES + 1), f"longer than {MAX_PHRASES_FILE_BYTES} bytes"),
    (("y" * 201).encode(), "over 200 characters"),
    ("".join(f"phrase {i}\n" for i in range(1001)).encode(), "1001 phrases, over 1000"),
])
def test_a_refusal_phrases_file_that_cannot_be_used_is_refused_at_launch(tmp_path, content,
                                                                        problem):
    phrases = tmp_path / "phrases.txt"
    phrases.write_bytes(content)
    with pytest.raises(UsageError, match=problem) as info:
        bc.CaptionConfig(api_url="http://h/v1", model="m",
                         refusal_phrases_file=str(phrases)).worker_config()
    assert str(phrases) in str(info.value)
    with pytest.raises(UsageError, match="cannot read it"):
        load_refusal_phrases(str(tmp_path / "missing.txt"))


def test_a_json_answer_is_checked_by_its_schema_not_as_text():
    text_check = AnswerChecks().check
    assert answer_checker(False, None, text_check) is text_check
    schema_check = answer_checker(True, {"type": "object"}, text_check)
    loop = json.dumps({"caption": LOOPS[0]})
    assert schema_check is not None and schema_check(loop) == {"caption": LOOPS[0]}


def test_a_retry_after_a_refused_answer_asks_with_another_seed_and_a_warmer_temperature():
    params = {"max_completion_tokens": 64, "temperature": 0.0}
    body = request_body(ClientSettings(api_url="u", model="m"), messages(), params)
    assert nudged(body, params, "m", 0) == (body, params)
    again, changed = nudged(body, params, "m", 2)
    assert changed == {"max_completion_tokens": 64, "temperature": 0.4, "seed": 2}
    assert json.loads(again) == {"model": "m", **changed, "messages": messages()}
    assert nudged(body, {"temperature": 1.5}, "m", 1)[1] == {"temperature": 1.5, "seed": 1}


def test_the_client_retries_a_refused_answer_with_a_new_seed_and_counts_it():
    """Against a server that loops on its first answer and refuses ``seed`` once: the retry
    drops it for the run (AcceptedParams) and the answer is kept on the third attempt."""
    bodies: list[dict] = []

    async def answer(request: web.Request) -> web.Response:
        body = await request.json()
        bodies.append(body)
        if "seed" in body:
            return web.json_response({"error": {"message": "Unrecognized request argument "
                                                 "supplied: seed", "param": "seed"}},
                                     status=400)
        content = LOOPS[0] if len(bodies) == 1 else "A red square."
        return web.Response(body=completion_body(content), content_type="application/json")

    async def go() -> object:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", answer)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        settings = ClientSettings(api_url=f"http://127.0.0.1:{port}/v1", model="m",
                                  temperature=0.5, initial_backoff=0.01)
        client = VLMClient(settings, api_key=None, seed=0)
        try:
            return await client.complete(request_body(settings, messages()),
                                         check=AnswerChecks().check)
        finally:
            await client.aclose()
            await runner.cleanup()

    result = asyncio.run(go())
    assert result.caption == "A red square." and result.attempts == 3
    assert result.rejected_answers == ("degenerate",)
    assert [(b.get("seed"), b["temperature"]) for b in bodies] == [(None, 0.5), (1, 0.7),
                                                                   (None, 0.7)]
    assert all(b["messages"][0]["content"][0]["image_url"]["url"] == RED_PNG for b in bodies)


def answer(server: FakeVLMServer, prompt: str = "Describe this image.", **extra) -> dict:
    status, _, raw = chat(server, chat_body(data_url(RED), prompt=prompt, **extra))
    assert status == 200
    return json.loads(raw)["choices"][0]


def test_the_fake_server_answers_a_loop_a_text_refusal_or_a_short_answer_by_marker():
    with FakeVLMServer() as server:
        caption = answer(server)["message"]["content"]
        loop, refusal, short = (answer(server, f"Describe it. {marker}")
                                for marker in ("LOOP_ME", "REFUSE_IN_TEXT", "ANSWER_SHORT"))
        stats = server.stats()
    assert loop["finish_reason"] == "stop" and loop["message"]["refusal"] is None
    assert loop["message"]["content"].startswith(caption + LOOP_PHRASE * 3)
    assert LOOP_CHARS - len(LOOP_PHRASE) < len(loop["message"]["content"]) <= LOOP_CHARS
    assert refusal["message"] == {"role": "assistant", "content": TEXT_REFUSAL,
                                  "refusal": None}
    assert short["message"]["content"] == SHORT_ANSWER
    assert stats["faults"] == {"loop": 1, "text_refusal": 1, "short": 1}


def test_the_fake_servers_rates_pick_request_contents_for_their_first_answer_or_always():
    prompts = [f"Describe image {i}." for i in range(60)]
    with FakeVLMServer(FakeVLMConfig(rate_loop=0.5)) as server:
        first = [answer(server, p)["message"]["content"] for p in prompts]
        second = [answer(server, p, seed=7)["message"]["content"] for p in prompts]
    looped = [LOOP_PHRASE * 3 in text for text in first]
    assert 15 <= sum(looped) <= 45  # content-derived draws, about half
    assert not any(LOOP_PHRASE in text for text in second)  # once per content
    with FakeVLMServer(FakeVLMConfig(rate_loop=0.5, degenerate_always=True)) as server:
        again = [[LOOP_PHRASE * 3 in answer(server, p)["message"]["content"] for p in prompts]
                 for _ in range(2)]
    assert again == [looped, looped]  # the same contents, every time
    with FakeVLMServer(FakeVLMConfig(rate_text_refusal=0.5, rate_short=0.5)) as server:
        kinds = {answer(server, p)["message"]["content"] for p in prompts}
    assert kinds == {TEXT_REFUSAL, SHORT_ANSWER}


def test_the_fake_servers_degenerate_rates_are_checked_and_are_flags():
    with pytest.raises(ValueError, match="degenerate answer rates"):
        FakeVLMConfig(rate_loop=0.6, rate_short=0.6)
    config = _config_from_args(_parse_args(["--rate_loop", "0.05", "--degenerate_always"]))
    assert (config.rate_loop, config.degenerate_always, config.rate_short) == (0.05, True, 0)


@pytest.mark.parametrize("config, check", [
    (FakeVLMConfig(rate_loop=1, latency_ms=5), "degenerate"),
    (FakeVLMConfig(rate_text_refusal=1, latency_ms=5), "refusal"),
], ids=["loops", "refuses"])
def test_a_server_that_loops_or_refuses_once_per_image_still_captions_every_record(
        dataset_factory, tmp_path, config, check):
    data = dataset_factory(12)
    with FakeVLMServer(config) as server:
        result = run_cli([*job_flags(server, data), "--max_backoff", "0.01"], tmp_path / "out")
        stats = server.stats()
    assert result.returncode == 0, result.stderr[-3000:]
    captions = {c["id"]: c for c in result.captions}
    assert not result.failures
    assert {key: c["caption"] for key, c in captions.items()} == data.expected
    assert all(c["caption_meta"]["attempts"] == 2 for c in captions.values())
    assert sum(stats["faults"].values()) == 12 and stats["requests"] == 24
    assert result.summary["retries"] == 12 and result.summary["attempts"] == 24
    assert all(c["caption_meta"]["rejected"] == {check: 1} for c in captions.values())
    assert result.summary["answers_rejected"] == {check: 12}


def test_a_server_that_always_loops_refuses_or_answers_short_gives_typed_failures(tmp_path):
    manifest, root = degenerate_manifest(tmp_path)
    flags = [*TEST_RUNNER, "--input", manifest, "--model", "fake-vlm", "--image_root", root,
             "--max_retries", "2", "--max_backoff", "0.01"]
    with FakeVLMServer(FakeVLMConfig()) as server:
        checked = run_cli([*flags, "--api_url", server.url, "--min_caption_chars", "10"],
                          tmp_path / "checked")
        unchecked = run_cli([*flags, "--api_url", server.url, "--answer_checks", "none"],
                            tmp_path / "unchecked")
    assert checked.returncode == 0, checked.stderr[-3000:]
    assert {c["id"] for c in checked.captions} == {"plain"}
    errors = {f["record"]["id"]: f["error"] for f in checked.failures}
    assert {key: (e["stage"], e["type"], e["attempts"]) for key, e in errors.items()} == {
        "loop": ("response", "degenerate", 3), "refusal": ("response", "refusal", 3),
        "short": ("response", "too_short", 3)}
    assert "A fake caption: " + "square image" in errors["loop"]["message"]
    assert TEXT_REFUSAL in errors["refusal"]["message"]
    assert checked.summary["failed_by_type"] == {
        "response/degenerate": 1, "response/refusal": 1, "response/too_short": 1}
    written = "".join(open(path, encoding="utf-8").read()
                      for path in glob.glob(str(tmp_path / "checked" / "captions-*")))
    assert LOOP_PHRASE * 2 not in written and "sorry" not in written.lower()
    # switched off, every answer is kept as it came
    assert unchecked.returncode == 0, unchecked.stderr[-3000:]
    kept = {c["id"]: c["caption"] for c in unchecked.captions}
    assert kept["refusal"] == TEXT_REFUSAL and kept["short"] == SHORT_ANSWER
    assert kept["loop"].endswith(LOOP_PHRASE * 10) and not unchecked.failures


def test_a_schema_prompt_is_checked_by_its_schema_not_as_text(dataset_factory, tmp_path):
    data = dataset_factory(4, files=1)
    prompts = tmp_path / "prompts.yaml"
    prompts.write_text(json.dumps({
        "caption": {"prompt": "Describe the image."},
        "about": {"prompt": "Describe it as JSON. LOOP_ME",
                  "schema": {"type": "object", "properties": {"text": {"type": "string"}},
                             "required": ["text"]}}}))
    with FakeVLMServer(FakeVLMConfig()) as server:
        result = run_cli([*job_flags(server, data), "--prompts_file", str(prompts)],
                         tmp_path / "out")
    assert result.returncode == 0, result.stderr[-3000:]
    assert not result.failures and len(result.captions) == 4
    for caption in result.captions:
        assert caption["caption"] == data.expected[caption["id"]]
        assert caption["about"]["text"].endswith(LOOP_PHRASE * 10)  # kept: it conforms
        assert caption["caption_meta"]["attempts"] == 2


def test_batch_mode_types_a_looping_answer_or_falls_back_to_the_online_path(dataset_factory,
                                                                            tmp_path):
    data = dataset_factory(6, files=1)
    batch = ["--mode", "batch", "--batch_poll_interval", "0.2"]
    with FakeVLMServer(FakeVLMConfig(rate_loop=1)) as server:
        typed = run_cli([*job_flags(server, data), *batch], tmp_path / "typed")
    with FakeVLMServer(FakeVLMConfig(rate_loop=1)) as server:  # first answers loop again
        fallback = run_cli([*job_flags(server, data), *batch, "--fallback", "online"],
                           tmp_path / "fallback")
        chats = server.stats()["requests"]
    assert typed.returncode == 0, typed.stderr[-3000:]
    assert not typed.captions
    errors = [f["error"] for f in typed.failures]
    assert len(errors) == 6 and {(e["type"], e["retryable"]) for e in errors} == \
        {("degenerate", True)}
    assert all(e["paid"]["completion_tokens"] > 0 for e in errors)  # the loop was paid for
    # the online path is the second answer of each request: a caption
    assert fallback.returncode == 0, fallback.stderr[-3000:]
    assert {c["id"]: c["caption"] for c in fallback.captions} == data.expected
    assert chats == 6 and not fallback.failures


def job_flags(server: FakeVLMServer, data) -> list[str]:
    return [*TEST_RUNNER, "--input", ",".join(data.manifests), "--api_url", server.url,
            "--model", "fake-vlm", "--image_root", str(data.root)]


def degenerate_manifest(tmp_path) -> tuple[str, str]:
    """A manifest of one record per degenerate answer the fake server gives by marker, and a
    plain one; its path and image root."""
    from conftest import make_image

    root = tmp_path / "data"
    root.mkdir()
    image, _ = make_image(root, 2)
    records = [{"id": key, "image": image,
                "conversation": [{"from": "human", "value": f"Describe it. {marker}"}]}
               for key, marker in (("plain", ""), ("loop", "LOOP_ME"),
                                   ("refusal", "REFUSE_IN_TEXT"), ("short", "ANSWER_SHORT"))]
    manifest = root / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(record) + "\n" for record in records))
    return str(manifest), str(root)
