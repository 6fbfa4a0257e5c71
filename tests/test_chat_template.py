"""The Jinja chat template our GGUFs carry renders exactly what the encoder renders, in the engines that read it.

Conversations are written as GGUF tools pass them (OpenAI-style dicts) and converted to our typed messages for
`encoding.render`; the template is rendered by transformers' own chat-template renderer (the environment
llama-cpp-python copies) and, in the slow test, by llama-cpp-python from the GGUF's metadata.
"""

from __future__ import annotations

import json

import pytest
from transformers.utils.chat_template_utils import render_jinja_template

from v4cli.prompt import encoding as E
from v4cli.prompt.template import chat_template

TEMPLATE = chat_template()


def render_template(messages, tools=None, add_generation_prompt=True, template=TEMPLATE, **kwargs) -> str:
    out, _ = render_jinja_template(conversations=[messages], tools=tools, chat_template=template,
                                   add_generation_prompt=add_generation_prompt, **kwargs)
    return out[0]


def typed(messages) -> list[E.Message]:
    """OpenAI-style message dicts → the encoder's messages (the template's input contract)."""
    out: list[E.Message] = []
    for m in messages:
        role = m["role"]
        if role in ("system", "developer"):
            out.append(E.System(m["content"]))
        elif role == "user":
            out.append(E.User(m["content"]))
        elif role == "tool":
            out.append(E.ToolResult(m["content"], m.get("tool_call_id")))
        else:
            calls = []
            for tc in m.get("tool_calls") or ():
                fn = tc.get("function", tc)
                args = fn.get("arguments") or {}
                calls.append(E.ToolCall(fn["name"], json.loads(args) if isinstance(args, str) else args, tc.get("id")))
            out.append(E.Assistant(m.get("content") or "", m.get("reasoning_content"), tuple(calls)))
    return out


# ---------------------------------------------------------------- conversations

WEATHER = {"type": "function", "function": {
    "name": "get_weather",
    "description": "Weather for a city; \"quoted\", back\\slash, tab\there, ünïcödé 天气 ☀",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "description": "line one\nline two"},
        "days": {"type": "integer", "minimum": 1, "maximum": 16, "default": 3},
        "units": {"type": "string", "enum": ["metric", "imperial"], "nullable": None},
        "detail": {"type": "boolean", "default": False}, "ratio": {"type": "number", "default": 0.25},
        "extra": {"type": "object", "properties": {}, "additionalProperties": True}},
        "required": ["city"]}}}
SEARCH = {"name": "search", "description": "Plain (not OpenAI-wrapped) schema", "parameters": {
    "type": "object", "properties": {"q": {"type": "string"}, "k": {"type": "integer"}}, "required": []}}
TOOLS = [WEATHER, SEARCH]

# Non-string values exercise every JSON branch; strings go raw with string="true".
ARGS = {"city": "Zürich \"HB\"\nline 2", "days": 3, "detail": True, "units": None, "ratio": 1.5e-07,
        "extra": {"nested": [1, 2.5, "x\ty", {"deep": False}], "empty": {}, "list": []}, "big": 10**20,
        "neg": -4, "text_list": ["a\\b", "c\"d", "é"]}

SYS_USER = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hello there"}]
USER_ONLY = [{"role": "user", "content": "2+2?"}]
MULTI_TURN = [
    {"role": "system", "content": "Be helpful."},
    {"role": "user", "content": "First question"},
    {"role": "assistant", "content": "First answer", "reasoning_content": "thinking about the first"},
    {"role": "user", "content": "Second question"},
    {"role": "assistant", "content": "Second answer", "reasoning_content": "thinking about the second"},
    {"role": "user", "content": "Third"},
]
MERGED_USERS = [{"role": "user", "content": "part one"}, {"role": "user", "content": "part two"}]
MID_SYSTEM = [{"role": "user", "content": "hi"}, {"role": "system", "content": "new rule"},
              {"role": "user", "content": "again"}]
# Results come back out of call order (by id) and with a user note among them: they are put back in call order.
TOOL_ROUND = [
    {"role": "system", "content": "Use tools."},
    {"role": "user", "content": "Weather in Zürich and search docs"},
    {"role": "assistant", "content": None, "reasoning_content": "need two tools", "tool_calls": [
        {"id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": ARGS}},
        {"id": "call_b", "type": "function", "function": {"name": "search", "arguments": {"q": "docs", "k": 2}}},
        {"id": "call_c", "type": "function", "function": {"name": "search", "arguments": {}}}]},
    {"role": "tool", "tool_call_id": "call_c", "content": "nothing"},
    {"role": "user", "content": "(a note between results)"},
    {"role": "tool", "tool_call_id": "call_b", "content": "found docs"},
    {"role": "tool", "tool_call_id": "call_a", "content": "{\"temp\": 21}"},
]
TOOL_TWO_ROUNDS = TOOL_ROUND + [
    {"role": "assistant", "content": "Partial answer", "reasoning_content": "one more", "tool_calls": [
        {"type": "function", "function": {"name": "search", "arguments": {"q": "more"}}}]},
    {"role": "tool", "content": "no id 1"},
    {"role": "tool", "content": "no id 2"},
    {"role": "assistant", "content": "Done.", "reasoning_content": "final thoughts"},
    {"role": "user", "content": "Thanks, and tomorrow?"},
]
UNWRAPPED_CALL = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "", "tool_calls": [
    {"name": "search", "arguments": {"q": "plain call"}, "id": "x"}]}, {"role": "tool", "content": "r",
                                                                         "tool_call_id": "x"}]

CONVERSATIONS = {
    "system+user": (SYS_USER, None),
    "user only": (USER_ONLY, None),
    "multi-turn drops reasoning": (MULTI_TURN, None),
    "multi-turn with tools keeps reasoning": (MULTI_TURN, TOOLS),
    "tools without system": (USER_ONLY, TOOLS),
    "merged user messages": (MERGED_USERS, None),
    "system mid-conversation": (MID_SYSTEM, None),
    "tool calls and results": (TOOL_ROUND, TOOLS),
    "tool calls, no tools given": (TOOL_ROUND, None),
    "two tool rounds": (TOOL_TWO_ROUNDS, TOOLS),
    "unwrapped tool call": (UNWRAPPED_CALL, [SEARCH]),
}

# Template inputs → the encoder's mode (nothing given = the encoder's default, high).
MODES = {
    "default": ({}, E.Mode.HIGH),
    "enable_thinking=false": ({"enable_thinking": False}, E.Mode.NON_THINK),
    "enable_thinking=true": ({"enable_thinking": True}, E.Mode.HIGH),
    "reasoning_effort=max": ({"reasoning_effort": "max"}, E.Mode.MAX),
    "reasoning_effort=high": ({"reasoning_effort": "high"}, E.Mode.HIGH),
    "reasoning_effort=none": ({"reasoning_effort": "none"}, E.Mode.NON_THINK),
    "thinking_mode=non-think": ({"thinking_mode": "non-think"}, E.Mode.NON_THINK),
    "thinking_mode=max": ({"thinking_mode": "max"}, E.Mode.MAX),
    "enable_thinking=false beats effort": ({"enable_thinking": False, "reasoning_effort": "max"}, E.Mode.NON_THINK),
    "enable_thinking=true, effort max": ({"enable_thinking": True, "reasoning_effort": "max"}, E.Mode.MAX),
}


def _grid():
    for cname, (msgs, tools) in CONVERSATIONS.items():
        for mname, (kwargs, mode) in MODES.items():
            yield pytest.param(msgs, tools, kwargs, mode, id=f"{cname}/{mname}")


@pytest.mark.parametrize(("messages", "tools", "kwargs", "mode"), _grid())
def test_generation_prompt_matches_encoder(messages, tools, kwargs, mode):
    assert render_template(messages, tools, **kwargs) == E.render(typed(messages), mode, tools)


@pytest.mark.parametrize(("kwargs", "mode"), list(MODES.values()), ids=list(MODES))
@pytest.mark.parametrize("name", ["multi-turn drops reasoning", "tool calls and results", "two tool rounds"])
def test_without_generation_prompt(name, kwargs, mode):
    """add_generation_prompt=false: a conversation ending with an assistant turn renders as the encoder renders
    it whole; one ending with a user turn stops before the final `<｜Assistant｜>` + think tag."""
    msgs, tools = CONVERSATIONS[name]
    ended = msgs[:-1] if msgs[-1]["role"] == "user" else msgs + [{"role": "assistant", "content": "ok"}]
    assert ended[-1]["role"] == "assistant"
    assert render_template(ended, tools, add_generation_prompt=False, **kwargs) == \
        E.render_conversation(typed(ended), mode, tools)
    # generation on: nothing is added after an assistant turn, as in the encoder
    assert render_template(ended, tools, add_generation_prompt=True, **kwargs) == \
        E.render_conversation(typed(ended), mode, tools)
    full = E.render(typed(msgs), mode, tools)
    tail = E.ASSISTANT + (E.THINK_START if mode.thinking else E.THINK_END)
    assert full.endswith(tail)
    assert render_template(msgs, tools, add_generation_prompt=False, **kwargs) == full[: -len(tail)]


@pytest.mark.parametrize("dumps", [
    pytest.param(lambda a: json.dumps(a, ensure_ascii=False), id="json.dumps"),
    pytest.param(lambda a: json.dumps(a, ensure_ascii=False, separators=(",", ":")), id="compact"),
    pytest.param(lambda a: json.dumps(a, ensure_ascii=False, indent=2), id="indented"),
])
@pytest.mark.parametrize("mode_name", ["default", "enable_thinking=false"])
def test_arguments_as_json_string(dumps, mode_name):
    """OpenAI clients send `arguments` as a JSON string: same DSML as the parsed mapping, whatever the spacing."""
    kwargs, mode = MODES[mode_name]
    msgs = json.loads(json.dumps(TOOL_TWO_ROUNDS))
    for m in msgs:
        for tc in m.get("tool_calls") or ():
            tc["function"]["arguments"] = dumps(tc["function"]["arguments"])
    assert isinstance(msgs[2]["tool_calls"][0]["function"]["arguments"], str)
    assert render_template(msgs, TOOLS, **kwargs) == E.render(typed(msgs), mode, TOOLS)


@pytest.mark.parametrize("value", [
    "plain", "", "quote \" backslash \\ slash /", "controls \n \r \t \b \f \v", "ünïcödé 中文 😀",
    "\\n not a newline",
    0, -7, 10**30, 0.1, 1.5e-07, 1e+22, True, False, None, [], {}, [None, True, 1, "s", [[]], {"k": [{}]}],
    {"ключ": "значение", "a\"b": {"c\\d": [1.0, -0.0]}},
], ids=repr)
def test_json_spelling_matches_json_dumps(value):
    """Parameter values and schemas: the template's JSON is json.dumps(ensure_ascii=False), byte for byte."""
    call = {"role": "assistant", "content": "", "tool_calls": [
        {"id": "1", "type": "function", "function": {"name": "f", "arguments": {"p": value, "q": [value]}}}]}
    tool = {"type": "function", "function": {"name": "f", "description": value if isinstance(value, str) else "d",
                                             "parameters": {"default": value}}}
    msgs = [{"role": "user", "content": "u"}, call, {"role": "tool", "content": "r", "tool_call_id": "1"}]
    for args in (call["tool_calls"][0]["function"]["arguments"], json.dumps({"p": value, "q": [value]},
                                                                            ensure_ascii=False)):
        call["tool_calls"][0]["function"]["arguments"] = args
        assert render_template(msgs, [tool]) == E.render(typed(msgs), E.Mode.HIGH, [tool])


def test_empty_conversation_and_tools_only():
    assert render_template([], None) == E.render_conversation([], E.Mode.MAX) == E.BOS
    assert render_template([], TOOLS, reasoning_effort="max") == E.render_conversation([], E.Mode.MAX, TOOLS)


def test_llama_cpp_recognises_the_dsml_format():
    # llama-server picks its DeepSeek V3.2/V4 tool-call parser when the template source has these substrings
    assert "dsml_token" in TEMPLATE and "DSML" in TEMPLATE and "tool_calls" in TEMPLATE
    assert "function_calls" not in TEMPLATE  # that would select the V3.2 variant


def test_output_does_not_depend_on_block_trimming():
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    msgs, tools = CONVERSATIONS["two tool rounds"]
    want = E.render(typed(msgs), E.Mode.MAX, tools)
    for trim in (True, False):
        env = ImmutableSandboxedEnvironment(trim_blocks=trim, lstrip_blocks=trim)
        assert env.from_string(TEMPLATE).render(messages=msgs, tools=tools, add_generation_prompt=True,
                                                reasoning_effort="max") == want


@pytest.mark.parametrize(("old", "new"), [
    ("Absolute maximum with no shortcuts", "Absolute maximum, no shortcuts"),  # the max prefix
    ("'<think>'", "'<think> '"),
    ("'\\n</' ~ dsml_token ~ 'invoke>'", "'</' ~ dsml_token ~ 'invoke>'"),
    ("thinking and (keep or i > ns.last_user)", "thinking"),  # the reasoning-drop rule
    ("q.rank * 1000000", "0 * 1000000"),  # tool results back in call order
    ("replace('\\t', '\\\\t')", "replace('\\t', '\\t')"),  # JSON escaping
])
def test_a_drifted_template_fails(old, new):
    """The comparisons above catch a template that drifts from the encoder."""
    assert old in TEMPLATE
    drifted = TEMPLATE.replace(old, new)
    differs = []
    for msgs, tools, kwargs, mode in (p.values for p in _grid()):
        differs.append(render_template(msgs, tools, template=drifted, **kwargs) != E.render(typed(msgs), mode, tools))
    assert any(differs)


# ---------------------------------------------------------------- llama-cpp-python reads it from the GGUF


@pytest.mark.llama
@pytest.mark.slow
def test_llama_cpp_python_formats_prompts_from_our_gguf(tiny_gguf):
    llama_cpp = pytest.importorskip("llama_cpp")
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    llm = llama_cpp.Llama(model_path=str(tiny_gguf("lossless")), vocab_only=True, verbose=False)
    assert llm.metadata["tokenizer.chat_template"] == TEMPLATE
    assert llm.chat_format == "chat_template.default"  # our template, not a guessed built-in format
    # the formatter llama-cpp-python builds for that chat format (llama.py): tokens' text from the vocabulary
    bos, eos = llm.token_bos(), llm.token_eos()
    formatter = Jinja2ChatFormatter(template=llm.metadata["tokenizer.chat_template"],
                                    eos_token=llm._model.token_get_text(eos), bos_token=llm._model.token_get_text(bos),
                                    stop_token_ids=[eos])
    for name in ("multi-turn drops reasoning", "two tool rounds"):
        msgs, tools = CONVERSATIONS[name]
        for kwargs, mode in (MODES["default"][0], E.Mode.HIGH), ({"reasoning_effort": "max"}, E.Mode.MAX), \
                ({"enable_thinking": False}, E.Mode.NON_THINK):
            result = formatter(messages=msgs, tools=tools, **kwargs)
            want = E.render(typed(msgs), mode, tools)
            assert result.prompt == want, (name, kwargs)
            assert result.stop == [E.EOS]
            # our encoder writes BOS as text; llama.cpp adds none (add_bos_token is false) and parses it as id 0
            ids = llm.tokenize(result.prompt.encode(), add_bos=False, special=True)
            assert ids[0] == E.BOS_ID and ids.count(E.BOS_ID) == 1
            assert ids == E.encode(typed(msgs), mode, tools)
