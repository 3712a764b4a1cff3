"""`untag`: a tag can be taken off again, from the library and from `peftkit registry untag` (the page uses the same call)."""
from __future__ import annotations

import pytest

from peftkit.cli import main
from peftkit.registry import InvalidNameError, UnknownRefError


def test_untag_deletes_only_the_tag(reg, make_adapter):
    reg.add(make_adapter(), name="retail-bot", tags=["stable", "canary"])
    entry = reg.untag("retail-bot:stable")
    assert entry.ref == "retail-bot@1" and entry.tags == ["canary"]
    assert reg.show("retail-bot@1").tags == ["canary"]  # the version stays
    with pytest.raises(UnknownRefError, match="retail-bot has no tag 'stable'; its tags: canary"):
        reg.untag("retail-bot:stable")
    with pytest.raises(InvalidNameError, match="untag takes NAME:TAG, e.g. retail-bot:stable"):
        reg.untag("retail-bot@1")


def test_untag_command(tmp_path, capsys, make_adapter):
    home = str(tmp_path / "reg")
    assert main(["registry", "add", str(make_adapter()), "--name", "retail-bot", "--tag", "stable", "--registry", home]) == 0
    capsys.readouterr()
    assert main(["registry", "untag", "retail-bot:stable", "--registry", home]) == 0
    assert capsys.readouterr().out.strip() == "untagged retail-bot:stable (was retail-bot@1; tags now none)"
    assert main(["registry", "untag", "retail-bot:stable", "--registry", home]) != 0
    assert "has no tag 'stable'" in capsys.readouterr().err
