"""Importing the package asks PyTorch for huge pages; the kernel's own fault counter shows it."""

import json
import os
import subprocess
import sys

import pytest

from pyro_backpass import huge_pages

# A fresh process: import the package (or not), then write a 64 MB tensor and count the minor
# page faults that writing it costs (the kernel's counter, independent of our code).
PROBE = """
import json, os, resource, sys
if sys.argv[1] == "import":
    import pyro_backpass  # noqa: F401
import torch
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
torch.empty(2**24).fill_(1.0)  # 64 MB, above glibc's mmap threshold: fresh pages
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"env": os.environ.get("THP_MEM_ALLOC_ENABLE"), "faults": faults}))
"""


def _probe(mode: str, env_value: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != huge_pages.ENV}
    if env_value is not None:
        env[huge_pages.ENV] = env_value
    out = subprocess.run([sys.executable, "-c", PROBE, mode], env=env, check=True,
                         capture_output=True, text=True)  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


_THP = huge_pages.kernel_huge_pages() in ("always", "madvise")


def test_import_sets_the_switch_and_a_large_tensor_costs_few_page_faults():
    got = _probe("import", None)
    assert got["env"] == "1"
    if _THP:  # 64 MB in 4 kB pages is 16,384 faults; in 2 MB pages, 32 (plus a few)
        assert got["faults"] < 2_000, got


@pytest.mark.slow
def test_the_users_choice_stands_and_without_huge_pages_the_faults_come_back():
    got = _probe("import", "0")
    assert got["env"] == "0"
    if _THP:
        assert got["faults"] > 10_000, got
    assert _probe("plain", None)["env"] is None  # torch alone does not set it


def test_kernel_mode_is_read_from_sysfs(tmp_path, monkeypatch):
    f = tmp_path / "enabled"
    f.write_text("always [madvise] never\n")
    monkeypatch.setattr(huge_pages, "_SYSFS", f)
    assert huge_pages.kernel_huge_pages() == "madvise"
    monkeypatch.setattr(huge_pages, "_SYSFS", tmp_path / "missing")
    assert huge_pages.kernel_huge_pages() == "unknown"


def test_requested_follows_the_environment(monkeypatch):
    monkeypatch.setenv(huge_pages.ENV, "0")
    huge_pages.request_huge_pages()  # does not override
    assert not huge_pages.huge_pages_requested()
    monkeypatch.delenv(huge_pages.ENV)
    huge_pages.request_huge_pages()
    assert huge_pages.huge_pages_requested()
