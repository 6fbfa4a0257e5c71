"""The one streaming renderer of `v4 chat` and `v4 ask`: parser events in, terminal output out.

On a terminal: reasoning streams dimmed (or a "thinking" spinner with --hide-thinking), the answer renders as
Markdown in a Rich Live region (finished blocks are printed for good, so the live part stays one block tall),
prefill shows a progress bar with ETA on stderr. Not on a terminal: the answer is plain text on stdout and the
reasoning goes to stderr, so `v4 ask ... > answer.md` captures only the answer. Raw markup never reaches either:
the parser turns it into tool-call events, shown as one line each.
"""

from __future__ import annotations

import json
from contextlib import contextmanager

from rich.console import Console, Group
from rich.live import Live
from rich.markdown import Markdown
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.spinner import Spinner
from rich.text import Text

from v4cli.chat.answer import Reply
from v4cli.prompt.encoding import Mode
from v4cli.prompt.parser import ContentDelta, End, Event, ParseError, ReasoningDelta, ToolCallEvent

PROGRESS_MIN_TOKENS = 512  # a shorter prefill finishes before a bar would be worth drawing


def split_finished(text: str) -> tuple[str, str]:
    """(finished Markdown blocks, the block still growing): cut at the last blank line outside a code fence."""
    cut, fence, pos = 0, False, 0
    for line in text.splitlines(keepends=True):
        pos += len(line)
        if line.lstrip().startswith(("```", "~~~")):
            fence = not fence
        elif not fence and not line.strip() and pos < len(text):
            cut = pos
    return text[:cut], text[cut:]


def tool_line(ev: ToolCallEvent) -> str:
    """A tool call as one readable line (never the raw DSML)."""
    return f"[tool call] {ev.name}({json.dumps(ev.arguments, ensure_ascii=False)})"


class StreamView:
    """Renders one streamed answer; use as a context manager so Live regions always stop."""

    def __init__(self, mode: Mode, out: Console, err: Console, hide_thinking: bool = False,
                 rich: bool | None = None):
        self.mode, self.out, self.err, self.hide = Mode(mode), out, err, hide_thinking
        self.rich = out.is_terminal if rich is None else rich
        self._live: Live | None = None
        self._bar: Progress | None = None
        self._task = None
        self._pending = ""  # answer text not yet printed for good (the growing Markdown block)
        self._reasoning_chars = 0
        self._reasoning_open = False  # reasoning text printed without its closing newline
        self._wrote_content = False

    # -- prefill progress ----------------------------------------------------------------------------------

    def progress(self, done: int, total: int) -> None:
        """The Session's prefill callback: a bar with ETA on stderr for long prefills."""
        if self._bar is None:
            if done >= total or total < PROGRESS_MIN_TOKENS or not self.err.is_terminal:
                return
            self._bar = Progress(TextColumn("[bold]prefill"), BarColumn(),
                                 TextColumn("{task.completed:,}/{task.total:,} tokens"), TimeRemainingColumn(),
                                 console=self.err, transient=True)
            self._bar.start()
            self._task = self._bar.add_task("prefill", total=total)
        self._bar.update(self._task, completed=done, total=total)
        if done >= total:
            self._stop_bar()

    def _stop_bar(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    # -- events --------------------------------------------------------------------------------------------

    def event(self, ev: Event) -> None:
        """Show one parser event."""
        self._stop_bar()
        if isinstance(ev, ReasoningDelta):
            self._reasoning(ev.text)
        elif isinstance(ev, ContentDelta):
            self._content(ev.text)
        elif isinstance(ev, ToolCallEvent):
            self._note(tool_line(ev), to_err=not self.rich)
        elif isinstance(ev, ParseError):
            self._note(f"[dropped malformed tool-call markup: {ev.message}]", to_err=True)
        elif isinstance(ev, End):
            pass

    def _reasoning(self, text: str) -> None:
        self._reasoning_chars += len(text)
        if self.hide:
            if self.rich:
                self._ensure_live().update(self._renderable())
            return
        if self.rich:
            self.out.print(text, style="dim", end="", markup=False, highlight=False, soft_wrap=True)
        else:
            self.err.file.write(text)
            self.err.file.flush()
        self._reasoning_open = not text.endswith("\n")

    def _end_reasoning(self) -> None:
        if self._reasoning_chars and not self.hide and not self._wrote_content:
            console = self.out if self.rich else self.err
            console.file.write("\n\n" if self._reasoning_open else "\n")
            console.file.flush()
            self._reasoning_open = False

    def _content(self, text: str) -> None:
        self._end_reasoning()
        self._wrote_content = True
        if not self.rich:
            self.out.file.write(text)
            self.out.file.flush()
            return
        self._pending += text
        done, self._pending = split_finished(self._pending)
        live = self._ensure_live()
        if done:
            live.console.print(Markdown(done))
        live.update(self._renderable())

    def _note(self, line: str, to_err: bool) -> None:
        if self._live is not None and not to_err:
            self._live.console.print(Text(line, style="dim"))
        elif to_err:
            self.err.print(Text(line, style="dim"), soft_wrap=True)
        else:
            self.out.print(Text(line, style="dim"), soft_wrap=True)

    def _renderable(self):
        if not self._wrote_content and self.hide:
            return Spinner("dots", Text(f"thinking… {self._reasoning_chars:,} characters", style="dim"))
        return Markdown(self._pending) if self._pending else Group()

    def _ensure_live(self) -> Live:
        if self._live is None:
            self._live = Live(self._renderable(), console=self.out, refresh_per_second=8, transient=False)
            self._live.start()
        return self._live

    # -- end -----------------------------------------------------------------------------------------------

    def close(self) -> None:
        """Print what is still pending and stop the live region (safe to call twice)."""
        self._stop_bar()
        if self._live is not None:
            if not self._wrote_content:
                self._live.update(Group())  # the "thinking" spinner goes away
            else:
                self._live.update(Markdown(self._pending) if self._pending else Group())
            self._live.stop()
            self._live = None
            self._pending = ""
        elif self._reasoning_open and not self.hide:
            (self.out if self.rich else self.err).file.write("\n")
            self._reasoning_open = False
        if self._wrote_content and not self.rich:
            self.out.file.write("\n")
            self.out.file.flush()
        self._wrote_content = False

    def __enter__(self) -> StreamView:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def status_line(reply: Reply, held: int | None = None, ctx: int | None = None) -> str:
    """One line after an answer: tokens and speed, prefill reuse, context used."""
    parts = [f"{reply.completion_tokens:,} tokens", f"{reply.decode_tps:.1f} tok/s"]
    prefilled = reply.prompt_tokens - reply.reused_tokens
    parts.append(f"prefill {prefilled:,} tokens ({reply.prefill_tps:.0f} tok/s), {reply.reused_tokens:,} reused")
    if held is not None and ctx:
        parts.append(f"context {held:,}/{ctx:,} ({100 * held / ctx:.1f}%)")
    if reply.finish_reason not in ("eos", None):
        parts.append(f"finish: {reply.finish_reason}")
    return " · ".join(parts)


@contextmanager
def busy(err: Console, description: str):
    """An elapsed-time bar on stderr for a step that reports no progress of its own (load, tokenize)."""
    bar = Progress(SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(), TimeElapsedColumn(),
                   console=err, transient=True, disable=not err.is_terminal)
    with bar:
        bar.add_task(description, total=None)
        yield


def dry_run_lines(report) -> list[str]:
    """`v4 ask --dry-run`: the token tree (directories then files, largest first), the other pieces, what was
    left out and why, truncations, and the total against the budget. Plain lines (an `ingest.DryRun` in)."""
    lines = ["tokens  path"]

    def walk(node, depth: int) -> None:
        for child in node.sorted_children():
            name = child.name + ("/" if child.is_dir else "")
            note = f"  ({child.note})" if child.note else ""
            lines.append(f"{child.tokens:>8,}  {'  ' * depth}{name}{note}")
            if child.is_dir:
                walk(child, depth + 1)

    if report.tree.children:
        lines.append(f"{report.tree.tokens:>8,}  ./")
        walk(report.tree, 1)
    for label, n in report.other:
        lines.append(f"{n:>8,}  [{label}]")
    if report.skipped:
        lines.append("")
        lines.append(f"left out ({len(report.skipped)}):")
        for s in report.skipped:
            lines.append(f"  {s.path}  {s.reason}" + (f": {s.detail}" if s.detail else ""))
    if report.truncated:
        lines.append("")
        lines.append(f"truncated ({len(report.truncated)}):")
        for t in report.truncated:
            whole = f"{t.total_tokens:,} tokens" if t.total_tokens is not None else f"{t.size_bytes:,} bytes"
            lines.append(f"  {t.path}  kept {t.kept_lines:,} lines ({t.kept_tokens:,} tokens) of {whole}")
    lines.append("")
    verdict = "fits" if report.total_tokens <= report.budget else f"{report.total_tokens - report.budget:,} over"
    lines.append(f"total {report.total_tokens:,} tokens of a {report.budget:,} budget ({verdict})")
    return lines
