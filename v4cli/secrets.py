"""Credential detection for `v4 ask` ingestion: which files are never read, and which texts hold a secret.

A repo given to `v4 ask` goes into a prompt, a disk cache and maybe another machine, so a credential must not
reach it. `secret_name` judges a path by its name alone (the file is never opened); `scan_text` looks for
secrets inside an ordinary file. Both use high-precision rules only: a false positive drops a useful file from
the context, so entropy and keyword guesses are left out.
"""

from __future__ import annotations

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
# Parent-directory-qualified names: `config` alone is ordinary, `.kube/config` holds cluster tokens.
_SECRET_PATHS = {
    ".aws/credentials": "AWS credentials",
    ".kube/config": "Kubernetes credentials",
    ".docker/config.json": "Docker registry credentials",
}
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
# Templates that document which variables exist; they are meant to be committed and shared. Their text is
# still scanned, so a real key pasted into one is caught by `scan_text`.
_TEMPLATE_SUFFIXES = (".example", ".sample", ".template", ".dist", ".defaults")
_PUBLIC = (".pub",)


def secret_name(path: str) -> str | None:
    """Why a path's name marks it as a credential file (never read), or None. `path` uses `/` separators."""
    low = path.lower()
    name = low.rsplit("/", 1)[-1]
    if name.endswith(_TEMPLATE_SUFFIXES) or name.endswith(_PUBLIC):
        return None
    if name in _SECRET_NAMES:
        return f"{_SECRET_NAMES[name]} ({path.rsplit('/', 1)[-1]})"
    for tail, why in _SECRET_PATHS.items():
        if low == tail or low.endswith("/" + tail):
            return why
    for glob, why in _SECRET_GLOBS:
        if fnmatch.fnmatchcase(name, glob):
            return f"{why} (name matches {glob})"
    return None


@dataclass(frozen=True)
class Finding:
    """One secret found in a text: which rule, and its 1-based line."""

    rule: str
    line: int


# Built from parts so this source file is not itself flagged. Leading space allows keys indented in YAML.
_BEGIN = "-----BEGIN "
_RULES = (
    ("private key", re.compile(_BEGIN + "(?:[A-Z0-9]+ )*" + "PRIVATE KEY-----")),
    ("PGP private key", re.compile(_BEGIN + "PGP PRIVATE KEY " + "BLOCK-----")),
    ("PuTTY private key", re.compile("^PuTTY-User-" + r"Key-File-\d+:", re.MULTILINE)),
)


def scan_text(text: str) -> list[Finding]:
    """Every secret found in `text`, in line order."""
    found = []
    for rule, rx in _RULES:
        for m in rx.finditer(text):
            found.append(Finding(rule, text.count("\n", 0, m.start()) + 1))
    found.sort(key=lambda f: (f.line, f.rule))
    return found
