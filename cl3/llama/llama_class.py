"""What chat and serve need around llama-cpp-python's high-level ``Llama`` class, which loads their models."""

from __future__ import annotations

import contextlib

from .hardware import prepare_llama_objects
from .library import llama_cpp
from .model import token_piece_bytes


def prepare_for_llama() -> None:
    """Before a ``llama_cpp.Llama`` is made: llama.cpp's log goes to cl3's capture (not the terminal), and models
    load with the CPU kernels that work on this machine."""
    llama_cpp()
    prepare_llama_objects()


def eog_token_ids(llm) -> frozenset[int]:
    """Every end-of-generation token of a ``llama_cpp.Llama``'s vocabulary, as llama.cpp decides them
    (``llama_vocab_is_eog``: EOS, EOT and the end-of-turn tokens it recognises, e.g. <|eot_id|>, <|end_of_text|>)."""
    lib = llama_cpp()
    vocab = lib.llama_model_get_vocab(llm.model)
    return frozenset(t for t in range(lib.llama_vocab_n_tokens(vocab)) if lib.llama_vocab_is_eog(vocab, t))


def token_piece(llm, token: int, special: bool = False) -> bytes:
    """The bytes of one token of a ``llama_cpp.Llama`` (long pieces included, unlike ``Llama.detokenize``)."""
    return token_piece_bytes(llama_cpp().llama_model_get_vocab(llm.model), token, special)


@contextlib.contextmanager
def budgeted_chat_templates():
    """While a ``llama_cpp.Llama`` loads: it compiles every chat template of the GGUF with llama-cpp-python's Jinja
    formatter (constant expressions like ``'A' * 10**9`` are evaluated then) and keeps them as chat handlers; make
    them cl3's budgeted formatter (cl3.template_budget) so a hostile template costs nothing at load or later."""
    from llama_cpp import llama_chat_format

    from ..template_budget import BudgetedChatFormatter

    original = llama_chat_format.Jinja2ChatFormatter
    llama_chat_format.Jinja2ChatFormatter = BudgetedChatFormatter
    try:
        yield
    finally:
        llama_chat_format.Jinja2ChatFormatter = original
