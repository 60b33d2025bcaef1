"""Chat templates rendered under a time and size budget: a template comes from a downloaded file and is data.

llama-cpp-python renders chat templates in Jinja's sandbox, which blocks attribute escapes but not work: nested
``range(100000)`` loops run for hours and ``'A' * 10**11`` exhausts memory. cl3 renders every template with
BudgetedChatFormatter instead: the same sandbox, options, variables and output as llama-cpp-python's formatter, plus

- a wall-clock deadline checked at every loop iteration, call, filter and operator (RENDER_SECONDS per render);
- a size cap (MAX_TEXT characters or items) checked *before* an operation that could build a bigger value
  (``*``, ``+``, ``~``, ``%``/``format`` widths, ``join``, ``replace``, ``indent``, ``expandtabs``, int arguments)
  and on every value a call returns and on the output;
- MemoryError, OverflowError (the sandbox's range limit) and RecursionError turned into the same refusal.

check_chat_template() renders probe conversations once, when a model is loaded (chat, serve, export, info --check),
so a template that exceeds the budget is refused with one line before anything is served.
"""

from __future__ import annotations

import functools
import re
import threading
import time
from typing import Any

import jinja2
import jinja2.ext
from jinja2 import nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import _PassArg
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from .errors import UnsupportedModelError

RENDER_SECONDS = 3.0  # per render; real chat templates take milliseconds
MAX_TEXT = 10_000_000  # characters (or list items) in any value and in the rendered prompt
MAX_PRODUCED = 20 * MAX_TEXT  # all values one render builds, together (a bound on its memory)
MAX_INT_BITS = 1_000_000  # the largest integer a * or ** may build (Python multiplies big integers slowly)


class TemplateBudgetError(UnsupportedModelError):
    """A chat template ran past the render budget; ``reason`` says which limit."""

    def __init__(self, reason: str, where: str = "the chat template"):
        self.reason = reason
        super().__init__(f"{where} exceeds cl3's budget for rendering a chat template ({reason}), so cl3 does not "
                         f"use it; name another chat template", param="chat_template")


class _OverBudget(Exception):
    """Raised inside a render; becomes TemplateBudgetError outside Jinja (Jinja may wrap other exceptions)."""


def _size(value: Any) -> int:
    return len(value) if isinstance(value, (str, bytes, list, tuple, dict, set, frozenset)) else 0


def _check_size(n: int, what: str) -> None:
    if n > MAX_TEXT:
        raise _OverBudget(f"{what} of {n:,} characters or items, more than {MAX_TEXT:,}")


_PERCENT_SPEC = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?")
_BRACE_SPEC = re.compile(r"\{[^{}]*?[:!][^{}]*\}")
_DIGITS = re.compile(r"\d+")


def _check_format(fmt: str, args: tuple) -> None:
    """Widths and precisions in a %-format or str.format string (and * taken from the arguments)."""
    for m in _PERCENT_SPEC.finditer(fmt):
        for g in m.groups():
            if g and g != "*":
                _check_size(int(g), "a format width")
    for m in _BRACE_SPEC.finditer(fmt):
        for d in _DIGITS.findall(m.group()):
            _check_size(int(d) if len(d) < 12 else MAX_TEXT + 1, "a format width")
    _check_ints(args)


def _check_ints(values) -> None:
    for v in values:
        if isinstance(v, int) and not isinstance(v, bool) and abs(v) > MAX_TEXT:
            raise _OverBudget(f"a number argument {v:,}, more than {MAX_TEXT:,}")
        if isinstance(v, tuple):
            _check_ints(v)


def _check_str_call(name: str, text: str, args: tuple, kwargs: dict) -> None:
    """Before a str method or filter that multiplies its input: the size it would produce."""
    if name == "replace" and len(args) >= 2 and isinstance(args[0], str) and isinstance(args[1], str):
        old, new = args[0], args[1]
        count = len(text) + 1 if not old else text.count(old)
        _check_size(len(text) + count * len(new), "a replace result")
    elif name == "expandtabs":
        size = args[0] if args else kwargs.get("tabsize", 8)
        if isinstance(size, int):
            _check_size(len(text) + text.count("\t") * max(size, 0), "an expandtabs result")
    elif name == "indent":
        width = args[0] if args else kwargs.get("width", 4)
        width = len(width) if isinstance(width, str) else width
        if isinstance(width, int):
            _check_size(len(text) + (text.count("\n") + 1) * max(width, 0), "an indent result")
    elif name in ("format", "format_map"):
        _check_format(text, args)


def _join_size(sep: str, items: list) -> int:
    return len(sep) * max(len(items) - 1, 0) + sum(len(x) if isinstance(x, str) else 16 for x in items)


class _BudgetedEnvironment(ImmutableSandboxedEnvironment):
    """ImmutableSandboxedEnvironment with a deadline and size caps (see the module docstring)."""

    intercepted_binops = frozenset(["*", "+", "%", "**"])

    def __init__(self, **options):
        super().__init__(**options)
        self._local = threading.local()
        self.filters = {name: self._budgeted_filter(name, f) for name, f in self.filters.items()}

    # the deadline -------------------------------------------------------------------------------------------------
    def budget(self):
        env = self

        class _Budget:
            def __enter__(self):
                env._local.deadline = time.monotonic() + RENDER_SECONDS
                env._local.produced = 0

            def __exit__(self, *exc):
                env._local.deadline = None

        return _Budget()

    def tick(self) -> None:
        deadline = getattr(self._local, "deadline", None)
        if deadline is not None and time.monotonic() > deadline:
            raise _OverBudget(f"more than {RENDER_SECONDS:g} s")

    def produced(self, value):
        """Count a value the render built (the running total bounds the render's memory)."""
        n = _size(value)
        _check_size(n, "a value")
        total = self._local.produced = getattr(self._local, "produced", 0) + n
        if total > MAX_PRODUCED:
            raise _OverBudget(f"values of more than {MAX_PRODUCED:,} characters or items in all")
        return value

    # what the compiled template calls -----------------------------------------------------------------------------
    def budget_iter(self, iterable):
        """Every {% for %} iterates through this (see _parse): a deadline check per iteration."""
        for item in iterable:
            self.tick()
            yield item

    def budget_concat(self, *parts):
        """Every ``a ~ b`` goes through this (see _parse): the joined size is checked before joining."""
        self.tick()
        texts = [str(p) for p in parts]
        _check_size(sum(map(len, texts)), "a ~ result")
        return self.produced("".join(texts))

    def _parse(self, source, name, filename):
        tree = super()._parse(source, name, filename)
        for loop in tree.find_all(nodes.For):
            loop.iter = nodes.Call(nodes.EnvironmentAttribute("budget_iter"), [loop.iter], [], None, None,
                                   lineno=loop.lineno)
        for concat in tree.find_all(nodes.Concat):
            concat.nodes = [nodes.Call(nodes.EnvironmentAttribute("budget_concat"), list(concat.nodes), [], None, None,
                                       lineno=concat.lineno)]
        return tree

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (the sandbox's own signature)
        __self.tick()
        _check_ints(args)
        _check_ints(kwargs.values())
        # str.format reaches here wrapped by the sandbox (wrap_str_format), with the method as __wrapped__
        owner = getattr(getattr(__obj, "__wrapped__", __obj), "__self__", None)
        if isinstance(owner, str):
            method = getattr(getattr(__obj, "__wrapped__", __obj), "__name__", "")
            if method == "join" and args:
                items = list(args[0])
                _check_size(_join_size(owner, items), "a join result")
                args = (items, *args[1:])
            _check_str_call(method, owner, args, kwargs)
        return __self.produced(super().call(__context, __obj, *args, **kwargs))

    def call_binop(self, context, operator, left, right):
        self.tick()
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if _size(seq) and isinstance(n, int):
                    _check_size(_size(seq) * max(n, 0), "a repeated value")
        elif operator == "+":
            _check_size(_size(left) + _size(right), "a concatenation")
        elif operator == "%" and isinstance(left, str):
            _check_format(left, right if isinstance(right, tuple) else (right,))
        if isinstance(left, int) and isinstance(right, int) and operator in ("*", "**"):
            bits = left.bit_length() + right.bit_length() if operator == "*" else (
                left.bit_length() * right if abs(left) > 1 and right > 0 else 0)
            if bits > MAX_INT_BITS:
                raise _OverBudget(f"a number of about {bits:,} bits, more than {MAX_INT_BITS:,}")
        return self.produced(super().call_binop(context, operator, left, right))

    def _budgeted_filter(self, name: str, f):
        passes_context = _PassArg.from_obj(f) is not None  # then the filtered value is the second argument

        @functools.wraps(f)  # keeps Jinja's pass_context / pass_eval_context / pass_environment marker
        def budgeted(*args, **kwargs):
            self.tick()
            head, value, rest = args[:passes_context], args[passes_context:passes_context + 1], args[passes_context + 1:]
            _check_ints(rest)
            _check_ints(kwargs.values())
            if name == "join" and value and not isinstance(value[0], (str, bytes)):
                items = list(value[0])
                sep = rest[0] if rest else kwargs.get("d", "")
                _check_size(_join_size(sep if isinstance(sep, str) else "", items), "a join result")
                args = (*head, items, *rest)
            elif value and isinstance(value[0], str):
                _check_str_call(name, value[0], rest, kwargs)
            return self.produced(f(*args, **kwargs))

        return budgeted


class _BudgetedTemplate:
    """Template.render, with the output size checked as it is produced."""

    def __init__(self, env: _BudgetedEnvironment, template: jinja2.Template):
        self.env, self.template = env, template

    def render(self, *args, **kwargs) -> str:
        out, size = [], 0
        with self.env.budget():
            for piece in self.template.generate(*args, **kwargs):
                size += len(piece)
                _check_size(size, "a prompt")
                self.env.tick()
                out.append(piece)
        return "".join(out)


def _budget_errors(fn):
    """Run fn, turning every way a template can exceed the budget into TemplateBudgetError."""
    try:
        return fn()
    except _OverBudget as ex:
        raise TemplateBudgetError(str(ex)) from None
    except MemoryError:
        raise TemplateBudgetError("it needs more memory than there is") from None
    except RecursionError:
        raise TemplateBudgetError("it recurses too deeply") from None
    except OverflowError as ex:  # the sandbox's range() limit, or a number too large
        raise TemplateBudgetError(str(ex).rstrip(".")) from None


class BudgetedChatFormatter(Jinja2ChatFormatter):
    """llama-cpp-python's Jinja2ChatFormatter (same environment options, variables and response), rendering under
    the budget. Raises TemplateBudgetError for a template over it, jinja2.TemplateError for one that is not Jinja."""

    def __init__(self, template: str, eos_token: str, bos_token: str, add_generation_prompt: bool = True,
                 stop_token_ids: list[int] | None = None):
        # Not Jinja2ChatFormatter.__init__: its compile step already folds constants like 'A' * 10**11.
        self.template = template
        self.eos_token = eos_token
        self.bos_token = bos_token
        self.add_generation_prompt = add_generation_prompt
        self.stop_token_ids = set(stop_token_ids) if stop_token_ids is not None else None
        env = _BudgetedEnvironment(loader=jinja2.BaseLoader(), trim_blocks=True, lstrip_blocks=True,
                                   extensions=[Jinja2ChatFormatter.IgnoreGenerationTags, jinja2.ext.loopcontrols])
        env.filters["tojson"] = env._budgeted_filter("tojson", self.tojson)

        def compile_template():
            with env.budget():
                return env.from_string(template)

        self._environment = _BudgetedTemplate(env, _budget_errors(compile_template))

    def __call__(self, **kwargs):
        return _budget_errors(lambda: super(BudgetedChatFormatter, self).__call__(**kwargs))


_PROBES = ([{"role": "user", "content": "Hello"}],
           [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "Hello"},
            {"role": "assistant", "content": "Hi! How can I help?"}, {"role": "user", "content": "What is GGUF?"}])


def check_chat_template(template: str, *, bos_token: str, eos_token: str, where: str) -> None:
    """Render probe conversations once (when a model is loaded); raise TemplateBudgetError naming ``where`` (e.g.
    "tokenizer.chat_template of M.gguf") for a template over the budget. A template's own errors (invalid Jinja,
    raise_exception on a system message) are left to the caller's usual handling."""
    try:
        formatter = BudgetedChatFormatter(template, eos_token=eos_token, bos_token=bos_token)
        for messages in _PROBES:
            try:
                formatter(messages=messages)
            except TemplateBudgetError:
                raise
            except Exception:  # noqa: BLE001 - the template's own refusal, not a budget problem
                continue
    except TemplateBudgetError as ex:
        raise TemplateBudgetError(ex.reason, where) from None
    except jinja2.TemplateError:
        return
