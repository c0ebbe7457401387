"""aiortc/aioice internals whipcast relies on are all present, and a missing one fails
with a message naming the versions (no broker, no network: runs in milliseconds)."""

from __future__ import annotations

from importlib import metadata

import pytest
from whipcast.gateway import aiortc_compat


def test_installed_aiortc_has_every_internal_used():
    assert aiortc_compat.missing() == []
    aiortc_compat.check()


def test_pinned_versions_are_the_tested_ones():
    for package, version in aiortc_compat.TESTED.items():
        assert metadata.version(package) == version


def test_a_missing_internal_is_named_with_the_versions():
    class Renamed:
        def __init__(self) -> None:
            self._other = 1

    required = ((Renamed, "_tx_srtp", "init"), (Renamed, "_send_rtp", "attr"))
    assert aiortc_compat.missing(required) == ["Renamed._tx_srtp", "Renamed._send_rtp"]
    with pytest.raises(ImportError, match=r"aiortc==1\.16\.0.*Renamed\._tx_srtp"):
        aiortc_compat.check(required)


def test_private_names_are_used_only_in_the_compat_module():
    """No gateway module but aiortc_compat reaches into aiortc's internals."""
    import pathlib
    import re

    gateway = pathlib.Path(aiortc_compat.__file__).parent
    names = {name for _, name, _ in aiortc_compat.REQUIRED if name.startswith("_")}
    pattern = re.compile(r"\.(" + "|".join(map(re.escape, sorted(names))) + r")\b")
    offenders = []
    for path in gateway.glob("*.py"):
        if path.name == "aiortc_compat.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            for match in pattern.finditer(line):
                if not line[: match.start()].rstrip().endswith("self"):
                    offenders.append(f"{path.name}:{number}: {line.strip()}")
    assert offenders == []
