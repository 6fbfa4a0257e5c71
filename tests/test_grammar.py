"""Constrained decoding on the tiny random-weight model: whatever the weights, the sampled tokens spell canonical
DSML for the forced tool, or JSON valid under the schema, and the turn ends; logprobs are the model's own."""

from __future__ import annotations

import json
import math
import re

import jsonschema
import pytest
import torch

from v4cli.engine.grammar import Constraint, REASONING_SHARE, compile_constraint
from v4cli.engine.records import DoneRecord, TokenRecord
from v4cli.engine.sampling import SamplingParams
from v4cli.engine.session import Session
from quant.errors import BadInput
from v4cli.prompt.encoding import EOS_ID, THINK_END, Mode, PromptTokenizer, User, encode, render_tool_calls
from v4cli.prompt.parser import ToolCallEvent, parse_completion

# Bounded schemas: random weights would otherwise write a string or a number forever (nothing makes a random model
# pick the closing quote), so strings carry maxLength, integers a range, arrays maxItems, objects no extra keys.
WEATHER = {"name": "get_weather", "description": "Weather for a city", "parameters": {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 6},
                   "days": {"type": "integer", "minimum": 1, "maximum": 14},
                   "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "days", "unit"]}}
NESTED = {"name": "book", "description": "Book a trip", "parameters": {
    "type": "object",
    "properties": {"who": {"type": "object",
                           "properties": {"name": {"type": "string", "maxLength": 4},
                                          "age": {"type": "integer", "minimum": 0, "maximum": 120}},
                           "required": ["name", "age"], "additionalProperties": False},
                   "stops": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9},
                             "minItems": 1, "maxItems": 3},
                   "window": {"type": "boolean"},
                   "note": {"type": "string", "maxLength": 3}},
    "required": ["who", "stops"]}}
EMPTY = {"name": "now", "description": "The time", "parameters": {"type": "object", "properties": {}}}
ANSWER = {"type": "object",
          "properties": {"answer": {"type": "string", "maxLength": 5},
                         "score": {"type": "integer", "minimum": -5, "maximum": 5},
                         "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2}},
          "required": ["answer", "score"], "additionalProperties": False}


@pytest.fixture(scope="module")
def engine(tiny_gguf, one_thread):
    from v4cli.engine import Engine

    return Engine.load(tiny_gguf("f32"), kv_format="f32")


def run(engine, constraint, tools, mode, seed, max_tokens=160, logprobs=None):
    """Generate under the constraint from a one-question prompt → (text, token records, done record)."""
    ids = encode([User("Go.")], mode, tools, PromptTokenizer(engine.tokenizer))
    c = compile_constraint(constraint, tools, engine.tokenizer, mode)
    recs = list(engine.generate(ids, SamplingParams(temperature=1.0, seed=seed, max_tokens=max_tokens),
                                constraint=c, logprobs=logprobs))
    toks, done = [r for r in recs if isinstance(r, TokenRecord)], recs[-1]
    assert isinstance(done, DoneRecord)
    return "".join(r.text for r in toks) + done.text, toks, done


def single_call(text: str, mode: Mode) -> ToolCallEvent:
    msg, events = parse_completion(text, mode)
    calls = [e for e in events if isinstance(e, ToolCallEvent)]
    assert len(calls) == 1 and msg.content == "", text
    assert calls[0].complete and not calls[0].issues, calls[0]
    return calls[0]


@pytest.mark.parametrize("tool", [WEATHER, NESTED, EMPTY], ids=lambda t: t["name"])
@pytest.mark.parametrize("seed", [0, 1])
def test_named_tool_is_canonical_dsml_valid_under_its_schema(engine, tool, seed):
    tools = [WEATHER, NESTED, EMPTY]
    text, toks, done = run(engine, Constraint("tool", tool["name"]), tools, Mode.NON_THINK, seed)
    assert done.finish_reason == "stop"  # the grammar completed: the turn ends here, not at max_tokens
    call = single_call(text, Mode.NON_THINK)
    assert call.name == tool["name"]
    jsonschema.validate(call.arguments, tool["parameters"])
    # byte-identical to what the encoder renders for the parsed call: the next turn's prompt reuses these tokens
    assert render_tool_calls([call.to_call()]) == text


def test_required_calls_any_of_two_tools(engine):
    tools = [WEATHER, EMPTY]
    by_name = {t["name"]: t for t in tools}
    for seed in (0, 1, 2):
        text, _, done = run(engine, Constraint("required"), tools, Mode.NON_THINK, seed)
        assert done.finish_reason == "stop"
        msg, events = parse_completion(text, Mode.NON_THINK)
        calls = [e for e in events if isinstance(e, ToolCallEvent)]
        assert calls and msg.content == "" and len(msg.tool_calls) == len(calls)
        for call in calls:
            jsonschema.validate(call.arguments, by_name[call.name]["parameters"])
        assert render_tool_calls([c.to_call() for c in calls]) == text


@pytest.mark.parametrize("mode", [Mode.NON_THINK, Mode.HIGH])
def test_json_schema_answer_parses_and_validates(engine, mode):
    for seed in (0, 1):
        text, _, done = run(engine, Constraint("json", schema=ANSWER), [], mode, seed, max_tokens=120)
        assert done.finish_reason == "stop", text
        msg, _ = parse_completion(text, mode)
        jsonschema.validate(json.loads(msg.content), ANSWER)
        # shaped as json.dumps writes it (separators, no stray whitespace); llguidance's integers may spell zero
        # "-0", the one spelling json.dumps does not give back
        assert re.sub(r"-0\b", "0", msg.content) == json.dumps(json.loads(msg.content), ensure_ascii=False)


def test_thinking_is_cut_at_its_budget_and_the_answer_still_completes(engine):
    max_tokens = 200  # this call in DSML is ~75 tokens: the half left after reasoning must hold it
    text, toks, done = run(engine, Constraint("tool", "get_weather"), [WEATHER], Mode.HIGH, 3, max_tokens)
    assert done.finish_reason == "stop" and len(toks) <= max_tokens
    think_end = engine.tokenizer.token_to_id(THINK_END)
    ids = [r.token for r in toks]
    assert ids.count(think_end) == 1
    # random weights never close their reasoning: `</think>` is forced once the budget is spent (a cut UTF-8
    # character may take up to three more tokens)
    assert int(max_tokens * REASONING_SHARE) <= ids.index(think_end) <= int(max_tokens * REASONING_SHARE) + 3
    msg, _ = parse_completion(text, Mode.HIGH)
    assert msg.reasoning and msg.tool_calls[0].name == "get_weather"
    jsonschema.validate(dict(msg.tool_calls[0].arguments), WEATHER["parameters"])


def test_first_step_masks(engine):
    """Non-think named tool: the one allowed first token is the encoder's first token of the DSML block (llguidance
    forces the canonical tokenization of forced text: a lone "\\n" is refused although it spells a prefix too).
    Thinking: any text token or `</think>`, never a special token such as EOS or `｜DSML｜`."""
    tok = PromptTokenizer(engine.tokenizer)
    c = compile_constraint(Constraint("tool", "get_weather"), [WEATHER], engine.tokenizer, Mode.NON_THINK)
    c.start(100)
    first = tok.encode("\n\n<｜DSML｜tool_calls>")[0]
    assert tok.decode([first]) == "\n\n"
    assert c.mask().nonzero().flatten().tolist() == [first]
    assert len(tok.encode("\n")) == 1 and tok.encode("\n")[0] != first  # the refused one-newline token

    c = compile_constraint(Constraint("tool", "get_weather"), [WEATHER], engine.tokenizer, Mode.HIGH)
    c.start(100)
    allowed = c.mask()
    think_end, dsml = tok.token_id(THINK_END), tok.token_id("｜DSML｜")
    assert allowed[think_end] and allowed[tok.encode("Hello")[0]]
    assert not allowed[EOS_ID] and not allowed[dsml] and not allowed[tok.token_id("<think>")]


def test_budget_spent_inside_a_character_finishes_it_then_forces_think_end(engine):
    """A token may end mid UTF-8 character, where `</think>` cannot follow: once the budget is spent only tokens
    made of the character's remaining bytes are allowed (not one that also starts another character), then only
    `</think>`."""
    tok = PromptTokenizer(engine.tokenizer)
    think_end = tok.token_id(THINK_END)
    lead, cont, cont_lead = 150, 245, 2002  # byte tokens D7 and 94 (ה is D7 94), and the token of bytes 94 D7
    assert tok.decode([lead, cont]) == "ה"
    schema = Constraint("json")
    c = compile_constraint(schema, [], engine.tokenizer, Mode.HIGH)
    c.start(100)
    c.advance(lead)
    assert c.mask()[cont_lead]  # within the budget the grammar allows it
    c.start(2)  # a budget of one reasoning token
    c.advance(lead)
    allowed = c.mask()
    assert allowed[cont] and not allowed[cont_lead] and not allowed[think_end]
    c.advance(cont)
    assert c.mask().nonzero().flatten().tolist() == [think_end]


def test_session_passes_the_constraint_and_logprobs_through(engine):
    """What `v4 serve` calls: Session.generate with a constraint and logprobs; the logprobs are the raw model's
    log-softmax at each step (recomputed here from a fresh forward over prompt + sampled tokens)."""
    mode = Mode.NON_THINK
    ids = encode([User("Go.")], mode, [WEATHER], PromptTokenizer(engine.tokenizer))
    c = compile_constraint(Constraint("tool", "get_weather"), [WEATHER], engine.tokenizer, mode)
    recs = list(Session(engine).generate(ids, SamplingParams(seed=5, max_tokens=100), constraint=c, logprobs=3))
    toks = [r for r in recs if isinstance(r, TokenRecord)]
    assert recs[-1].finish_reason == "stop"
    single_call("".join(r.text for r in toks) + recs[-1].text, mode)
    want = torch.log_softmax(engine.logits(ids + [r.token for r in toks])[len(ids) - 1: -1], dim=-1)
    for r, row in zip(toks, want):
        assert r.logprob == pytest.approx(float(row[r.token]), abs=1e-4)
        assert [i for i, _ in r.top] == torch.topk(row, 3).indices.tolist()


def test_logprobs_greedy_are_consistent_and_free_when_off(engine):
    ids = encode([User("Hi")], Mode.NON_THINK, None, PromptTokenizer(engine.tokenizer))
    greedy = SamplingParams(temperature=0.0, max_tokens=6, stop_on_eos=False)
    with_lp = [r for r in engine.generate(ids, greedy, logprobs=4) if isinstance(r, TokenRecord)]
    without = [r for r in engine.generate(ids, greedy) if isinstance(r, TokenRecord)]
    assert [r.token for r in with_lp] == [r.token for r in without]
    assert all(r.logprob is None and r.top == () for r in without)
    for r in with_lp:
        assert len(r.top) == 4 and sum(math.exp(lp) for _, lp in r.top) <= 1 + 1e-6
        assert [lp for _, lp in r.top] == sorted((lp for _, lp in r.top), reverse=True)
        assert r.top[0][0] == r.token and r.logprob >= r.top[-1][1] and r.logprob <= 0


def test_requests_that_cannot_be_enforced_are_bad_input(engine):
    with pytest.raises(BadInput, match="not among the request's tools"):
        compile_constraint(Constraint("tool", "nope"), [WEATHER], engine.tokenizer, Mode.NON_THINK)
    with pytest.raises(BadInput, match="needs at least one tool"):
        compile_constraint(Constraint("required"), [], engine.tokenizer, Mode.NON_THINK)
    with pytest.raises(BadInput, match="cannot be enforced"):
        compile_constraint(Constraint("json", schema={"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}),
                           [], engine.tokenizer, Mode.NON_THINK)


@pytest.mark.llama
@pytest.mark.slow
def test_llama_engine_enforces_the_same_constraint(tiny_gguf, one_thread):
    """`--engine llama` takes the same constraint and logprobs: on the same GGUF (logits equal to ~1e-6) with the
    same seed it samples the same tokens as the torch engine, so it writes the same valid call."""
    pytest.importorskip("llama_cpp")
    from v4cli.engine import Engine
    from v4cli.engine.llama import LlamaEngine

    gguf = tiny_gguf("f32", "tiny-128")  # the preset llama.cpp loads
    llama = LlamaEngine.load(gguf, kv_format="f32", n_threads=1, n_ctx=1024)
    try:
        text, toks, done = run(llama, Constraint("tool", "book"), [NESTED], Mode.NON_THINK, 2, logprobs=2)
        ref_text, ref_toks, _ = run(Engine.load(gguf, kv_format="f32"), Constraint("tool", "book"), [NESTED],
                                    Mode.NON_THINK, 2, logprobs=2)
    finally:
        llama.close()
    assert done.finish_reason == "stop" and text == ref_text
    assert [r.token for r in toks] == [r.token for r in ref_toks]
    assert [r.logprob for r in toks] == pytest.approx([r.logprob for r in ref_toks], abs=1e-3)
    jsonschema.validate(single_call(text, Mode.NON_THINK).arguments, NESTED["parameters"])
