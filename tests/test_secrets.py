"""Secret rules for `v4 ask`: credential file names, and one positive and one near-miss per content rule.

Every fake secret is assembled at test time (prefix + seeded random body, PEM headers from parts), so this
file holds nothing a secret scanner or GitHub push protection would flag; the last test checks that for the
whole repository.
"""

from __future__ import annotations

import random
import shutil
import string
import subprocess
from pathlib import Path

import pytest

from v4cli.secrets import RULES, Finding, scan_text, secret_name

ALNUM = string.ascii_letters + string.digits
UPPER_DIGITS = string.ascii_uppercase + string.digits
B64 = ALNUM + "+/"


def rand(n: int, alphabet: str = ALNUM, seed: int = 0) -> str:
    rng = random.Random(f"{seed}:{n}:{alphabet}")
    return "".join(rng.choice(alphabet) for _ in range(n))


D5 = "-" * 5
BODY = [rand(64, B64, seed=i) for i in range(3)]


def pem(kind: str, sep: str = "\n", indent: str = "") -> str:
    """A PEM block with a fake body; `sep` is the line separator as written in the file (`\\n` for JSON)."""
    lines = [f"{D5}BEGIN {kind}{D5}", *BODY, f"{D5}END {kind}{D5}"]
    return sep.join(indent + line for line in lines) + sep


AWS_ID = "AKIA" + rand(16, UPPER_DIGITS)
AWS_SECRET = rand(40, B64, seed=1)
GHP = "ghp_" + rand(36)
LIVE, TEST = "sk_" + "live_", "sk_" + "test_"

# (rule, line where the secret starts, text holding it, near miss that must not be flagged)
CASES = [
    ("private key", 4, "import x\n\nKEY = '''\n" + pem("RSA PRIVATE KEY") + "'''\n",
     'if line.strip() == "' + D5 + "BEGIN RSA PRIVATE KEY" + D5 + '":\n    return parse_block(lines)\n'),
    # service-account JSON: the PEM is one string with \n escapes
    ("private key", 3, '{\n  "type": "service_account",\n  "private_key": "' + pem("PRIVATE KEY", sep="\\n") + '"\n}\n',
     '{\n  "type": "service_account",\n  "private_key": "' + D5 + "BEGIN PRIVATE KEY" + D5 + '\\n...\\n"\n}\n'),
    # indented under a YAML block scalar
    ("private key", 3, "tls:\n  key: |\n" + pem("EC PRIVATE KEY", indent="    "),
     "tls:\n  key: |\n    " + D5 + "BEGIN EC PRIVATE KEY" + D5 + "\n    <redacted>\n"),
    # OpenSSH bodies open with runs of A (not a placeholder); a documentation sample with an elided body is not a key
    ("private key", 1, D5 + "BEGIN OPENSSH PRIVATE KEY" + D5 + "\nb3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAAB"
     + BODY[0] + "\n", '"PrivateKey": "' + D5 + "BEGIN RSA PRIVATE KEY" + D5 + "\\n" + BODY[0][:44] + "..."
     + BODY[1][:7] + "\\n" + D5 + "END RSA PRIVATE KEY" + D5 + '\\n"\n'),
    # AWS marks its published sample keys EXAMPLE
    ("private key", 2, "k: |\n  " + D5 + "BEGIN RSA PRIVATE KEY" + D5 + "\n  " + BODY[1] + "\n",
     "k: |\n  " + D5 + "BEGIN RSA PRIVATE KEY" + D5 + "\n  EXAMPLE" + BODY[1][7:] + "\n"),
    # encrypted PKCS#8 (detect-secrets 1.5.0 misses it) and legacy encrypted PKCS#1 with RFC 1421 headers
    ("private key", 3, "\n\n" + pem("ENCRYPTED PRIVATE KEY"), "see ENCRYPTED PRIVATE KEY blocks in RFC 5958\n"),
    ("private key", 2, "x\n" + D5 + "BEGIN RSA PRIVATE KEY" + D5 + "\nProc-Type: 4,ENCRYPTED\nDEK-Info: AES,00\n",
     "x\n" + D5 + "BEGIN RSA PRIVATE KEY" + D5 + "\n(body elided)\n"),
    ("PGP private key", 2, "\n" + D5 + "BEGIN PGP PRIVATE KEY BLOCK" + D5 + "\nVersion: GnuPG v2\n\n" + BODY[0] + "\n",
     'ARMOR = ("' + D5 + "BEGIN PGP PRIVATE KEY BLOCK" + D5 + '")\n'),
    ("SSH2 private key", 1, "-" * 4 + " BEGIN SSH2 ENCRYPTED PRIVATE KEY " + "-" * 4 + "\nComment: k\n" + BODY[0],
     "The ---- BEGIN SSH2 ENCRYPTED PRIVATE KEY ---- marker starts an SSH.com key.\n"),
    ("PuTTY private key", 1, "PuTTY-User-" + "Key-File-3: ssh-ed25519\nEncryption: none\nComment: k\n",
     "PuTTY-User-Key-File-2 is the header of .ppk files; see the PuTTY manual.\n"),
    ("AWS access key ID", 2, f'[default]\naws_access_key_id = "{AWS_ID}"\n',
     # AWS's documented sample key, and an ID-shaped run inside a longer token
     "aws_access_key_id = AKIA" + "IOSFODNN7EXAMPLE\nblob = x" + AWS_ID + "\n"),
    ("AWS secret access key", 2, f'\nAWS_SECRET_ACCESS_KEY = "{AWS_SECRET}"\n',
     # a 40-character hex digest is not a secret key; nor is AWS's documented sample secret
     'aws_key_sha1 = "' + rand(40, "0123456789abcdef") + '"\naws_secret = "wJalrXUtnFEMI/K7MDENG/bPxRfiCY'
     + 'EXAMPLEKEY"\n'),
    ("GitHub token", 1, f"token: {GHP}\n", "token: ghp_" + "x" * 36 + "\nshort: ghp_" + rand(35) + "\n"),
    ("GitHub fine-grained token", 1, "GH=github_pat_" + rand(22, seed=2) + "_" + rand(59, seed=2) + "\n",
     "GH=github_pat_" + rand(40, seed=2) + "\n"),
    ("GitLab token", 1, "CI_TOKEN: glpat-" + rand(20, seed=3) + "\n", "CI_TOKEN: glpat-" + "x" * 20 + "\n"),
    ("Slack token", 1, "SLACK=xoxb-" + rand(12, string.digits) + "-" + rand(13, string.digits) + "-" + rand(24) + "\n",
     "SLACK=xoxb-123-abc  # placeholder\n"),
    ("Slack webhook", 1, "url = 'https://hooks.slack.com/services/T" + rand(8, UPPER_DIGITS) + "/B"
     + rand(10, UPPER_DIGITS) + "/" + rand(24) + "'\n",
     "url = 'https://hooks.slack.com/services/T00000000/B00000000/" + "X" * 24 + "'\n"),
    ("Stripe live key", 1, f"stripe.api_key = '{LIVE}{rand(24, seed=4)}'\n",
     # test-mode keys are not flagged (decision in v4cli/secrets.py)
     f"stripe.api_key = '{TEST}{rand(24, seed=4)}'\n"),
    ("OpenAI key", 1, "OPENAI_API_KEY=sk-proj-" + rand(20, seed=5) + "T3Blbk" + "FJ" + rand(20, seed=6) + "\n",
     "OPENAI_API_KEY=sk-" + rand(48, seed=5) + "\n"),
    ("Anthropic key", 1, "ANTHROPIC_API_KEY=sk-ant-api03-" + rand(93, ALNUM + "-_", seed=7) + "\n",
     "ANTHROPIC_API_KEY=sk-ant-api03-...\n"),
    ("Hugging Face token", 1, "HF_TOKEN=hf_" + rand(34, string.ascii_letters, seed=8) + "\n",
     # lower-case only: an identifier, not a token
     "hf_" + "downloadmanagerwithcachedirectory = 1\n"),
    ("PyPI token", 1, "password = pypi-AgEIcHlwaS5vcmc" + rand(120, ALNUM + "-_", seed=9) + "\n",
     "password = pypi-" + rand(30, seed=9) + "\n"),
    ("npm token", 1, "//registry.npmjs.org/:_authToken=npm_" + rand(36, seed=10) + "\n",
     "//registry.npmjs.org/:_authToken=npm_" + rand(35, seed=10) + "\n"),
]


def test_every_rule_has_cases():
    assert {c[0] for c in CASES} == {r.name for r in RULES}


@pytest.mark.parametrize("rule,line,text,near_miss", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_rule_positive_and_near_miss(rule, line, text, near_miss):
    assert scan_text(text) == [Finding(rule, line)]
    assert scan_text(near_miss) == []


def test_findings_are_per_line_sorted_and_linear_in_count():
    # One key per line over many lines (a hostile file): every line reported once, in order, CRLF counted.
    text = "".join(f"k{i} = {'AKIA' + rand(16, UPPER_DIGITS, seed=i)}  # {GHP}\r\n" for i in range(2000))
    found = scan_text(text)
    assert found[:2] == [Finding("AWS access key ID", 1), Finding("GitHub token", 1)]
    assert len(found) == 4000 and found[-1] == Finding("GitHub token", 2000)
    assert scan_text(f"a = '{GHP}' b = '{GHP}'\n") == [Finding("GitHub token", 1)]


@pytest.mark.parametrize("path", [
    ".env", ".ENV", "app/.Env.Local", ".env.production", "deploy/prod.env", ".envrc", ".netrc", "_netrc",
    ".npmrc", ".pypirc", ".git-credentials", ".pgpass", ".htpasswd", ".s3cfg",
    "server.PEM", "tls/server.key", "AuthKey_AB12.p8", "cert.P12", "cert.pfx", "app.JKS", "release.keystore",
    "keys/putty.PPK", "vault.kdbx", "infra/terraform.tfstate", "infra/terraform.tfstate.backup",
    "ID_RSA", "home/.ssh/id_ed25519", ".ssh/deploy_key", ".gnupg/private-keys-v1.d/AB.key",
    ".aws/credentials", "home/.AWS/Credentials", ".kube/config", "home/.kube/config", ".docker/config.json",
    "gcp/credentials.json", "client_secret_123.apps.googleusercontent.com.json",
])
def test_credential_names(path):
    assert secret_name(path) is not None


@pytest.mark.parametrize("path", [
    # templates document variables and are meant to be shared; their text is still scanned
    ".env.example", ".env.sample", ".ENV.Template", ".env.dist", "example.env",
    "id_rsa.pub", ".ssh/config", ".ssh/known_hosts", ".ssh/authorized_keys",
    "kube/config", "config.json", "docker/config.json", "src/environment.py", "envrc.md", "credentials.py",
    "keys.py", "docs/tfstate.md", "v4cli/secrets.py", "README.md",
])
def test_ordinary_names(path):
    assert secret_name(path) is None


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_repository_itself_is_clean():
    # The fakes above and the rule table are built from parts; nothing tracked here may look like a secret,
    # or `v4 ask .` would hide our own files and GitHub push protection would reject a push.
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run(["git", "ls-files", "-z"], cwd=root, capture_output=True)
    if out.returncode != 0:
        pytest.skip("not a git checkout")
    flagged = []
    for rel in filter(None, out.stdout.decode().split("\0")):
        path = root / rel
        if secret_name(rel) is not None:
            flagged.append((rel, "name"))
        elif path.is_file() and b"\0" not in (data := path.read_bytes())[:8192]:
            flagged += [(rel, f) for f in scan_text(data.decode("utf-8", "replace"))]
    assert flagged == []
