"""One message in the conversation, rendered as Markdown with its line breaks kept; assistant replies stream into it."""

from __future__ import annotations

from markdown_it import MarkdownIt
from markdown_it.rules_core import StateCore
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import Label, Markdown, Static
from textual.widgets.markdown import MarkdownStream

ROLE_LABELS = {"system": "System", "user": "You", "assistant": "Assistant"}


def markdown_parser() -> MarkdownIt:
    """Textual's GFM-like Markdown, with every newline a line break: a reply keeps the lines the model wrote."""
    parser = MarkdownIt("gfm-like")
    parser.core.ruler.push("hard_breaks", _hard_breaks)
    return parser


def _hard_breaks(state: StateCore) -> None:
    # markdown-it's `breaks` option only changes its HTML renderer; Textual renders a soft break as a space
    for token in state.tokens:
        for child in token.children or ():
            if child.type == "softbreak":
                child.type = "hardbreak"


class ChatMessage(Vertical):
    """A message with a role label; ``stream``/``write``/``finish`` feed a reply as it is generated."""

    def __init__(self, role: str, content: str = "", **kwargs) -> None:
        super().__init__(classes=f"message {role}", **kwargs)
        self.role = role
        self.content = content
        self._stream: MarkdownStream | None = None

    def compose(self) -> ComposeResult:
        yield Label(ROLE_LABELS.get(self.role, self.role), classes="role")
        yield Markdown(self.content, parser_factory=markdown_parser)

    @property
    def markdown(self) -> Markdown:
        return self.query_one(Markdown)

    async def write(self, piece: str) -> None:
        if self._stream is None:
            self._stream = Markdown.get_stream(self.markdown)
        self.content += piece
        await self._stream.write(piece)

    async def finish(self, note: str = "") -> None:
        if self._stream is not None:
            await self._stream.stop()
            self._stream = None
        if note:
            self.mount(Label(note, classes="note"))

    async def set_content(self, content: str) -> None:
        self.content = content
        await self.markdown.update(content)


class Notice(Static):
    """A line from cl3 itself inside the conversation (context trimmed, reply stopped, errors)."""

    def __init__(self, text: str, *, kind: str = "info") -> None:
        super().__init__(text, classes=f"notice {kind}", markup=False)
