"""Prompt encoder (exact strings and ids of DeepSeek's encoding_dsv4.py format) and the streaming parser."""

from __future__ import annotations

import random

import pytest

from quant.errors import BadInput, NotFoundError
from v4cli.prompt import (
    MAX_MIN_CONTEXT,
    Assistant,
    Mode,
    PromptTokenizer,
    System,
    ToolCall,
    ToolResult,
    User,
    check_context,
    encode,
    load_tokenizer,
    render,
    render_conversation,
    render_extension,
    stable_prefix,
)
from v4cli.prompt.encoding import default_tokenizer_path, render_tool_calls
from v4cli.prompt.parser import (
    ContentDelta,
    End,
    ParseError,
    ReasoningDelta,
    StreamParser,
    ToolCallEvent,
    merge_deltas,
    parse_completion,
)

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
U = "<｜User｜>"
A = "<｜Assistant｜>"

MAX_PREFIX = (
    "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n"
    "You MUST be very thorough in your thinking and comprehensively decompose the problem to resolve the root cause, "
    "rigorously stress-testing your logic against all potential paths, edge cases, and adversarial scenarios.\n"
    "Explicitly write out your entire deliberation process, documenting every intermediate step, considered "
    "alternative, and rejected hypothesis to ensure absolutely no assumption is left unchecked.\n\n"
)

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}

TOOLS_BLOCK = (
    "## Tools\n\n"
    "You have access to a set of tools to help answer the user's question. You can invoke tools by writing a "
    '"<｜DSML｜tool_calls>" block like the following:\n\n'
    "<｜DSML｜tool_calls>\n"
    '<｜DSML｜invoke name="$TOOL_NAME">\n'
    '<｜DSML｜parameter name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE</｜DSML｜parameter>\n'
    "...\n"
    "</｜DSML｜invoke>\n"
    '<｜DSML｜invoke name="$TOOL_NAME2">\n'
    "...\n"
    "</｜DSML｜invoke>\n"
    "</｜DSML｜tool_calls>\n\n"
    'String parameters should be specified as is and set `string="true"`. For all other types (numbers, booleans, '
    'arrays, objects), pass the value in JSON format and set `string="false"`.\n\n'
    "If thinking_mode is enabled (triggered by <think>), you MUST output your complete reasoning inside "
    "<think>...</think> BEFORE any tool calls or final response.\n\n"
    "Otherwise, output directly after </think> with tool calls or final response.\n\n"
    "### Available Tool Schemas\n\n"
    '{"name": "get_weather", "description": "Get the weather", "parameters": {"type": "object", "properties": '
    '{"city": {"type": "string"}}, "required": ["city"]}}\n\n'
    "You MUST strictly follow the above defined tool name and parameter schemas to invoke tool calls.\n"
)

CALL_DSML = (
    "\n\n<｜DSML｜tool_calls>\n"
    '<｜DSML｜invoke name="get_weather">\n'
    '<｜DSML｜parameter name="city" string="true">Paris</｜DSML｜parameter>\n'
    '<｜DSML｜parameter name="days" string="false">3</｜DSML｜parameter>\n'
    '<｜DSML｜parameter name="opts" string="false">{"unit": "C", "hourly": true}</｜DSML｜parameter>\n'
    "</｜DSML｜invoke>\n"
    "</｜DSML｜tool_calls>"
)
CALL = ToolCall("get_weather", {"city": "Paris", "days": 3, "opts": {"unit": "C", "hourly": True}}, id="c1")


# ---------------------------------------------------------------- encoder: exact strings


def test_single_turn_each_mode():
    msgs = [User("hello")]
    assert render(msgs, Mode.NON_THINK) == f"{BOS}{U}hello{A}</think>"
    assert render(msgs, Mode.HIGH) == f"{BOS}{U}hello{A}<think>"
    assert render(msgs, Mode.MAX) == f"{BOS}{MAX_PREFIX}{U}hello{A}<think>"
    assert render(msgs, "high") == render(msgs, Mode.HIGH)


def test_system_prompt_and_max_prefix_order():
    msgs = [System("You are terse."), User("hi")]
    assert render(msgs, Mode.NON_THINK) == f"{BOS}You are terse.{U}hi{A}</think>"
    # The Think-Max prefix goes right after BOS, before the system text.
    assert render(msgs, Mode.MAX) == f"{BOS}{MAX_PREFIX}You are terse.{U}hi{A}<think>"


def test_multi_turn_drops_earlier_reasoning():
    msgs = [
        System("S"),
        User("q1"),
        Assistant("a1", reasoning="r1"),
        User("q2"),
        Assistant("a2", reasoning="r2"),
        User("q3"),
    ]
    want_history = f"{BOS}S{U}q1{A}</think>a1{EOS}{U}q2{A}</think>a2{EOS}{U}q3{A}"
    assert render(msgs, Mode.HIGH) == want_history + "<think>"
    assert render(msgs, Mode.NON_THINK) == want_history + "</think>"
    assert render(msgs, Mode.MAX) == want_history.replace(BOS, BOS + MAX_PREFIX) + "<think>"


def test_assistant_after_last_user_keeps_reasoning():
    msgs = [User("q"), Assistant("a", reasoning="r")]
    assert render_conversation(msgs, Mode.HIGH) == f"{BOS}{U}q{A}<think>r</think>a{EOS}"
    assert render_conversation(msgs, Mode.NON_THINK) == f"{BOS}{U}q{A}</think>a{EOS}"


def test_consecutive_user_messages_merge():
    assert render([User("a"), User("b")], Mode.NON_THINK) == f"{BOS}{U}a\n\nb{A}</think>"


def test_tools_block_in_system_prompt():
    assert render([System("S"), User("hi")], Mode.NON_THINK, tools=[WEATHER]) == (
        f"{BOS}S\n\n{TOOLS_BLOCK}{U}hi{A}</think>"
    )
    # No system message: an empty one carries the block. Bare schemas work like OpenAI-style ones.
    bare = WEATHER["function"]
    assert render([User("hi")], Mode.HIGH, tools=[bare]) == f"{BOS}\n\n{TOOLS_BLOCK}{U}hi{A}<think>"


def test_dsml_tool_call_both_string_kinds():
    assert render_tool_calls([CALL]) == CALL_DSML
    two = render_tool_calls([ToolCall("a", {"x": "1"}), ToolCall("b", {"y": [1, "é"]})])
    assert two == (
        "\n\n<｜DSML｜tool_calls>\n"
        '<｜DSML｜invoke name="a">\n<｜DSML｜parameter name="x" string="true">1</｜DSML｜parameter>\n</｜DSML｜invoke>\n'
        '<｜DSML｜invoke name="b">\n<｜DSML｜parameter name="y" string="false">[1, "é"]</｜DSML｜parameter>\n'
        "</｜DSML｜invoke>\n</｜DSML｜tool_calls>"
    )


def test_tool_result_turn_keeps_reasoning_with_tools():
    msgs = [
        User("weather?"),
        Assistant("", reasoning="need a tool", tool_calls=(CALL,)),
        ToolResult("sunny", call_id="c1"),
    ]
    want = f"{BOS}\n\n{TOOLS_BLOCK}{U}weather?{A}<think>need a tool</think>{CALL_DSML}{EOS}"
    assert render(msgs, Mode.HIGH, tools=[WEATHER]) == want + f"{U}<tool_result>sunny</tool_result>{A}<think>"
    # Non-think never renders reasoning, tools or not.
    nt = render(msgs, Mode.NON_THINK, tools=[WEATHER])
    assert nt == (
        f"{BOS}\n\n{TOOLS_BLOCK}{U}weather?{A}</think>{CALL_DSML}{EOS}{U}<tool_result>sunny</tool_result>{A}</think>"
    )


def test_tool_results_follow_call_order_and_merge_with_user_text():
    calls = (ToolCall("f", {}, id="x"), ToolCall("g", {}, id="y"))
    msgs = [User("go"), Assistant("", tool_calls=calls), ToolResult("G", "y"), ToolResult("F", "x"), User("and?")]
    out = render(msgs, Mode.NON_THINK, tools=[WEATHER])
    assert out.endswith(f"{U}<tool_result>F</tool_result>\n\n<tool_result>G</tool_result>\n\nand?{A}</think>")


def test_render_rejects_bad_conversations():
    with pytest.raises(BadInput):
        render([], Mode.HIGH)
    with pytest.raises(BadInput):
        render([User("q"), Assistant("a")], Mode.HIGH)
    with pytest.raises(BadInput):
        render([User("q")], Mode.HIGH, tools=[{"description": "no name"}])
    with pytest.raises(ValueError):
        render([User("q")], "medium")


def test_check_context():
    assert MAX_MIN_CONTEXT == 393216
    assert check_context(Mode.MAX, MAX_MIN_CONTEXT) is None
    assert check_context(Mode.HIGH, 4096) is None
    msg = check_context(Mode.MAX, 65536)
    assert msg is not None and "393,216" in msg and "65,536" in msg


# ---------------------------------------------------------------- tokenizer


@pytest.fixture(scope="module")
def tok() -> PromptTokenizer:
    return load_tokenizer()


def test_token_ids(tok):
    assert encode([User("hello")], Mode.HIGH) == [0, 128803, 33310, 128804, 128821]
    assert encode([User("hello")], Mode.NON_THINK) == [0, 128803, 33310, 128804, 128822]
    with_system = [0, 3476, 477, 11502, 16, 128803, 33310, 128804, 128821]
    assert encode([System("You are helpful."), User("hello")], Mode.HIGH) == with_system
    two_turns = [0, 128803, 83, 19, 128804, 128822, 67, 19, 1, 128803, 83, 20, 128804, 128821]
    assert encode([User("q1"), Assistant("a1", reasoning="r1"), User("q2")], Mode.HIGH) == two_turns
    max_ids = encode([User("hello")], Mode.MAX)
    assert len(max_ids) == 84
    assert max_ids[:6] == [0, 77666, 288, 9504, 482, 28]
    assert max_ids[-6:] == [114867, 339, 128803, 33310, 128804, 128821]
    # DSML: the block opens with "\n\n", "<", then the ｜DSML｜ special token.
    assert tok.encode(render_tool_calls([ToolCall("get_weather", {"city": "Paris"})]))[:3] == [271, 30, 128825]
    tool_turn = [128803, 30, 72461, 46148, 32, 69958, 2928, 1718, 72461, 46148, 32, 128804, 128821]
    assert tok.encode(f"{U}<tool_result>sunny</tool_result>{A}<think>") == tool_turn


def test_tokenizer_sources_agree(tok):
    path = default_tokenizer_path()
    assert path.name == "tokenizer.json"
    from_json = PromptTokenizer.from_json(path.read_text(encoding="utf-8"))
    from_path = load_tokenizer(str(path))
    text = render([User("héllo wörld 你好")], Mode.MAX)
    assert from_json.encode(text) == from_path.encode(text) == tok.encode(text)
    assert tok.decode(tok.encode(text)) == text
    assert tok.token_id("｜DSML｜") == 128825 and tok.vocab_size >= 129280
    with pytest.raises(NotFoundError):
        PromptTokenizer.from_file(path.parent / "missing.json")
    with pytest.raises(BadInput):
        PromptTokenizer.from_json("{not json")


# ---------------------------------------------------------------- prefix reuse across turns


def _turn(mode, msgs, generated, tools=None):
    """Render, 'generate', parse: returns (transcript, messages with the parsed assistant turn)."""
    prompt = render(msgs, mode, tools)
    message, _ = parse_completion(generated, mode)
    return prompt + generated, msgs + [message]


def test_non_think_turn_extends_previous_transcript(tok):
    msgs = [System("S"), User("q1")]
    transcript, msgs = _turn(Mode.NON_THINK, msgs, f"answer one\n{EOS}")
    msgs.append(User("q2"))
    ext = render_extension(transcript, msgs, Mode.NON_THINK)
    assert ext.extends and ext.suffix == f"{U}q2{A}</think>"
    prev_ids = tok.encode(transcript)
    assert tok.encode_extension(transcript, prev_ids, ext.text) == tok.encode(ext.text)
    assert tok.encode_extension(transcript, prev_ids, ext.text)[: len(prev_ids)] == prev_ids


def test_thinking_turn_shares_up_to_stable_prefix():
    msgs = [User("q1")]
    stable = stable_prefix(msgs, Mode.HIGH)
    assert stable == f"{BOS}{U}q1{A}"
    transcript, msgs = _turn(Mode.HIGH, msgs, f"let me see</think>one{EOS}")
    msgs.append(User("q2"))
    ext = render_extension(transcript, msgs, Mode.HIGH)
    assert not ext.extends
    assert ext.shared == len(stable)
    assert ext.suffix == f"</think>one{EOS}{U}q2{A}<think>"


def test_thinking_with_tools_extends_through_a_tool_call(tok):
    msgs = [User("weather?")]
    assert stable_prefix(msgs, Mode.HIGH, [WEATHER]) == render(msgs, Mode.HIGH, [WEATHER])
    generated = f"need a tool</think>{CALL_DSML}{EOS}"
    transcript, msgs = _turn(Mode.HIGH, msgs, generated, [WEATHER])
    assert msgs[-1].tool_calls == (ToolCall("get_weather", dict(CALL.arguments)),)
    msgs.append(ToolResult("sunny"))
    ext = render_extension(transcript, msgs, Mode.HIGH, [WEATHER])
    assert ext.extends and ext.suffix == f"{U}<tool_result>sunny</tool_result>{A}<think>"
    assert tok.encode_extension(transcript, tok.encode(transcript), ext.text) == tok.encode(ext.text)


def test_encode_extension_falls_back_when_not_a_prefix(tok):
    ids = tok.encode_extension("abc", tok.encode("abc"), "abd")
    assert ids == tok.encode("abd")


# ---------------------------------------------------------------- parser

THINK_TOOL_OUTPUT = "The user wants weather. <not a tag> a < b.\nCall the tool.</think>Checking.\n" + CALL_DSML + EOS
THINK_TOOL_EVENTS = [
    ReasoningDelta("The user wants weather. <not a tag> a < b.\nCall the tool."),
    ContentDelta("Checking.\n"),
    ToolCallEvent(
        name="get_weather",
        arguments={"city": "Paris", "days": 3, "opts": {"unit": "C", "hourly": True}},
        raw=CALL_DSML.split("\n", 3)[3].rsplit("\n", 1)[0],
    ),
    End("eos"),
]

NON_THINK_OUTPUT = "Line one\n\nLine <two> </thinker>\n" + EOS


def _feed_chunks(text, mode, cuts):
    parser = StreamParser(mode)
    events, last = [], 0
    for cut in list(cuts) + [len(text)]:
        events += parser.feed(text[last:cut])
        last = cut
    return events + parser.finish()


def test_fixture_events_exact():
    message, events = parse_completion(THINK_TOOL_OUTPUT, Mode.HIGH)
    assert merge_deltas(events) == THINK_TOOL_EVENTS
    assert message == Assistant(
        content="Checking.\n",
        reasoning="The user wants weather. <not a tag> a < b.\nCall the tool.",
        tool_calls=(ToolCall("get_weather", {"city": "Paris", "days": 3, "opts": {"unit": "C", "hourly": True}}),),
    )
    _, events = parse_completion(NON_THINK_OUTPUT, Mode.NON_THINK)
    assert merge_deltas(events) == [ContentDelta("Line one\n\nLine <two> </thinker>\n"), End("eos")]


@pytest.mark.parametrize("text,mode", [(THINK_TOOL_OUTPUT, Mode.HIGH), (NON_THINK_OUTPUT, Mode.NON_THINK)])
def test_every_split_point_gives_same_events(text, mode):
    want = merge_deltas(parse_completion(text, mode)[1])
    for i in range(len(text) + 1):
        assert merge_deltas(_feed_chunks(text, mode, [i])) == want, i
    assert merge_deltas(_feed_chunks(text, mode, range(1, len(text)))) == want
    rng = random.Random(0)
    for _ in range(50):
        cuts = sorted(rng.sample(range(1, len(text)), rng.randint(1, 12)))
        assert merge_deltas(_feed_chunks(text, mode, cuts)) == want


def test_partial_markup_is_held_back():
    p = StreamParser(Mode.HIGH)
    assert p.feed("thinking</thi") == [ReasoningDelta("thinking")]
    assert p.feed("nk>ok\n\n<｜DS") == [ContentDelta("ok")]
    assert p.feed("ML｜tool_calls>\n") == []
    assert p.feed('<｜DSML｜invoke name="f">\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>') == [
        ToolCallEvent("f", {}, raw='<｜DSML｜invoke name="f">\n</｜DSML｜invoke>')
    ]
    assert p.feed(EOS) == [End("eos")]
    assert p.feed("ignored after the end") == [] and p.done


def test_stream_cut_inside_markup_reports_instead_of_leaking():
    p = StreamParser(Mode.NON_THINK)
    assert p.feed("answer </thi") == [ContentDelta("answer ")]
    assert p.finish() == [ParseError("stream ended inside markup", "</thi"), End("eof")]
    p = StreamParser(Mode.NON_THINK)
    assert p.feed("a <") == [ContentDelta("a ")]
    assert p.finish() == [ContentDelta("<"), End("eof")]


def _calls(events):
    return [e for e in events if isinstance(e, ToolCallEvent)]


def _errors(events):
    return [e for e in events if isinstance(e, ParseError)]


def test_unterminated_block_with_complete_invoke_is_a_call():
    text = '\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="f">\n<｜DSML｜parameter name="a" string="true">x</｜DSML｜parameter>\n</｜DSML｜invoke>\n'
    _, events = parse_completion(text, Mode.NON_THINK)
    assert [(c.name, c.arguments, c.complete) for c in _calls(events)] == [("f", {"a": "x"}, True)]
    assert not _errors(events) and events[-1] == End("eof")


def test_invoke_cut_between_parameters_is_a_best_effort_call():
    text = (
        '\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="f">\n<｜DSML｜parameter name="a" string="false">[1, 2]</｜DSML｜parameter>\n'
        + EOS
    )
    _, events = parse_completion(text, Mode.NON_THINK)
    (call,) = _calls(events)
    assert call.arguments == {"a": [1, 2]} and not call.complete and call.issues
    assert events[-1] == End("eos")


def test_invoke_cut_inside_a_parameter_is_dropped_with_an_error():
    text = 'ok\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="f">\n<｜DSML｜parameter name="a" string="true">trunc'
    message, events = parse_completion(text, Mode.NON_THINK)
    assert not _calls(events) and message.tool_calls == ()
    assert [e.message for e in _errors(events)] == ["tool call 'f' was cut off inside a parameter"]
    assert message.content == "ok"


def test_tolerant_values():
    text = (
        '<｜DSML｜tool_calls>\n<｜DSML｜invoke name="f">\n'
        '<｜DSML｜parameter name="bad" string="false">{oops</｜DSML｜parameter>\n'
        '<｜DSML｜parameter name="n">42</｜DSML｜parameter>\n'
        '<｜DSML｜parameter name="w">hello</｜DSML｜parameter>\n'
        '<｜DSML｜parameter name="s" string="true">42</｜DSML｜parameter>\n'
        "</｜DSML｜invoke>\n</｜DSML｜tool_calls>" + EOS
    )
    _, events = parse_completion(text, Mode.NON_THINK)
    (call,) = _calls(events)
    assert call.arguments == {"bad": "{oops", "n": 42, "w": "hello", "s": "42"}
    assert len(call.issues) == 1 and "bad" in call.issues[0]


def test_dsml_in_reasoning_without_think_end_still_parses_the_call():
    text = 'hmm\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="f">\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>' + EOS
    message, events = parse_completion(text, Mode.HIGH)
    assert message.reasoning == "hmm" and message.content == ""
    assert [c.name for c in _calls(events)] == ["f"]


def test_garbage_and_stray_markup():
    text = (
        "a</｜DSML｜parameter>b｜DSML｜c<think>d\n\n<｜DSML｜tool_calls>\njunk "
        '<｜DSML｜invoke name="f">\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>\n\n tail' + EOS
    )
    message, events = parse_completion(text, Mode.NON_THINK)
    assert message.content == "abcdtail"
    assert [c.name for c in _calls(events)] == ["f"]
    assert [(e.message, e.raw) for e in _errors(events)] == [("unexpected text in a tool call block", "junk ")]
    assert parse_completion("x</｜DSML｜ y</｜DSML｜invoke>z", Mode.NON_THINK)[0].content == "x yz"
    nameless = parse_completion("<｜DSML｜invoke>\n</｜DSML｜invoke>" + EOS, Mode.NON_THINK)[1]
    assert [e.message for e in _errors(nameless)] == ["tool call without a readable name"]


MARKUP = ("｜DSML｜", "<think>", "</think>", EOS, BOS, U, A, "<｜latest_reminder｜>")
# fmt: off
FRAGMENTS = [
    "hello", " ", "\n", "\n\n", "<", ">", "</", "a<b", "｜", "<｜", "<｜DS", "ML｜", "</thi", "nk>", "<think>",
    "</think>", "<｜DSML｜tool_calls>", "</｜DSML｜tool_calls>", '<｜DSML｜invoke name="f">', "</｜DSML｜invoke>",
    '<｜DSML｜parameter name="k" string="false">', '<｜DSML｜parameter name="k" string="true">',
    "</｜DSML｜parameter>", "[1, 2]", "{bad", "｜DSML｜", U, A, BOS, EOS, "<｜end▁of", "▁sentence｜>",
]
# fmt: on


def test_fuzz_markup_never_in_text_and_chunking_invariant():
    rng = random.Random(1234)
    for _ in range(300):
        text = "".join(rng.choice(FRAGMENTS) for _ in range(rng.randint(1, 25)))
        mode = rng.choice(list(Mode))
        want = merge_deltas(parse_completion(text, mode)[1])
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(0, 10)))) if len(text) > 1 else []
        got = _feed_chunks(text, mode, cuts)
        assert merge_deltas(got) == want, text
        assert sum(isinstance(e, End) for e in got) == 1 and isinstance(got[-1], End)
        for e in got:
            if isinstance(e, (ReasoningDelta, ContentDelta)):
                assert not any(m in e.text for m in MARKUP), (text, e)


def test_long_tool_argument_streams_in_linear_time():
    body = "x" * 200_000
    p = StreamParser(Mode.NON_THINK)
    events = p.feed(
        '\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="write">\n<｜DSML｜parameter name="text" string="true">'
    )
    for i in range(0, len(body), 4):
        events += p.feed(body[i : i + 4])
    events += p.feed("</｜DSML｜parameter>\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>" + EOS)
    (call,) = _calls(events)
    assert call.arguments["text"] == body and events[-1] == End("eos")


def test_long_tool_argument_with_closing_tag_split_across_deltas():
    body = "y" * 500
    head = '<｜DSML｜tool_calls>\n<｜DSML｜invoke name="w">\n<｜DSML｜parameter name="t" string="true">' + body
    tail = "</｜DSML｜parameter>\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>" + EOS
    done_at = tail.index("</｜DSML｜invoke>") + len("</｜DSML｜invoke>")
    for cut in range(len(tail)):
        p = StreamParser(Mode.NON_THINK)
        events = p.feed(head) + p.feed("y") + p.feed(tail[:cut])
        pos = cut
        for ch in tail[cut:]:
            pos += 1
            events += p.feed(ch)
            # The call is out as soon as its closing tag is complete, not at the next marker.
            assert bool(_calls(events)) == (pos >= done_at), (cut, pos)
        assert [c.arguments for c in _calls(events)] == [{"t": body + "y"}] and events[-1] == End("eos"), cut
