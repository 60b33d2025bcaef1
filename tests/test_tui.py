"""The real `cl3 chat` Textual app, driven headless by Textual's Pilot on the real tiny GGUF model."""

from __future__ import annotations

import asyncio
import functools
import json
import threading
import time

import pytest
from textual.widgets import Footer, Input, TextArea

from cl3.chat import (
    DEFAULT_SYSTEM_PROMPT,
    ChatModel,
    Conversation,
    ConversationStore,
    Message,
    SamplingParams,
    TokenTextDecoder,
)
from cl3.errors import InputError
from cl3.tui import ChatApp
from cl3.tui.screens import HelpScreen, HistoryScreen, SamplingScreen, SystemPromptScreen
from cl3.tui.widgets import ChatMessage, Notice, PromptInput, StatusBar
from tests.test_chat import render_reference

SIZE = (100, 32)


def run_async(test):
    """Run an async test function in a fresh event loop (no pytest plugin needed)."""

    @functools.wraps(test)
    def run(*args, **kwargs):
        return asyncio.run(test(*args, **kwargs))

    return run


@pytest.fixture(scope="module")
def reference(tiny_llama3_gguf) -> ChatModel:
    """An independent model instance: what the app shows must equal what the library generates with the same seed."""
    return ChatModel(tiny_llama3_gguf, n_ctx=2048)


@pytest.fixture
def make_app(tiny_llama3_gguf, tmp_path):
    def make(**options) -> ChatApp:
        options.setdefault("n_ctx", 512)
        options.setdefault("sampling", SamplingParams(seed=7, max_tokens=12))
        options.setdefault("store", ConversationStore(tmp_path / "chats"))
        options.setdefault("export_dir", tmp_path)
        return ChatApp(options.pop("model_path", tiny_llama3_gguf), **options)

    return make


async def wait_for(pilot, condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        await pilot.pause(0.02)


async def ready(pilot) -> None:
    await wait_for(pilot, lambda: pilot.app.screen.model_ready)
    await pilot.pause()


async def send(pilot, text: str) -> None:
    done = pilot.app.replies_done
    pilot.app.screen.query_one(PromptInput).insert(text)
    await pilot.press("ctrl+j")
    await wait_for(pilot, lambda: pilot.app.replies_done > done)
    await pilot.pause()


def shown(app: ChatApp) -> list[tuple[str, str]]:
    return [(m.role, m.content) for m in app.screen.query(ChatMessage)]


@run_async
async def test_send_streams_the_reply(make_app, reference, monkeypatch):
    pieces: list[str] = []
    original_write = ChatMessage.write

    async def record(self, piece):
        pieces.append(piece)
        await original_write(self, piece)

    monkeypatch.setattr(ChatMessage, "write", record)
    loading = threading.Event()

    class SlowToLoad(ChatModel):  # the real model, held back so the loading state can be seen
        def __init__(self, *args, **kwargs):
            loading.wait(30)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr("cl3.tui.screens.chat.ChatModel", SlowToLoad)
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause(0.2)
        assert app.screen.query_one(StatusBar).state == "loading model…"
        assert app.screen.query_one("#conversation").loading and not app.screen.model_ready
        await pilot.press("o", "k")  # the UI is not frozen while the model loads
        assert app.screen.query_one(PromptInput).text == "ok"
        app.screen.query_one(PromptInput).clear()
        loading.set()
        await ready(pilot)
        assert not app.screen.query_one("#conversation").loading
        await send(pilot, "你好！Tell me about the quick brown fox.")

        expected = reference.reply(DEFAULT_SYSTEM_PROMPT, [Message("user", "你好！Tell me about the quick brown fox.")],
                                   SamplingParams(seed=7, max_tokens=12))
        expected_text = "".join(expected)
        assert len(pieces) > 1 and "".join(pieces) == expected_text  # streamed piece by piece
        assert app.conversation.messages == [Message("user", "你好！Tell me about the quick brown fox."),
                                             Message("assistant", expected_text)]
        assert shown(app)[-1] == ("assistant", expected_text)
        assert app.screen.query(ChatMessage).last().markdown.source == expected_text
        status = app.screen.query_one(StatusBar)
        assert status.context_used == expected.context_used and status.n_ctx == 512
        assert status.tokens_per_second and status.tokens_per_second > 0
        assert status.model_file == "tiny-llama3-f32.gguf" and status.quant_type == "F32"
        assert "ctx" in str(status.render()) and "tok/s" in str(status.render())
        assert app.screen.query_one(PromptInput).text == ""


@run_async
async def test_input_takes_chinese_and_several_lines(make_app):
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await pilot.press("你", "好", "enter", "h", "i")
        assert app.screen.query_one(PromptInput).text == "你好\nhi"
        await pilot.press("ctrl+j")
        await wait_for(pilot, lambda: app.replies_done == 1)
        assert app.conversation.messages[0] == Message("user", "你好\nhi")


@run_async
async def test_stop_keeps_the_partial_reply(make_app, reference, monkeypatch):
    # a seed whose reply runs to the token limit (no early end-of-turn token)
    for seed in range(1, 100):
        sampling = SamplingParams(seed=seed, max_tokens=300)
        full = reference.reply(DEFAULT_SYSTEM_PROMPT, [Message("user", "Write a long story.")], sampling)
        full_text = "".join(full)
        if full.finish_reason == "length":
            break
    else:
        pytest.fail("no seed gives a long reply")

    original_feed = TokenTextDecoder.feed
    escape_pressed = threading.Event()
    fed = [0]

    def held_mid_reply(self, token):  # the reply waits at its 20th token until Esc is pressed: never done before it
        fed[0] += 1
        if fed[0] == 20:
            escape_pressed.wait(30)
        return original_feed(self, token)

    monkeypatch.setattr(TokenTextDecoder, "feed", held_mid_reply)
    app = make_app(n_ctx=2048, sampling=sampling)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        app.screen.query_one(PromptInput).insert("Write a long story.")
        await pilot.press("ctrl+j")
        await wait_for(pilot, lambda: app.screen.generating and app.screen.query(ChatMessage).last().content)
        await pilot.press("escape")
        escape_pressed.set()
        await wait_for(pilot, lambda: not app.screen.generating)
        await pilot.pause()
        partial = app.conversation.messages[-1]
        assert partial.role == "assistant" and partial.content
        assert len(partial.content) < len(full_text) and full_text.startswith(partial.content)
        last = app.screen.query(ChatMessage).last()
        assert last.content == partial.content
        assert "(stopped)" in [str(label.render()) for label in last.query(".note")]


@run_async
async def test_regenerate_replaces_the_last_reply(make_app, reference):
    app = make_app(sampling=SamplingParams(seed=5, max_tokens=10))
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await send(pilot, "hello")
        first = app.conversation.messages[-1].content
        app.sampling = SamplingParams(seed=6, max_tokens=10)
        await pilot.press("ctrl+r")
        await wait_for(pilot, lambda: app.replies_done == 2)
        await pilot.pause()
        expected = "".join(reference.reply(DEFAULT_SYSTEM_PROMPT, [Message("user", "hello")],
                                           SamplingParams(seed=6, max_tokens=10)))
        assert expected != first
        assert app.conversation.messages == [Message("user", "hello"), Message("assistant", expected)]
        assert shown(app)[1:] == [("user", "hello"), ("assistant", expected)]


@run_async
async def test_context_overflow_shows_the_trim_notice(make_app, tiny_llama3_gguf):
    app = make_app(n_ctx=256, sampling=SamplingParams(seed=3, max_tokens=48))
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        for i in range(8):
            await send(pilot, f"Question {i}: what does the quick brown fox do?")
            if app.screen.query(Notice):
                break
        notice = app.screen.query_one(Notice)
        assert "Context full (256 tokens)" in str(notice.render()) and "system prompt is kept" in str(notice.render())
        # the whole history really does not fit any more (rendered independently with Jinja)
        history = app.conversation.messages[:-1]
        full_prompt = render_reference(tiny_llama3_gguf, DEFAULT_SYSTEM_PROMPT, history)
        assert len(app.model.llm.tokenize(full_prompt.encode(), add_bos=False, special=True)) + 48 > 256
        assert app.screen.query_one("#system-message", ChatMessage).content == DEFAULT_SYSTEM_PROMPT
        assert app.screen.query_one(StatusBar).context_used <= 256
        assert len(app.conversation.messages) == 2 * (i + 1)  # nothing is deleted from the saved chat


@run_async
async def test_saved_chat_is_listed_and_reopened_and_exported(make_app, tmp_path):
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await send(pilot, "请记住这句话")
        saved_id = app.conversation.id
        saved = json.loads((tmp_path / "chats" / f"{saved_id}.json").read_text(encoding="utf-8"))
        assert [m["role"] for m in saved["messages"]] == ["user", "assistant"]
        assert saved["messages"][0]["content"] == "请记住这句话"
        before = shown(app)

        await pilot.press("ctrl+n")
        await pilot.pause()
        assert app.conversation.id != saved_id and app.conversation.messages == []
        assert shown(app) == [("system", DEFAULT_SYSTEM_PROMPT)]

        await pilot.press("f4")
        await wait_for(pilot, lambda: isinstance(app.screen, HistoryScreen))
        await pilot.press("enter")
        await wait_for(pilot, lambda: app.conversation.id == saved_id)
        await pilot.pause()
        assert shown(app) == before

        await pilot.press("f5")
        await pilot.pause()
        exported = (tmp_path / f"cl3-chat-{saved_id}.md").read_text(encoding="utf-8")
        assert "## User\n\n请记住这句话" in exported and saved["messages"][1]["content"] in exported


@run_async
async def test_system_prompt_sampling_and_help_panels(make_app, reference):
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await pilot.press("f2")
        await wait_for(pilot, lambda: isinstance(app.screen, SystemPromptScreen))
        app.screen.query_one("#system-text").text = "你是一位诗人。"
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: app.conversation.system_prompt == "你是一位诗人。")
        await pilot.pause()
        assert app.screen.query_one("#system-message", ChatMessage).content == "你是一位诗人。"

        await pilot.press("f3")
        await wait_for(pilot, lambda: isinstance(app.screen, SamplingScreen))
        app.screen.query_one("#sampling-temperature").value = "0.3"
        app.screen.query_one("#sampling-max_tokens").value = "7"
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: app.sampling.temperature == 0.3)
        assert app.sampling.max_tokens == 7

        await send(pilot, "hi")  # the reply uses the new system prompt and sampling parameters
        expected = reference.reply("你是一位诗人。", [Message("user", "hi")],
                                   SamplingParams(temperature=0.3, max_tokens=7, seed=7))
        assert app.conversation.messages[-1].content == "".join(expected)
        assert app.screen.query_one(StatusBar).context_used == expected.context_used

        await pilot.press("f1")
        await wait_for(pilot, lambda: isinstance(app.screen, HelpScreen))
        await pilot.press("escape")
        await wait_for(pilot, lambda: not isinstance(app.screen, HelpScreen))


@run_async
async def test_no_system_prompt_shows_no_system_block(make_app):
    app = make_app(system_prompt="")
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        system = app.screen.query_one("#system-message", ChatMessage)
        assert not system.display and system.region.height == 0
        for text in ("你是一位诗人。", ""):  # F2 sets one (shown), and clears it again (hidden)
            await pilot.press("f2")
            await wait_for(pilot, lambda: isinstance(app.screen, SystemPromptScreen))
            app.screen.query_one("#system-text").text = text
            await pilot.press("ctrl+s")
            await wait_for(pilot, lambda t=text: app.conversation.system_prompt == t)
            await pilot.pause()
            system = app.screen.query_one("#system-message", ChatMessage)
            assert system.display == bool(text) and (system.region.height > 0) == bool(text)


@run_async
async def test_corrupt_model_ends_the_app_with_one_clear_error(make_app, tmp_path, tiny_llama3_gguf):
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(tiny_llama3_gguf.read_bytes()[:5000])
    app = make_app(model_path=corrupt)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.load_error is not None)
    assert isinstance(app.load_error, InputError) and "not a readable GGUF file" in str(app.load_error)
    assert app.return_code == 1


@run_async
async def test_context_too_small_for_the_system_prompt(make_app):
    app = make_app(n_ctx=256, system_prompt="你好" * 400)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.load_error is not None)
    assert "too small for the system prompt" in str(app.load_error)


POEM = "床前明月光，\n疑是地上霜。\nline three\nline four"


def paragraph_lines(message: ChatMessage) -> list[str]:
    return [str(p.render()) for p in message.query("MarkdownParagraph")]


@run_async
async def test_replies_keep_their_line_breaks(make_app, tmp_path):
    """Single newlines are line breaks (CommonMark would join the lines into one), in a saved reply and in one
    streamed piece by piece; blank lines still separate paragraphs, and Markdown is still rendered."""
    store = ConversationStore(tmp_path / "chats")
    saved = Conversation(model="tiny-llama3-f32.gguf", messages=[
        Message("user", "写首诗"), Message("assistant", POEM + "\n\n**End**\nof it")])
    store.save(saved)
    app = make_app(store=store, resume=saved.id)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        reply = app.screen.query(ChatMessage).last()
        assert paragraph_lines(reply) == [POEM, "End\nof it"]
        assert [p.size.height for p in reply.query("MarkdownParagraph")] == [4, 2]

        streamed = ChatMessage("assistant")
        await app.screen.query_one("#conversation").mount(streamed)
        for piece in ["床前明", "月光，\n", "疑是地上霜。", "\nline three\nline", " four"]:
            await streamed.write(piece)
            await pilot.pause(0.05)
        await streamed.finish()
        await pilot.pause()
        assert paragraph_lines(streamed) == [POEM] and streamed.content == POEM


@run_async
async def test_every_key_is_in_the_footer_at_80_columns(make_app):
    app = make_app()
    async with app.run_test(size=(80, 24)) as pilot:
        await ready(pilot)
        footer = app.screen.query_one(Footer)
        keys = {k.description: k.region for k in footer.query("FooterKey")}
        expected = [b.description for b in [*app.screen.BINDINGS, *app.BINDINGS] if b.show]
        assert sorted(keys) == sorted(expected)
        assert all(region.width > 0 and region.right <= 80 for region in keys.values()), keys


# --- snapshots of the main screens (pytest-textual-snapshot; update with --snapshot-update) ---

def _saved_chat(store: ConversationStore, system_prompt: str | None = None) -> str:
    conversation = Conversation(model="tiny-llama3-f32.gguf", id="20260101-120000-abcdef", messages=[
        Message("user", "你好，请介绍一下量化。"),
        Message("assistant", "量化把权重从 16 位浮点数压缩到更少的位数：\n文件更小，\n运行更快。\n\n| 类型 | 每权重位数 |\n"
                             "|---|---|\n| Q8_0 | 8.5 |\n| Q4_K_M | 4.8 |\n\n```sh\ncl3 quantize model.gguf Q4_K_M\n```"),
    ])
    if system_prompt is not None:
        conversation.system_prompt = system_prompt
    store.save(conversation)
    return conversation.id


@pytest.mark.parametrize(("keys", "system_prompt"), [((), None), (("f1",), None), (("f3",), None), (("f2",), None),
                                                     ((), "")], ids=["chat", "help", "sampling", "system", "no-system"])
def test_snapshots(snap_compare, make_app, tmp_path, keys, system_prompt):
    store = ConversationStore(tmp_path / "chats")
    app = make_app(store=store, resume=_saved_chat(store, system_prompt))

    async def run_before(pilot) -> None:
        await ready(pilot)
        for key in keys:
            await pilot.press(key)
        for screen in pilot.app.screen_stack:  # a blinking cursor would make the screenshots differ
            for widget in [*screen.query(TextArea), *screen.query(Input)]:
                widget.cursor_blink = False
        await pilot.pause(0.3)

    assert snap_compare(app, terminal_size=SIZE, run_before=run_before)
