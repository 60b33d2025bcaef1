from .chat import ChatScreen
from .help import HelpScreen
from .history import HistoryScreen
from .sampling import SamplingScreen
from .system_prompt import SystemPromptScreen

__all__ = ["ChatScreen", "HelpScreen", "HistoryScreen", "SamplingScreen", "SystemPromptScreen"]
