"""The one path rule for names from outside (v4cli/safepath.py)."""

import os

import pytest

from v4cli.safepath import UnsafePath, hex_digest, inside, safe_relpath

BAD = ["../x.safetensors", "encoding/../../../../x.py", "/etc/passwd", "C:/x", "a\\b", "a//b", "./a", "a/.",
       "", "a\x00b", "a\nb", None, 3]


@pytest.mark.parametrize("name", BAD)
def test_refuses_names_that_are_not_plain_relative_paths(name):
    with pytest.raises(UnsafePath):
        safe_relpath(name)


@pytest.mark.parametrize("name", ["model.safetensors", "encoding/tokenizer.json", "a/b/c..d", "..x", "x.."])
def test_accepts_plain_relative_paths(name):
    assert safe_relpath(name) == name


def test_inside_refuses_a_symlink_out_of_the_root(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    os.symlink(tmp_path, root / "out")
    assert inside(root, "a/b.txt") == root / "a" / "b.txt"
    with pytest.raises(UnsafePath, match="outside"):
        inside(root, "out/x.txt")


def test_hex_digest():
    assert hex_digest("AB" * 32, 64) == "ab" * 32
    for bad in ["../" + "a" * 61, "g" * 64, "a" * 63, 5]:
        with pytest.raises(UnsafePath):
            hex_digest(bad, 64)
