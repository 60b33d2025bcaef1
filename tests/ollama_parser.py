"""A transcription of Ollama's Modelfile parser (github.com/ollama/ollama, parser/parser.go: ParseFile,
parseRuneForState, unquote), state for state, so tests read a written Modelfile exactly as `ollama create` would.
Independent of cl3's writer, which only avoids what this parser would misread."""

from __future__ import annotations

NIL, NAME, VALUE, PARAMETER, MESSAGE, COMMENT = range(6)
COMMANDS = {"from", "license", "template", "system", "adapter", "draft", "renderer", "parser", "parameter", "message",
            "requires"}


class ModelfileError(Exception):
    pass


def _is_space(r: str) -> bool:
    return r in " \t"


def _is_newline(r: str) -> bool:
    return r in "\r\n"


def _is_alpha(r: str) -> bool:
    return "a" <= r <= "z" or "A" <= r <= "Z"


def _is_print(r: str) -> bool:  # Go's strconv.IsPrint: letters, marks, numbers, punctuation, symbols, ASCII space
    return r.isprintable()


def _go_trim_space(s: str) -> str:
    return s.strip("\t\n\v\f\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a"
                   "\u2028\u2029\u202f\u205f\u3000")


def _unquote(s: str) -> tuple[str, bool]:
    if s[:3] == '"""':
        if len(s) >= 6 and s[-3:] == '"""':
            return s[3:-3], True
        return "", False
    if s[:1] == '"':
        if len(s) >= 2 and s[-1] == '"':
            return s[1:-1], True
        return "", False
    return s, True


def _next_state(r: str, cs: int) -> tuple[int, str | None]:
    """parseRuneForState: (next state, rune to keep or None)."""
    if cs == NIL:
        if r == "#":
            return COMMENT, None
        if _is_space(r) or _is_newline(r):
            return NIL, None
        return NAME, r
    if cs == NAME:
        if _is_alpha(r):
            return NAME, r
        if _is_space(r):
            return VALUE, None
        raise ModelfileError("invalid command")
    if cs == VALUE:
        return (NIL, r) if _is_newline(r) or _is_space(r) else (VALUE, r)
    if cs == PARAMETER:
        if _is_alpha(r) or r.isdigit() and r.isascii() or r == "_":
            return PARAMETER, r
        if _is_space(r):
            return VALUE, None
        raise ModelfileError("unexpected EOF")
    if cs == MESSAGE:
        if _is_alpha(r):
            return MESSAGE, r
        if _is_space(r):
            return VALUE, None
        raise ModelfileError("unexpected EOF")
    if cs == COMMENT:
        return (NIL, None) if _is_newline(r) else (COMMENT, None)
    raise ModelfileError("bad state")


def parse(text: str) -> list[tuple[str, str]]:
    """The (name, args) commands of a Modelfile, as ParseFile returns them ("model" for FROM, the parameter's name
    for PARAMETER)."""
    commands: list[tuple[str, str]] = []
    name, role, buf, curr = "", "", "", NIL
    for r in text:
        nxt, kept = _next_state(r, curr)
        if nxt != curr:
            if curr == NAME:
                if buf.lower() not in COMMANDS:
                    raise ModelfileError(f"invalid command {buf!r}")
                s = buf.lower()
                if s == "from":
                    name = "model"
                elif s == "parameter":
                    nxt = PARAMETER
                elif s == "message":
                    nxt, name = MESSAGE, s
                else:
                    name = s
            elif curr == PARAMETER:
                name = buf
            elif curr == MESSAGE:
                role = buf
            elif curr == VALUE:
                s, ok = _unquote(_go_trim_space(buf))
                if not ok or _is_space(r):
                    buf += r
                    continue
                if role:
                    s, role = role + ": " + s, ""
                commands.append((name, s))
            buf, curr = "", nxt
        if kept is not None and _is_print(kept):
            buf += kept
    if curr == VALUE:
        s, ok = _unquote(_go_trim_space(buf))
        if not ok:
            raise ModelfileError("unexpected EOF")
        commands.append((name, role + ": " + s if role else s))
    elif curr not in (NIL, COMMENT):
        raise ModelfileError("unexpected EOF")
    if not any(n == "model" for n, _ in commands):
        raise ModelfileError("no FROM line")
    return commands
