from .chat_message import ChatMessage, Notice
from .prompt_input import PromptInput
from .status_bar import StatusBar

__all__ = ["ChatMessage", "Notice", "PromptInput", "StatusBar"]
