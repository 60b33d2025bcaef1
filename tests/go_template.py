"""A small renderer for the part of Go's text/template that Ollama TEMPLATEs use, written from Go's documentation
(https://pkg.go.dev/text/template) and independent of cl3's translator. Tests use it when the Go toolchain is absent
and check it against real Go when it is present.

Supported: text; {{- -}} trimming; if / else if / else / end; range PIPE, range $e := PIPE, range $i, $e := PIPE (with
else); $x := PIPE and $x = PIPE; fields (.A.B, $x.A, $.A, .); string, number and bool constants; parentheses; the
functions eq ne lt le gt ge and or not len index slice print.
"""

from __future__ import annotations

import json
import re

_TOKEN = re.compile(r'\s*(?:(?P<str>"(?:[^"\\]|\\.)*")|(?P<raw>`[^`]*`)|(?P<num>-?\d+(?:\.\d+)?)|(?P<op>:=|=|,|\||\(|\))|'
                    r"(?P<var>\$[A-Za-z0-9_]*(?:\.[A-Za-z0-9_]+)*)|(?P<field>(?:\.[A-Za-z0-9_]+)+|\.)|"
                    r"(?P<ident>[A-Za-z_][A-Za-z0-9_]*))")


class GoTemplateError(Exception):
    pass


def _action_end(src: str, i: int) -> int:
    """Where the action starting at i ends ("}}" outside string constants)."""
    quote = None
    while i < len(src):
        c = src[i]
        if quote:
            if c == "\\" and quote == '"':
                i += 1
            elif c == quote:
                quote = None
        elif c in "\"`":
            quote = c
        elif src.startswith("}}", i):
            return i
        i += 1
    raise GoTemplateError("unclosed action")


def _lex(code: str) -> list[tuple[str, str]]:
    out, pos, code = [], 0, code.strip()
    while pos < len(code):
        m = _TOKEN.match(code, pos)
        if not m or m.end() == pos:
            raise GoTemplateError(f"cannot parse {code[pos:]!r}")
        out.append((m.lastgroup, m.group(m.lastgroup)))
        pos = m.end()
    return out


def _parse(src: str) -> list:
    """Nodes: ("text", s) | ("out", expr) | ("if", [(expr, body)...], else) | ("range", vars, expr, body, else)
    | ("set", name, expr, declare)."""
    items = []  # ("text", s) | ("act", tokens)
    pos = 0
    while (start := src.find("{{", pos)) >= 0:
        end = _action_end(src, start + 2)
        text, code = src[pos:start], src[start + 2:end]
        if code.startswith("- "):
            text, code = text.rstrip(" \t\r\n"), code[2:]
        trim_after = code.endswith(" -")
        items.append(("text", text))
        items.append(("act", _lex(code[:-2] if trim_after else code)))
        pos = end + 2
        if trim_after:
            rest = src[pos:]
            pos += len(rest) - len(rest.lstrip(" \t\r\n"))
    items.append(("text", src[pos:]))

    def block(i: int, stops: tuple[str, ...]):
        nodes = []
        while i < len(items):
            kind, val = items[i]
            if kind == "text":
                if val:
                    nodes.append(("text", val))
                i += 1
                continue
            head = val[0][1] if val and val[0][0] == "ident" else None
            if head in stops:
                return nodes, i
            if head == "if":
                branches, cond = [], val[1:]
                while True:
                    body, i = block(i + 1, ("else", "end"))
                    branches.append((cond, body))
                    kind, val = items[i]
                    if val[0][1] == "end":
                        nodes.append(("if", branches, []))
                        break
                    if len(val) > 1 and val[1] == ("ident", "if"):
                        cond = val[2:]
                        continue
                    other, i = block(i + 1, ("end",))
                    nodes.append(("if", branches, other))
                    break
                i += 1
            elif head == "range":
                rest = val[1:]
                names = []
                if any(t == ("op", ":=") for t in rest):
                    k = rest.index(("op", ":="))
                    names = [t[1] for t in rest[:k] if t[0] == "var"]
                    rest = rest[k + 1:]
                body, i = block(i + 1, ("else", "end"))
                other = []
                if items[i][1][0][1] == "else":
                    other, i = block(i + 1, ("end",))
                nodes.append(("range", names, rest, body, other))
                i += 1
            elif len(val) >= 2 and val[0][0] == "var" and val[1][0] == "op" and val[1][1] in (":=", "="):
                nodes.append(("set", val[0][1], val[2:], val[1][1] == ":="))
                i += 1
            else:
                nodes.append(("out", val))
                i += 1
        if stops:
            raise GoTemplateError(f"missing {{{{ end }}}} (expected one of {stops})")
        return nodes, i

    nodes, _ = block(0, ())
    return nodes


def _truth(v) -> bool:
    """Go's truth: false, 0, nil and empty strings, slices and maps are false."""
    if v is None or isinstance(v, bool):
        return bool(v)
    if isinstance(v, (int, float)):
        return v != 0
    if isinstance(v, (str, list, tuple, dict)):
        return len(v) > 0
    return True


def _field(v, names: list[str]):
    for name in names:
        if isinstance(v, dict):
            v = v.get(name)
        else:
            v = getattr(v, name, None)
    return v


_FUNCS = {
    "eq": lambda a, *bs: any(a == b for b in bs),
    "ne": lambda a, b: a != b,
    "lt": lambda a, b: a < b, "le": lambda a, b: a <= b, "gt": lambda a, b: a > b, "ge": lambda a, b: a >= b,
    "not": lambda a: not _truth(a),
    "len": lambda a: len(a),
    "index": lambda a, *ks: _index(a, ks),
    "slice": lambda a, *ix: a[ix[0]:ix[1]] if len(ix) == 2 else a[ix[0]:] if ix else a,
    "print": lambda *a: "".join(_show(x) for x in a),
}


def _index(a, keys):
    for k in keys:
        a = a[k]
    return a


def _show(v) -> str:
    if v is None:
        return "<no value>"
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


class _Scope:
    def __init__(self, root):
        self.frames = [{"$": root}]

    def get(self, name):
        for f in reversed(self.frames):
            if name in f:
                return f[name]
        raise GoTemplateError(f"undefined variable {name}")

    def assign(self, name, value):
        for f in reversed(self.frames):
            if name in f:
                f[name] = value
                return
        raise GoTemplateError(f"undefined variable {name}")


def _eval(tokens, dot, scope: _Scope):
    """A pipeline: commands separated by |, each command's value passed as the last argument of the next."""
    commands, depth, start = [], 0, 0
    for i, (kind, val) in enumerate(tokens):
        if kind == "op":
            depth += {"(": 1, ")": -1}.get(val, 0)
            if val == "|" and depth == 0:
                commands.append(tokens[start:i])
                start = i + 1
    commands.append(tokens[start:])
    value, piped = None, False
    for command in commands:
        value = _command(command, dot, scope, (value,) if piped else ())
        piped = True
    return value


def _command(tokens, dot, scope: _Scope, extra: tuple):
    def term(i):
        kind, val = tokens[i]
        if kind == "op" and val == "(":
            j, depth = i + 1, 1
            while depth:
                depth += {"(": 1, ")": -1}.get(tokens[j][1], 0) if tokens[j][0] == "op" else 0
                j += 1
            return _eval(tokens[i + 1:j - 1], dot, scope), j
        if kind == "str":
            return json.loads(val), i + 1
        if kind == "raw":
            return val[1:-1], i + 1
        if kind == "num":
            return (float(val) if "." in val else int(val)), i + 1
        if kind == "field":
            return (dot if val == "." else _field(dot, val[1:].split("."))), i + 1
        if kind == "var":
            name, *path = val.split(".")
            return _field(scope.get(name), path), i + 1
        if kind == "ident" and val in ("true", "false"):
            return val == "true", i + 1
        if kind == "ident" and val == "nil":
            return None, i + 1
        raise GoTemplateError(f"unexpected {val!r}")

    if tokens and tokens[0][0] == "ident" and tokens[0][1] not in ("true", "false", "nil"):
        name = tokens[0][1]
        if name in ("and", "or") and not extra:  # short-circuit, returning the deciding argument like Go
            i, value = 1, None
            while i < len(tokens):
                value, i = term(i)
                if _truth(value) != (name == "and"):
                    return value
            return value
        if name not in _FUNCS:
            raise GoTemplateError(f"function {name!r} not defined")
        args, i = [], 1
        while i < len(tokens):
            value, i = term(i)
            args.append(value)
        return _FUNCS[name](*args, *extra)
    value, i = term(0)
    if i != len(tokens) or extra:
        raise GoTemplateError(f"extra tokens in {tokens}")
    return value


def _exec(nodes, dot, scope: _Scope, out: list[str]) -> None:
    for node in nodes:
        kind = node[0]
        if kind == "text":
            out.append(node[1])
        elif kind == "out":
            out.append(_show(_eval(node[1], dot, scope)))
        elif kind == "set":
            _, name, expr, declare = node
            value = _eval(expr, dot, scope)
            if declare:
                scope.frames[-1][name] = value
            else:
                scope.assign(name, value)
        elif kind == "if":
            _, branches, other = node
            for cond, body in branches:
                if _truth(_eval(cond, dot, scope)):
                    scope.frames.append({})
                    _exec(body, dot, scope, out)
                    scope.frames.pop()
                    break
            else:
                scope.frames.append({})
                _exec(other, dot, scope, out)
                scope.frames.pop()
        elif kind == "range":
            _, names, expr, body, other = node
            seq = _eval(expr, dot, scope) or []
            items = list(seq.items()) if isinstance(seq, dict) else list(enumerate(seq))
            if not items:
                _exec(other, dot, scope, out)
            for key, elem in items:
                frame = {}
                if len(names) == 1:
                    frame[names[0]] = elem
                elif len(names) == 2:
                    frame[names[0]], frame[names[1]] = key, elem
                scope.frames.append(frame)
                _exec(body, elem, scope, out)
                scope.frames.pop()


def render(template: str, data) -> str:
    out: list[str] = []
    _exec(_parse(template), data, _Scope(data), out)
    return "".join(out)
