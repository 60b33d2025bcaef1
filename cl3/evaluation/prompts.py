"""The prompts, transcribed from the model authors' evaluation scripts (ymcui/Chinese-LLaMA-Alpaca-3,
scripts/ceval|cmmlu/llama_evaluator.py and scripts/mmlu/eval.py; the C-Eval project's and hendrycks/test's own).

C-Eval and CMMLU (the authors use the C-Eval prompt for both, with the subject's Chinese name)::

    以下是中国关于{科目名}考试的单项选择题，请选出其中的正确答案。\\n\\n      (always, also zero-shot)
    {question}\\nA. {A}\\nB. {B}\\nC. {C}\\nD. {D}\\n答案：{answer}\\n\\n   (each of the K dev examples)
    {question}\\nA. {A}\\nB. {B}\\nC. {C}\\nD. {D}\\n答案：                (the question)

MMLU (hendrycks/test ``gen_prompt``; ``format_subject`` puts a space before every word, hence "about  college")::

    The following are multiple choice questions (with answers) about {subject words}.\\n\\n
    {question}\\nA. {A}\\nB. {B}\\nC. {C}\\nD. {D}\\nAnswer: {answer}\\n\\n
    {question}\\nA. {A}\\nB. {B}\\nC. {C}\\nD. {D}\\nAnswer:

With a chat template (the authors' ``--with_prompt``): the system prompt, then zero-shot one user turn holding the
whole plain prompt; K-shot a user turn with the header, the assistant's ``好的，我会结合{科目名}相关知识回答``, each
example as a user turn (question ending in ``\\n答案：``) answered by the assistant with its letter, and the question as
the last user turn, followed by the assistant's header. (MMLU: the same turns, the header in the first user turn.)
``--template model|NAME|FILE`` renders those turns through a Jinja chat template; ``--template alpaca3`` writes
them as the authors' scripts do by hand for Llama-3-Chinese-Instruct (byte for byte: their C-Eval strings begin with
``<|begin_of_text|>``, their CMMLU strings do not, and nothing is trimmed).
"""

from __future__ import annotations

from collections.abc import Sequence

import jinja2

from ..chat_templates import DEFAULT_SYSTEM_PROMPT
from ..errors import UnsupportedModelError
from ..template_budget import BudgetedChatFormatter, TemplateBudgetError
from .tasks import CHOICES, Question, Subject, TaskInfo

ZH_HEADER = "以下是中国关于{subject}考试的单项选择题，请选出其中的正确答案。\n\n"
ZH_ACK = "好的，我会结合{subject}相关知识回答"
EN_HEADER = "The following are multiple choice questions (with answers) about {subject}.\n\n"


def subject_phrase(info: TaskInfo, subject: Subject, style: str = "alpaca3") -> str:
    if info.language == "en":
        return "".join(" " + word for word in subject.key.split("_"))  # hendrycks/test format_subject
    return subject.key if style == "alpaca2" else subject.name  # Alpaca-2's scripts pass the file stem


def header(info: TaskInfo, subject: Subject, style: str = "alpaca3") -> str:
    phrase = subject_phrase(info, subject, style)
    if info.header is not None:
        return info.header.replace("{subject}", phrase)
    return (EN_HEADER if info.language == "en" else ZH_HEADER).format(subject=phrase)


def format_question(info: TaskInfo, q: Question, *, with_answer: bool) -> str:
    text = q.question + "".join(f"\n{c}. {option}" for c, option in zip(CHOICES, q.choices))
    if info.language == "en":
        cue = "\nAnswer:" if info.answer_cue is None else info.answer_cue
        return text + cue + (f" {q.answer}\n\n" if with_answer else "")
    cue = "\n答案：" if info.answer_cue is None else info.answer_cue
    return text + cue + (f"{q.answer}\n\n" if with_answer else "")


def plain_prompt(info: TaskInfo, subject: Subject, shots: Sequence[Question], q: Question,
                 style: str = "alpaca3") -> str:
    """Alpaca-2's scripts (``style="alpaca2"``) write no header at all zero-shot."""
    lead = "" if style == "alpaca2" and not shots and info.language == "zh" else header(info, subject, style)
    return (lead + "".join(format_question(info, s, with_answer=True) for s in shots)
            + format_question(info, q, with_answer=False))


def chat_messages(info: TaskInfo, subject: Subject, shots: Sequence[Question], q: Question,
                  system: str = DEFAULT_SYSTEM_PROMPT) -> list[dict[str, str]]:
    """The conversation the authors' ``--with_prompt`` builds (few-shot examples as prior turns)."""
    messages = [{"role": "system", "content": system}]
    question = format_question(info, q, with_answer=False)
    if not shots:
        return messages + [{"role": "user", "content": header(info, subject) + question}]
    if info.language == "zh":
        messages += [{"role": "user", "content": header(info, subject)},
                     {"role": "assistant", "content": ZH_ACK.format(subject=subject.name)}]
    for i, s in enumerate(shots):
        lead = header(info, subject) if info.language == "en" and i == 0 else ""
        messages += [{"role": "user", "content": lead + format_question(info, s, with_answer=False)},
                     {"role": "assistant", "content": s.answer or ""}]
    return messages + [{"role": "user", "content": question}]


ALPACA2_SYSTEM = {"ceval": DEFAULT_SYSTEM_PROMPT, "cmmlu": "你是一个乐于助人的助手。"}
L2_INST = "[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{instruction} [/INST]"


def alpaca2_prompt(info: TaskInfo, subject: Subject, shots: Sequence[Question], q: Question) -> str:
    """The authors' hand-built Llama-2 prompt for Chinese-Alpaca-2 (Chinese-LLaMA-Alpaca-2 scripts/ceval/
    llama_evaluator.py and scripts/cmmlu/llama2_evaluator.py, ``with_prompt``)."""
    if info.language != "zh":
        raise UnsupportedModelError("the authors' MMLU script has no chat form; use a chat template (model, NAME, "
                                    "FILE) or none", param="template")
    system = ALPACA2_SYSTEM.get(info.name, DEFAULT_SYSTEM_PROMPT)
    history = ""
    if shots:
        history = (L2_INST.format(system=system, instruction=header(info, subject, "alpaca2"))
                   + ZH_ACK.format(subject=subject.key))
        for s in shots:
            history += "[INST] " + format_question(info, s, with_answer=False) + "[/INST]" + s.answer + "\n"
    return history + L2_INST.format(system=system, instruction=format_question(info, q, with_answer=False))


L3_SYSTEM = "<|start_header_id|>system<|end_header_id|>\n\n{content}<|eot_id|>"
L3_USER = "<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
L3_ASSISTANT = "{content}<|eot_id|>"
AUTHORS_TEMPLATES = ("alpaca3", "alpaca2")
STYLES = ("alpaca3", "alpaca2")


def alpaca3_prompt(info: TaskInfo, subject: Subject, shots: Sequence[Question], q: Question) -> str:
    """The authors' hand-built Llama-3 prompt (scripts/ceval|cmmlu/llama_evaluator.py, ``with_prompt``)."""
    if info.language != "zh":
        raise UnsupportedModelError("the authors' MMLU script has no chat form; use a chat template (model, NAME, "
                                    "FILE) or none", param="template")
    begin = "<|begin_of_text|>" if info.name == "ceval" else ""
    system = begin + L3_SYSTEM.format(content=DEFAULT_SYSTEM_PROMPT)
    question = format_question(info, q, with_answer=False)
    if not shots:
        return system + L3_USER.format(content=header(info, subject) + question)
    text = (system + L3_USER.format(content=header(info, subject))
            + L3_ASSISTANT.format(content=ZH_ACK.format(subject=subject.name)))
    for s in shots:
        text += (L3_USER.format(content=format_question(info, s, with_answer=False))
                 + L3_ASSISTANT.format(content=s.answer))
    return text + L3_USER.format(content=question)


class ChatRenderer:
    """A chat template rendered as llama-cpp-python's Jinja2ChatFormatter (and so cl3 chat) renders it, under cl3's
    template budget (a hostile template is refused, never hangs the run)."""

    def __init__(self, template: str, bos_token: str, eos_token: str, source: str):
        self.source = source
        try:
            self._formatter = BudgetedChatFormatter(template=template, bos_token=bos_token, eos_token=eos_token,
                                                  add_generation_prompt=True)
        except TemplateBudgetError as ex:
            raise TemplateBudgetError(ex.reason, source) from None
        except jinja2.TemplateError as ex:
            raise UnsupportedModelError(f"the chat template ({source}) is not valid Jinja: {ex}") from None

    def __call__(self, messages: list[dict[str, str]]) -> str:
        try:
            return self._formatter(messages=messages).prompt
        except TemplateBudgetError as ex:
            raise TemplateBudgetError(ex.reason, self.source) from None
        except (jinja2.TemplateError, ValueError, TypeError) as ex:
            raise UnsupportedModelError(f"the chat template ({self.source}) failed: {ex}") from None


def build_prompt(info: TaskInfo, subject: Subject, shots: Sequence[Question], q: Question,
                 chat: ChatRenderer | str | None = None, style: str = "alpaca3") -> str:
    """The prompt text of one question: plain (as the Alpaca-3 or the Alpaca-2 scripts write it), the authors' own
    chat form (``"alpaca3"``, ``"alpaca2"``), or a chat template."""
    if chat is None:
        return plain_prompt(info, subject, shots, q, style)
    if chat == "alpaca3":
        return alpaca3_prompt(info, subject, shots, q)
    if chat == "alpaca2":
        return alpaca2_prompt(info, subject, shots, q)
    return chat(chat_messages(info, subject, shots, q))
