"""Constrained decoding: a request's `Constraint` compiled into a token mask that the sampling loop applies.

llguidance does the work: the grammar (Lark syntax with inline JSON schemas) is matched against token bytes, so
only tokens that keep the output a prefix of the language can be sampled. Three answers are enforced:

- "tool": one call to the named function in canonical DSML, exactly as `render_tool_calls` writes it
  (`\\n\\n<｜DSML｜tool_calls>\\n<｜DSML｜invoke name="NAME">\\n<｜DSML｜parameter ...>...`), then end of turn;
- "required": one or more calls, each to any of the request's tools;
- "json": JSON valid under the schema (any object when none), then end of turn.

DSML is canonical so a later request that sends the call back re-renders byte for byte: parameters in the
schema's property order, `string="true"` with raw text for string-typed parameters, `string="false"` with
`json.dumps`-shaped JSON (", " and ": " separators, no other whitespace) for the rest, required ones present.

Thinking modes: the prompt ends with `<think>`, so the grammar starts with free reasoning (no special tokens),
then `</think>`, then the answer. Reasoning may use at most half of max_tokens (REASONING_SHARE); once that is
spent, `</think>` is forced (after finishing a UTF-8 character cut by a token, which takes at most three tokens),
so the answer always gets the other half. Non-think prompts end with `</think>`: the answer starts at once.

The special tokens the grammar references (`｜DSML｜`, `</think>`) are matched by id, never spelled from bytes:
the official tokenizer.json does not flag them special, so they are flagged here before llguidance sees it —
otherwise free text (reasoning, a string argument) could emit `｜DSML｜` and end a parameter early.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from llguidance import LLMatcher, LLTokenizer

from quant.errors import BadInput, V4Error
from v4cli.prompt.encoding import DSML, EOS_ID, SPECIAL_TOKENS, THINK_END, Mode, PromptTokenizer

@dataclass(frozen=True)
class Constraint:
    """What constrained decoding enforces on the answer (after any reasoning).

    kind "tool": exactly the tool call(s) to `name`, in canonical DSML, then end of turn;
    "required": at least one call to any of the request's tools; "json": the answer is JSON valid under `schema`
    (None: any JSON object)."""

    kind: Literal["tool", "required", "json"]
    name: str | None = None
    schema: Mapping[str, Any] | None = None


REASONING_SHARE = 0.5  # the part of max_tokens reasoning may use before `</think>` is forced

# How json.dumps(value, ensure_ascii=False) writes JSON, which is how render_tool_calls writes non-string
# arguments: the model's JSON must re-render to the same bytes. Escapes: those json.dumps emits, no "\/".
# lenient: keywords llguidance cannot enforce (uniqueItems, propertyNames, unknown formats), common in agents'
# tool schemas, are ignored rather than failing the request; everything else in the schema is still enforced.
_JSON_SHAPE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": ",
               "json_allowed_escapes": "\"\\bfnrtu", "lenient": True}

_NL = json.dumps("\n")  # a newline as a Lark literal

_tokenizers: dict[int, tuple[Any, LLTokenizer]] = {}
_continuation: dict[int, tuple[LLTokenizer, torch.Tensor]] = {}
_tokenizers_lock = threading.Lock()


def ll_tokenizer(tokenizer) -> LLTokenizer:
    """llguidance's view of our tokenizer (a `tokenizers.Tokenizer` or `PromptTokenizer`), built once (~0.7 s)."""
    raw = tokenizer._tok if isinstance(tokenizer, PromptTokenizer) else tokenizer
    with _tokenizers_lock:
        hit = _tokenizers.get(id(raw))
        if hit is not None and hit[0] is raw:
            return hit[1]
        spec = json.loads(raw.to_str())
        for added in spec.get("added_tokens", []):
            if added.get("content") in SPECIAL_TOKENS:
                added["special"] = True
        ll = LLTokenizer(json.dumps(spec), n_vocab=raw.get_vocab_size(with_added_tokens=True), eos_token=EOS_ID)
        _tokenizers[id(raw)] = (raw, ll)  # holding `raw` keeps its id from being reused by another tokenizer
        return ll


class TokenConstraint:
    """One compiled constraint. `start` begins a generation; then per token `mask` (allowed ids) and `advance`."""

    def __init__(self, grammar: str, tokenizer: LLTokenizer, think_end: int | None):
        self.grammar, self.tokenizer, self.think_end = grammar, tokenizer, think_end
        self.matcher: LLMatcher | None = None

    def start(self, max_tokens: int) -> None:
        """A fresh matcher for one generation of up to `max_tokens` tokens (sets the reasoning budget)."""
        self.matcher = LLMatcher(self.tokenizer, self.grammar, log_level=0)
        self._check()
        self.steps = 0
        self.reasoning = self.think_end is not None
        self.budget = int(max_tokens * REASONING_SHARE)

    def mask(self) -> torch.Tensor:
        """bool [vocab]: the tokens that may come next."""
        words = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8)
        allowed = torch.from_numpy(np.unpackbits(words, bitorder="little")[: self.tokenizer.vocab_size].view(np.bool_))
        self._check()
        if self.reasoning and self.steps >= self.budget:
            if allowed[self.think_end]:
                allowed = torch.zeros_like(allowed)
                allowed[self.think_end] = True
            else:  # a token ended inside a UTF-8 character: only its remaining bytes, then `</think>`
                allowed = allowed & self._continuation_tokens()
        if not allowed.any():
            raise V4Error(f"constrained decoding reached a dead end after {self.steps} tokens")
        return allowed

    def advance(self, token: int) -> None:
        """Feed the sampled token to the matcher."""
        self.matcher.consume_token(token)
        self._check()
        self.steps += 1
        if token == self.think_end:
            self.reasoning = False

    @property
    def done(self) -> bool:
        """The grammar is complete: nothing but end of turn may follow."""
        return self.matcher.is_stopped()

    def _check(self) -> None:
        if self.matcher.is_error():
            raise V4Error(f"constrained decoding failed: {self.matcher.get_error()}")

    def _continuation_tokens(self) -> torch.Tensor:
        # tokens made only of UTF-8 continuation bytes (0x80-0xBF): computed once per tokenizer (~0.2 s), and only
        # if some budget ends mid-character
        tok = self.tokenizer
        with _tokenizers_lock:
            if id(tok) not in _continuation:
                _continuation[id(tok)] = (tok, torch.tensor([
                    bool(b) and all(0x80 <= c < 0xC0 for c in b) and not tok.is_special_token(i)
                    for i, b in ((i, tok.decode_bytes([i])) for i in range(tok.vocab_size))]))
            return _continuation[id(tok)][1]


# ---------------------------------------------------------------------------------------------- compiling


def compile_constraint(constraint: Constraint, tools: Sequence[Mapping[str, Any]], tokenizer, mode: Mode
                       ) -> TokenConstraint:
    """The token-level constraint for `constraint` given the request's tools and thinking mode.

    BadInput (the API's 400) when the request cannot be enforced: an unknown tool name, "required" without
    tools, a schema the grammar engine rejects."""
    ll = ll_tokenizer(tokenizer)
    raw = tokenizer._tok if isinstance(tokenizer, PromptTokenizer) else tokenizer
    dsml, think_end = raw.token_to_id(DSML), raw.token_to_id(THINK_END)
    fns = [_function(t) for t in tools]
    if constraint.kind == "json":
        schema = dict(constraint.schema) if constraint.schema is not None else {"type": "object"}
        rules = [f"answer: {_json(schema)}"]
    elif constraint.kind in ("tool", "required"):
        if constraint.kind == "tool":
            chosen = [f for f in fns if f["name"] == constraint.name]
            if not chosen:
                names = ", ".join(repr(f["name"]) for f in fns) or "none"
                raise BadInput(f"tool_choice names the function {constraint.name!r}, which is not among the "
                               f"request's tools ({names})")
            calls = "invoke_0"
            rules_extra = []
        else:
            if not fns:
                raise BadInput('tool_choice "required" needs at least one tool in the request')
            chosen = fns
            calls = f"call ({_NL} call)*"
            rules_extra = ["call: " + " | ".join(f"invoke_{i}" for i in range(len(chosen)))]
        d = f"<[{dsml}]>"
        opening, after, closing, end = _lit("\n\n<"), _lit("tool_calls>\n"), _lit("\n</"), _lit("tool_calls>")
        rules = [f"answer: {opening} {d} {after} {calls} {closing} {d} {end}", *rules_extra]
        for i, fn in enumerate(chosen):
            rules += _invoke_rules(i, fn, d)
    else:
        raise BadInput(f"unknown constraint kind {constraint.kind!r}")
    start = f"start: THINK <[{think_end}]> answer\nTHINK: /(?s:.*)/" if Mode(mode).thinking else "start: answer"
    grammar = LLMatcher.grammar_from_lark("\n".join([start, *rules]))
    error = LLMatcher.validate_grammar(grammar, ll)
    if error and not error.startswith("WARNING"):
        # the first line says what is wrong; the rest quotes our generated grammar, which the client never wrote
        reason = re.sub(r"^at \d+\(\d+\): ", "", error.strip().splitlines()[0])
        raise BadInput(f"the requested output format cannot be enforced: {reason}")
    return TokenConstraint(grammar, ll, think_end if Mode(mode).thinking else None)


def _function(tool: Mapping[str, Any]) -> Mapping[str, Any]:
    # OpenAI's {"type": "function", "function": {...}} or the flat {"name", "parameters"} the contract uses
    fn = tool.get("function") if tool.get("type") == "function" else tool
    if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
        raise BadInput("a tool needs a 'name'")
    return fn


def _lit(text: str) -> str:
    """A Lark string literal (JSON's escaping is Lark's)."""
    return json.dumps(text, ensure_ascii=False)


def _json(schema: Mapping[str, Any]) -> str:
    """An inline JSON-schema rule whose JSON is shaped as json.dumps writes it."""
    return "%json " + json.dumps({**schema, "x-guidance": _JSON_SHAPE}, ensure_ascii=False)


def _invoke_rules(i: int, fn: Mapping[str, Any], d: str) -> list[str]:
    """`<｜DSML｜invoke name="N">` + "\n" + parameters joined by "\n" + `\n</｜DSML｜invoke>`: each parameter is
    written with its leading "\n"; no parameter at all leaves the bare "\n" (render's empty join)."""
    params = fn.get("parameters") or {}
    props = params.get("properties") or {}
    required = set(params.get("required") or ())
    defs = {k: params[k] for k in ("$defs", "definitions") if k in params}
    rules, items = [], []
    for j, (name, schema) in enumerate(props.items()):
        schema = {**schema, **defs} if isinstance(schema, Mapping) else {}
        rules += _param_rules(f"param_{i}_{j}", name, schema, d)
        items.append((f"{_NL} param_{i}_{j}", name in required))

    def tail(k: int) -> str:  # the parameters from k on, in order, the optional ones skippable
        return " ".join(item if req else f"({item})?" for item, req in items[k:])

    def nonempty(k: int) -> str | None:  # the same, with at least one written
        if k == len(items):
            return None
        item, req = items[k]
        first = f"{item} {tail(k + 1)}".strip()
        later = None if req else nonempty(k + 1)
        return first if later is None else f"({first}) | ({later})"

    body = nonempty(0)
    if body is None:
        body = _NL
    elif not any(req for _, req in items):
        body = f"{body} | {_NL}"
    lt, head, closing, end = _lit("<"), _lit('invoke name="' + fn["name"] + '">'), _lit("\n</"), _lit("invoke>")
    rules.append(f"invoke_{i}: {lt} {d} {head} (params_{i}) {closing} {d} {end}")
    rules.append(f"params_{i}: {body}")
    return rules


def _param_rules(rule: str, name: str, schema: Mapping[str, Any], d: str) -> list[str]:
    """One parameter: the string="true" form for the strings its schema admits, string="false" + JSON for the rest."""
    lt, head, close = _lit("<"), _lit('parameter name="' + name + '" string="'), _lit("parameter>")
    as_text, as_json, slash = _lit('true">'), _lit('false">'), _lit("</")
    text, other = _split_string(schema)
    forms, rules = [], []
    if text is not None:
        # the raw text and the "</" that opens the closing tag are one greedy lexeme: the text may contain "</"
        # too; the lexeme ends where the `｜DSML｜` token comes
        rules.append(f"{rule.upper()}_TEXT: {text} {slash}")
        forms.append(f"{as_text} {rule.upper()}_TEXT {d} {close}")
    if other is not None:
        rules.append(f"{rule}_json: {_json(other)}")
        forms.append(f"{as_json} {rule}_json {slash} {d} {close}")
    if not forms:
        raise BadInput(f"parameter {name!r} has a schema that admits no value")
    return [f"{rule}: {lt} {d} {head} ({' | '.join(forms)})", *rules]


def _split_string(schema: Mapping[str, Any]) -> tuple[str | None, Mapping[str, Any] | None]:
    """(a Lark terminal for the raw text of the string values the schema admits, or None;
    the schema for its non-string values, or None)."""
    values = schema.get("enum", [schema["const"]] if "const" in schema else None)
    if values is not None:
        strings = [v for v in values if isinstance(v, str)]
        others = [v for v in values if not isinstance(v, str)]
        text = "(" + " | ".join(_lit(v) for v in strings) + ")" if strings else None
        rest = {k: v for k, v in schema.items() if k != "const"}
        return text, ({**rest, "enum": others} if others else None)
    kind = schema.get("type")
    kinds = [kind] if isinstance(kind, str) else list(kind) if isinstance(kind, list) else None
    if kinds is None:
        # no plain type: a raw text form when some branch admits a string, and JSON under the whole schema
        return ("/(?s:.*)/" if _admits_string(schema, schema) else None), schema
    if "string" not in kinds:
        return None, schema
    lo, hi = int(schema.get("minLength", 0)), schema.get("maxLength")
    text = f"/(?s:.{{{lo},{'' if hi is None else int(hi)}}})/"
    rest = [k for k in kinds if k != "string"]
    return text, ({**schema, "type": rest} if rest else None)


def _admits_string(schema: Any, root: Mapping[str, Any], depth: int = 0) -> bool:
    """Whether some string is valid under `schema` (refs into the root's $defs followed; unknown: True)."""
    if not isinstance(schema, Mapping) or depth > 16:
        return True
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/"):
        target: Any = root
        for part in ref[2:].split("/"):
            target = target.get(part) if isinstance(target, Mapping) else None
        return _admits_string(target, root, depth + 1)
    if "enum" in schema or "const" in schema:
        return any(isinstance(v, str) for v in schema.get("enum", [schema.get("const")]))
    kind = schema.get("type")
    if kind is not None:
        return kind == "string" or (isinstance(kind, list) and "string" in kind)
    if "anyOf" in schema or "oneOf" in schema:
        return any(_admits_string(b, root, depth + 1) for b in schema.get("anyOf", schema.get("oneOf", [])))
    if "allOf" in schema:
        return all(_admits_string(b, root, depth + 1) for b in schema["allOf"])
    return True
