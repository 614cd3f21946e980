"""Tool calls (OpenAI's function calling) as text: how a conversation with tools is rendered, how a
reply's calls are read back, and the grammar that makes a model call a tool with valid arguments.

Rendering goes through the one formatter (rlhf_engine/data/formatter.py). A tokenizer whose chat
template knows tools renders them itself — Hermes style (`<tool_call>` blocks: Qwen2, Qwen2.5, Qwen3,
SmolLM3, Hermes) or Llama-3 style (a JSON object `{"name", "parameters"}`: Llama 3.1–3.3). Any other
template (SmolLM2's, the bundled tiny models') gets the Hermes layout written into its plain turns: the
tool list in the system turn, each call an assistant turn's `<tool_call>` block, each tool result a user
turn's `<tool_response>` block — the same text Qwen2.5's template writes, so a model fine-tuned here on
OpenAI's function-calling rows learns the layout it is served with.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from rlhf_engine.chat.errors import ChatRequestError

Style = Literal["hermes", "llama3", "house"]
MAX_TOOLS = 128
NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
# the JSON a template's `tojson` writes (json.dumps' default separators), so constrained calls are the
# text a model was trained on
_JSON = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}

HOUSE_HEADER = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
HOUSE_FOOTER = (
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": '
    "<args-json-object>}\n</tool_call>"
)


@dataclass(frozen=True)
class ToolCall:
    """A function call: its id, the function's name and its arguments as a JSON text."""

    name: str
    arguments: str
    id: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


def call_id() -> str:
    return f"call_{secrets.token_hex(12)}"


def style_of(tokenizer: Any) -> Style:
    """How a tokenizer's chat template writes tools (house: it does not; the Hermes layout is used)."""
    template = getattr(tokenizer, "chat_template", None) or ""
    if not isinstance(template, str) or "tools" not in template:
        return "house"
    if CALL_OPEN in template:
        return "hermes"
    if "<|python_tag|>" in template or "ipython" in template:
        return "llama3"
    return "house"


def function_of(tool: dict[str, Any]) -> dict[str, Any]:
    """The function of an OpenAI tool ({type: function, function: {...}}; a flat Responses-API tool too)."""
    return tool["function"] if isinstance(tool.get("function"), dict) else tool


def canonical(tool: dict[str, Any]) -> dict[str, Any]:
    """A tool's function as every prompt shows it — name, description, parameters, in that order — so a
    model sees the text it was trained on whatever order a client writes the keys in."""
    fn = function_of(tool)
    out: dict[str, Any] = {"name": fn.get("name")}
    if fn.get("description"):
        out["description"] = fn["description"]
    out["parameters"] = fn.get("parameters") or {"type": "object", "properties": {}}
    return out


def check(
    tools: Sequence[dict[str, Any]], choice: Any = "auto", where: str = "tools"
) -> list[dict[str, Any]]:
    """The tools' functions ({name, description, parameters}), checked: a `ChatRequestError` naming the
    field for a tool that is not a function, a bad or repeated name, parameters that are not a JSON
    schema the grammar engine compiles, or a `tool_choice` naming an absent tool."""
    from llguidance import LLMatcher

    if len(tools) > MAX_TOOLS:
        raise ChatRequestError(f"{where}: {len(tools)} tools, at most {MAX_TOOLS}", param=where)
    functions: list[dict[str, Any]] = []
    seen: set[str] = set()
    for i, tool in enumerate(tools):
        at = f"{where}[{i}]"
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            kind = tool.get("type") if isinstance(tool, dict) else type(tool).__name__
            raise ChatRequestError(
                f"{at}.type: {kind!r}: only function tools are supported", param=f"{at}.type"
            )
        fn = function_of(tool)
        if fn is tool and "name" not in tool:
            raise ChatRequestError(f"{at}.function: give {{name, parameters}}", param=f"{at}.function")
        at = f"{at}.function" if fn is not tool else at
        name = fn.get("name")
        if not isinstance(name, str) or not NAME.match(name):
            raise ChatRequestError(
                f"{at}.name: {name!r} must be 1-64 letters, digits, '_' or '-'", param=f"{at}.name"
            )
        if name in seen:
            raise ChatRequestError(
                f"{at}.name: {name!r} is given twice; tool names must differ", param=f"{at}.name"
            )
        seen.add(name)
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict):
            raise ChatRequestError(f"{at}.parameters: must be a JSON schema object", param=f"{at}.parameters")
        grammar = LLMatcher.grammar_from_json_schema(json.dumps(params), overrides=_JSON)  # type: ignore[arg-type]
        bad, messages = LLMatcher.validate_grammar_with_warnings(grammar)
        if bad:
            raise ChatRequestError(
                f"{at}.parameters: the schema cannot be compiled: {messages[0]}", param=f"{at}.parameters"
            )
        functions.append(canonical(fn))
    wanted = chosen(choice)
    if wanted not in (None, "auto", "none", "required") and wanted not in seen:
        raise ChatRequestError(f"tool_choice: no tool named {wanted!r} in tools", param="tool_choice")
    if wanted not in (None, "auto", "none") and not functions:
        raise ChatRequestError("tool_choice: give tools for the model to call", param="tool_choice")
    return functions


def calls_of(value: Any, where: str) -> list[dict[str, Any]]:
    """An assistant turn's `tool_calls` checked and in one shape — [{id, type: function, function: {name,
    arguments as JSON text}}] — or a `ChatRequestError` naming `where[j]…` (chat requests and training
    rows take the same calls)."""
    if not isinstance(value, list):
        raise ChatRequestError(
            f"{where}: must be a list of {{id, type: function, function: {{name, arguments}}}}", param=where
        )
    out = []
    for j, c in enumerate(value):
        fn = c.get("function") if isinstance(c, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise ChatRequestError(
                f"{where}[{j}].function: give {{name, arguments}}", param=f"{where}[{j}].function"
            )
        args = fn.get("arguments", "{}")
        if isinstance(args, dict):
            args = json.dumps(args, ensure_ascii=False)
        if not isinstance(args, str) or not isinstance(_arguments(args), dict):
            raise ChatRequestError(
                f"{where}[{j}].function.arguments: must be a JSON object (as a string)",
                param=f"{where}[{j}].function.arguments",
            )
        call_id = str(c.get("id") or f"call_{j}")
        out.append({"id": call_id, "type": "function", "function": {"name": fn["name"], "arguments": args}})
    return out


def chosen(choice: Any) -> str | None:
    """`tool_choice` as a word (auto, none, required) or the named function's name."""
    if choice is None or isinstance(choice, str):
        return choice
    if isinstance(choice, dict):
        fn = choice.get("function")
        name = fn.get("name") if isinstance(fn, dict) else choice.get("name")
        if isinstance(name, str):
            return name
    raise ChatRequestError(
        "tool_choice: give auto, none, required or {type: function, function: {name}}", param="tool_choice"
    )


# ---------------------------------------------------------------------------- rendering


def _arguments(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def template_messages(messages: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages as Hugging Face chat templates take them (a call's arguments as an object)."""
    out = []
    for m in messages:
        m = dict(m)
        if m.get("tool_calls"):
            m["tool_calls"] = [
                {
                    "type": "function",
                    "id": c.get("id", ""),
                    "function": {
                        "name": c["function"]["name"],
                        "arguments": _arguments(c["function"]["arguments"]),
                    },
                }
                for c in m["tool_calls"]
            ]
            m.setdefault("content", "")
        out.append(m)
    return out


def house_messages(
    messages: Sequence[dict[str, Any]], functions: Sequence[dict[str, Any]] | None
) -> list[dict[str, str]]:
    """A conversation with tools as plain turns in the Hermes layout (for templates without tools)."""
    out: list[dict[str, str]] = []
    if functions:
        block = (
            HOUSE_HEADER
            + "".join(
                "\n" + json.dumps({"type": "function", "function": f}, ensure_ascii=False) for f in functions
            )
            + HOUSE_FOOTER
        )
        if messages and messages[0]["role"] == "system":
            out.append({"role": "system", "content": messages[0]["content"] + "\n\n" + block})
            messages = messages[1:]
        else:
            out.append({"role": "system", "content": block})
    for m in messages:
        if m["role"] == "tool":
            text = f"<tool_response>\n{m.get('content') or ''}\n</tool_response>"
            if out and out[-1].get("tool") == "1":  # consecutive results share one user turn
                out[-1]["content"] += "\n" + text
            else:
                out.append({"role": "user", "content": text, "tool": "1"})
            continue
        if m["role"] == "assistant" and m.get("tool_calls"):
            out.append({"role": "assistant", "content": calls_text(m.get("content") or "", m["tool_calls"])})
            continue
        out.append({"role": m["role"], "content": m.get("content") or ""})
    return [{"role": m["role"], "content": m["content"]} for m in out]


def calls_text(content: str, calls: Sequence[dict[str, Any]]) -> str:
    """An assistant turn's text and calls as the Hermes layout writes them."""
    parts = [content] if content else []
    for c in calls:
        body = json.dumps(
            {"name": c["function"]["name"], "arguments": _arguments(c["function"]["arguments"])},
            ensure_ascii=False,
        )
        parts.append(f"{CALL_OPEN}\n{body}\n{CALL_CLOSE}")
    return "\n".join(parts)


# ---------------------------------------------------------------------------- the grammar


def grammar(
    functions: Sequence[dict[str, Any]], choice: str | None, parallel: bool, style: Style
) -> str | None:
    """The llguidance grammar that makes a reply call a tool (required, or the named one) with arguments
    that follow its schema; None when the model may answer in text (auto, none)."""
    if choice in (None, "auto", "none"):
        return None
    from llguidance import LLMatcher

    allowed = [f for f in functions if choice == "required" or f["name"] == choice]
    key = "parameters" if style == "llama3" else "arguments"
    bodies = [
        {
            "type": "object",
            "properties": {"name": {"const": f["name"]}, key: f.get("parameters") or {"type": "object"}},
            "required": ["name", key],
            "additionalProperties": False,
        }
        for f in allowed
    ]
    schema = (bodies[0] if len(bodies) == 1 else {"anyOf": bodies}) | {"x-guidance": _JSON}
    if style == "llama3":  # one call: the reply is the JSON object
        lark = f"start: %json {json.dumps(schema)}\n"
    else:
        many = ' ("\\n" call)*' if parallel else ""
        call = f'call: "{CALL_OPEN}\\n" body "\\n{CALL_CLOSE}"'
        lark = f"start: call{many}\n{call}\nbody: %json {json.dumps(schema)}\n"
    return str(LLMatcher.grammar_from_lark(lark))


# ---------------------------------------------------------------------------- reading calls back

_HERMES = re.compile(re.escape(CALL_OPEN) + r"\s*(.*?)\s*(?:" + re.escape(CALL_CLOSE) + r"|$)", re.DOTALL)


def parse(text: str, style: Style, names: set[str]) -> tuple[str | None, list[ToolCall]]:
    """A reply's text and its calls (each to a tool of `names`, with JSON-object arguments). A reply
    whose calls cannot be read is all text."""
    if style == "llama3":
        body = text.replace("<|python_tag|>", "").strip()
        call = _call(body, names, "parameters")
        return (None, [call]) if call else (text, [])
    start = text.find(CALL_OPEN)
    if start < 0:
        return text, []
    calls = []
    for m in _HERMES.finditer(text, start):
        call = _call(m.group(1), names, "arguments")
        if call is None:
            return text, []
        calls.append(call)
    content = text[:start].strip()
    return (content or None), calls


def _call(body: str, names: set[str], key: str) -> ToolCall | None:
    try:
        obj = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or obj.get("name") not in names:
        return None
    args = obj.get(key, obj.get("arguments", obj.get("parameters", {})))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(name=obj["name"], arguments=json.dumps(args, ensure_ascii=False), id=call_id())


class Reader:
    """Splits a streamed reply into text to show now and calls read at the end: text that may begin a
    call is held back (as a possible stop string is); once a call begins, the rest waits for the end."""

    def __init__(self, style: Style, names: set[str]) -> None:
        self.style, self.names = style, names
        self.text = ""  # everything seen
        self.shown = 0  # characters of `text` handed out
        self.calling = False

    def push(self, piece: str) -> str:
        self.text += piece
        if self.calling:
            return ""
        rest = self.text[self.shown :]
        if self.style == "llama3":
            lead = self.text.lstrip()
            if lead.startswith(("{", "<|python_tag|>")) or not lead:
                self.calling = bool(lead)
                return ""
            out, self.shown = rest, len(self.text)
            return out
        at = rest.find(CALL_OPEN)
        if at >= 0:
            self.calling = True
            out = rest[:at]
        else:
            out = rest[: len(rest) - _prefix_len(rest, CALL_OPEN)]
        if not self.text[: self.shown + len(out)].strip():  # only whitespace so far: wait for what follows
            return ""
        self.shown += len(out)
        return out

    def finish(self) -> tuple[str, list[ToolCall]]:
        """The text not handed out yet and the reply's calls."""
        _, calls = parse(self.text, self.style, self.names)
        if not calls:
            return self.text[self.shown :], []
        return "", calls


def _prefix_len(text: str, marker: str) -> int:
    """Characters at the end of `text` that could begin `marker`."""
    for n in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0
