"""What the Chromium tests share: when to skip them, and running one of the Node scripts
in ``tests/browser/`` under a time limit.

Setup (once):  apt-get install -y chromium && npm ci --prefix tests/browser
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
BROWSER_DIR = TESTS / "browser"
ARTIFACTS = TESTS / "artifacts"
CHROMIUM = Path("/usr/bin/chromium")

# Skipping is for a developer's machine without a browser; CI installs both and must
# run these tests, so there a missing piece fails loudly instead.
IN_CI = bool(os.environ.get("CI"))

NEEDS_CHROMIUM = [
    pytest.mark.skipif(
        not CHROMIUM.exists() and not IN_CI,
        reason=f"{CHROMIUM} not found (apt-get install -y chromium)",
    ),
    pytest.mark.skipif(
        not (BROWSER_DIR / "node_modules" / "playwright-core").is_dir() and not IN_CI,
        reason="tests/browser/node_modules missing (npm ci --prefix tests/browser)",
    ),
]
"""The ``pytestmark`` of a module whose tests drive Chromium."""


async def run_script(script: str, *args: str, timeout: float) -> tuple[int, dict | None, str]:
    """Run ``tests/browser/<script>`` with Node; return (exit code, its JSON result or
    None, stderr). Fails the test if it runs past ``timeout`` seconds."""
    node = shutil.which("node")
    assert node, "node is not on PATH (needed for the browser test)"
    proc = await asyncio.create_subprocess_exec(
        node,
        str(BROWSER_DIR / script),
        *args,
        cwd=BROWSER_DIR,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        out, err = await proc.communicate()
        pytest.fail(
            f"{script} ran past {timeout} s\n"
            f"stdout:\n{out.decode(errors='replace')}\nstderr:\n{err.decode(errors='replace')}"
        )
    result = None
    for line in reversed(out.decode(errors="replace").splitlines()):
        if line.startswith("{"):
            result = json.loads(line)
            break
    return proc.returncode, result, err.decode(errors="replace")
