"""Credential detection for `v4 ask` ingestion: which files are never read, and which texts hold a secret.

A repo given to `v4 ask` goes into a prompt, a disk cache and maybe another machine, so a credential must not
reach it. `secret_name` judges a path by its name alone (the file is never opened); `scan_text` looks for
secrets inside an ordinary file. Both use high-precision rules only: a false positive drops a useful file from
the context, so entropy and keyword guesses are left out.

Why a rule table here and not detect-secrets 1.5.0 (measured 2026-12 on this 2-core machine; the command is
`python benchmarks/secret_scan_precision.py`):
- it misses cases we must catch: encrypted PKCS#8 keys (`BEGIN ENCRYPTED PRIVATE KEY`), PuTTY v3 keys,
  fine-grained GitHub tokens (`github_pat_`), Hugging Face tokens;
- its key rule matches a bare header, and its AWS rule any `AKIA` + 16 characters: its eight high-precision
  plugins flag 12 stdlib files and 67 site-packages files (54 of them AWS's documentation keys, most marked
  EXAMPLE; keys elided as `MIIEow...fvY4` or "key omitted"), and this module itself; these rules flag 0 and 3;
- it scans a line at a time: on 1 MB of stdlib source 0.5-1.7 MB/s through `scan_line`, 2-6 MB/s calling the
  plugins directly, against ingestion's ~4 MB/s; these rules run at 20-45 MB/s. Importing it costs 0.1-0.5 s
  (it pulls in `requests` for online verification, which we would never use).
Its high-precision plugins are one or two regexes each; the rows below start from them (and from GitHub's,
Slack's and Stripe's published token formats), then tighten them: a key header counts only when a whole line
of body follows it, and a token whose random part is a placeholder (`EXAMPLE`, a run of one character) does
not count.
"""

from __future__ import annotations

import bisect
import fnmatch
import re
from dataclasses import dataclass

# Names compared lower-cased: `.ENV` and `server.PEM` are the same files on case-insensitive disks and to people.
_SECRET_NAMES = {
    ".env": "dotenv file",
    ".envrc": "direnv file",
    ".netrc": "netrc credentials",
    "_netrc": "netrc credentials",
    ".npmrc": "npm credentials",
    ".pypirc": "PyPI credentials",
    ".git-credentials": "git credentials",
    ".pgpass": "PostgreSQL password file",
    ".htpasswd": "htpasswd file",
    ".s3cfg": "s3cmd credentials",
    ".dockercfg": "Docker registry credentials",
}
# Parent-qualified names: `config` alone is ordinary, `.kube/config` holds cluster tokens.
_SECRET_PATHS = {
    ".aws/credentials": "AWS credentials",
    ".kube/config": "Kubernetes credentials",
    ".docker/config.json": "Docker registry credentials",
}
# Directories whose files are keys whatever they are called, except the listed public ones.
_SECRET_DIRS = {".ssh": "file in .ssh", ".gnupg": "file in .gnupg"}
_SSH_PUBLIC = {"config", "known_hosts", "known_hosts.old", "authorized_keys", "authorized_keys2"}
_SECRET_GLOBS = (
    (".env.*", "dotenv file"),
    ("*.env", "dotenv file"),
    ("id_rsa*", "SSH private key"),
    ("id_dsa*", "SSH private key"),
    ("id_ecdsa*", "SSH private key"),
    ("id_ed25519*", "SSH private key"),
    ("*.pem", "PEM key or certificate"),
    ("*.key", "key file"),
    ("*.p8", "PKCS#8 key"),
    ("*.p12", "PKCS#12 keystore"),
    ("*.pfx", "PKCS#12 keystore"),
    ("*.jks", "Java keystore"),
    ("*.keystore", "Java keystore"),
    ("*.ppk", "PuTTY private key"),
    ("*.kdbx", "KeePass database"),
    ("*.tfstate", "Terraform state"),
    ("*.tfstate.backup", "Terraform state"),
    ("credentials*.json", "credentials JSON"),
    ("client_secret*.json", "OAuth client secret"),
)
# `.env.example`, `sample.env` and the like document which variables exist and are meant to be committed;
# they are read, and `scan_text` still catches a real key pasted into one.
_TEMPLATE_WORDS = ("example", "sample", "template", "dist", "defaults")


def _is_template(name: str) -> bool:
    parts = name.split(".")
    return any(w in parts for w in _TEMPLATE_WORDS)


def secret_name(path: str) -> str | None:
    """Why a path's name marks it as a credential file (never read), or None. `path` uses `/` separators."""
    low = path.lower()
    parts = low.split("/")
    name = parts[-1]
    if name.endswith(".pub"):
        return None
    for d in parts[:-1]:
        if d in _SECRET_DIRS and not (d == ".ssh" and name in _SSH_PUBLIC):
            return _SECRET_DIRS[d]
    for tail, why in _SECRET_PATHS.items():
        if low == tail or low.endswith("/" + tail):
            return why
    if name in _SECRET_NAMES:
        return _SECRET_NAMES[name]
    if _is_template(name):
        return None
    for glob, why in _SECRET_GLOBS:
        if fnmatch.fnmatchcase(name, glob):
            return f"{why} (name matches {glob})"
    return None


@dataclass(frozen=True)
class Finding:
    """One secret found in a text: which rule, and its 1-based line."""

    rule: str
    line: int


# A real token's random part never says EXAMPLE (AWS's documented sample keys do) nor repeats one character
# five times (`xxxxx`, `00000`: placeholders in docs); both checks cost recall only ~1e-6 per random token.
_PLACEHOLDER = re.compile(r"EXAMPLE|(.)\1{4}", re.IGNORECASE)
# Key bodies are DER or OpenSSH structures, full of `AAAAA` runs: only the EXAMPLE marker applies there.
_SAMPLE = re.compile("EXAMPLE")


@dataclass(frozen=True)
class Rule:
    """A content rule: a regex whose `secret` group, if it matched, must not look like a placeholder."""

    name: str
    pattern: re.Pattern[str]
    placeholder: re.Pattern[str] = _PLACEHOLDER


# Between a key's header and its body: real newlines, JSON/C `\n` escapes, indentation, and the quotes, commas
# and `+` of a key split over string literals. A header followed by anything else is a mention, not a key.
_GAP = r"""(?:\\r|\\n|["'\s,+])*"""
# The body's first line, whole: an elided sample (`MIIEow...fvY4`) is not a key.
_BODY = r"""(?P<secret>[A-Za-z0-9+/=]{32,})(?:\\r|\\n|["'\s]|$)"""
# Headers are assembled from parts so this file does not itself look like it holds a key.
_D5 = "-" * 5


def _starts_word(n: int) -> str:
    """Placed after an n-character prefix (a literal, or one class then a literal): no word character before
    it. A lookbehind first would hide the literal from the regex engine's prefix search: ~40x slower (measured)."""
    return f"(?<![A-Za-z0-9_].{{{n}}})"


def _rule(name: str, pattern: str) -> Rule:
    return Rule(name, re.compile(pattern))


def _key(name: str, header: str, fields: str) -> Rule:
    """A key block: its header, then either one of its armor `fields` or a whole first line of body."""
    return Rule(name, re.compile(header + _GAP + f"(?:(?:{fields}):|{_BODY})"), _SAMPLE)


RULES: tuple[Rule, ...] = (
    _key("private key", _D5 + "BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY" + _D5, "Proc-Type"),
    _key("PGP private key", _D5 + "BEGIN PGP PRIVATE KEY BLOCK" + _D5, "Version|Comment|Hash|Charset"),
    _key("SSH2 private key", "-" * 4 + " BEGIN SSH2 ENCRYPTED PRIVATE KEY " + "-" * 4, "Comment|Subject"),
    _rule("PuTTY private key", r"PuTTY-User-Key-File-\d+: *[\w@.-]+" + _GAP + "Encryption:"),
    _rule("AWS access key ID", r"(?P<secret>(?:AKIA|ASIA|ABIA|ACCA|A3T[A-Z0-9])" + _starts_word(4) + r"[A-Z0-9]{16})"
          r"(?![A-Za-z0-9_])"),
    # The secret access key has no prefix: only a 40-character mixed-case value assigned to an AWS key name.
    _rule("AWS secret access key", r"(?i:aws.{0,20}?(?:secret|key|token|pass)).{0,20}?['\"]"
          r"(?P<secret>(?=[A-Za-z0-9/+]{0,39}[A-Z])(?=[A-Za-z0-9/+]{0,39}[a-z])[A-Za-z0-9/+]{40})['\"]"),
    _rule("GitHub token", r"(?P<secret>gh[pousr]_" + _starts_word(4) + r"[A-Za-z0-9]{36})(?![A-Za-z0-9_])"),
    _rule("GitHub fine-grained token", r"(?P<secret>github_pat_" + _starts_word(11) + r"[A-Za-z0-9_]{82})"
          r"(?![A-Za-z0-9_])"),
    _rule("GitLab token", r"(?P<secret>glpat-" + _starts_word(6) + r"[A-Za-z0-9_-]{20,64})(?![A-Za-z0-9_-])"),
    _rule("Slack token", r"(?P<secret>xox[abposre]-" + _starts_word(5) + r"(?:[0-9]+-)+[A-Za-z0-9]{20,})"),
    _rule("Slack webhook", r"hooks\.slack\.com/services/(?P<secret>T[A-Z0-9]{8,}/B[A-Z0-9]{8,}/[A-Za-z0-9]{24})"),
    # Test-mode keys (sk_test_) cannot move money and fill Stripe's docs and tutorials; only live keys count.
    _rule("Stripe live key", r"k_live_(?<=[rs]k_live_)" + _starts_word(8) + r"(?P<secret>[A-Za-z0-9]{24,})"),
    # T3BlbkFJ is base64 for "OpenAI", embedded in every OpenAI key format so far.
    _rule("OpenAI key", r"sk-" + _starts_word(3)
          + r"(?P<secret>[A-Za-z0-9_-]{20,200}T3BlbkFJ[A-Za-z0-9]{20})"),
    _rule("Anthropic key", r"(?P<secret>sk-ant-(?:api|admin)[0-9]{2}-[A-Za-z0-9_-]{80,})"),
    _rule("Hugging Face token", r"(?P<secret>hf_" + _starts_word(3) + r"(?=[A-Za-z]{0,33}[A-Z])(?=[A-Za-z]{0,33}[a-z])"
          r"[A-Za-z]{34})(?![A-Za-z0-9_])"),
    # "AgEIcHlwaS5vcmc" is the macaroon header naming pypi.org.
    _rule("PyPI token", r"(?P<secret>pypi-AgEIcHlwaS5vcmc[A-Za-z0-9_-]{50,})"),
    _rule("npm token", r"(?P<secret>npm_" + _starts_word(4) + r"[A-Za-z0-9]{36})(?![A-Za-z0-9_])"),
)

def _real(rule: Rule, m: re.Match[str]) -> bool:
    secret = m.groupdict().get("secret")
    return secret is None or rule.placeholder.search(secret) is None


def scan_text(text: str) -> list[Finding]:
    """Every secret found in `text` (one Finding per rule and line), in line order."""
    hits = [(m.start(), rule.name) for rule in RULES for m in rule.pattern.finditer(text) if _real(rule, m)]
    if not hits:
        return []
    # Newline offsets once, then a bisect per hit: a hostile file of many keys stays linear.
    newlines = [m.start() for m in re.finditer("\n", text)]
    found = {Finding(name, bisect.bisect_left(newlines, pos) + 1) for pos, name in hits}
    return sorted(found, key=lambda f: (f.line, f.rule))
