"""What the CLI reports about packages and the kernel: ``info`` before applying, ``status --uname``
after, in text and JSON, on real signed packages and the simulated kernel."""

from __future__ import annotations

import json

import pytest

import dynamos.kernel
from dynamos import cli
from dynamos.builder.signing import Signer
from tests.support.harness import KernelHarness


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    status = cli.main(argv)
    out = capsys.readouterr()
    return status, out.out, out.err


def test_info_shows_what_a_package_fixes_and_who_signed_it(harness: KernelHarness, signer: Signer,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    h = harness
    h.trust(signer)
    path = h.add("fix-x", signer=signer, version="2.0", cves=("CVE-2024-1086",))
    status, out, _ = run(["info", str(path), "--json", "--trust-store", str(h.trusted)], capsys)
    data = json.loads(out)
    assert status == 0 and data["trusted"] is True
    assert data["signer"]["fingerprint"] == signer.fingerprint
    assert (data["update"], data["version"], data["cves"]) == ("fix-x", "2.0", ["CVE-2024-1086"])
    assert [f["name"] for f in data["functions"]] == ["cmdline_proc_show"]
    status, out, _ = run(["info", str(path), "--trust-store", str(h.trusted)], capsys)
    assert "fix-x 2.0" in out and "fixes CVE-2024-1086" in out and "signed by dynamos test signer" in out


def test_info_of_an_untrusted_package_says_why_and_changes_nothing(harness: KernelHarness, signer: Signer,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    h = harness
    path = h.add("fix-x", signer=signer)
    status, out, _ = run(["info", str(path), "--json", "--trust-store", str(h.trusted)], capsys)
    data = json.loads(out)
    assert status == 0 and data["trusted"] is False and data["code"] == "trust-store"
    assert data["signer_claim"]["fingerprint"] == signer.fingerprint
    assert h.syscalls("init_module") == []


def test_status_uname_is_the_effective_kernel(harness: KernelHarness, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    h = harness
    monkeypatch.setattr(dynamos.kernel, "LiveKernel", lambda *a, **kw: h.kernel)
    h.kernel.apply(h.add("fix-x", version="1.2", cves=("CVE-2024-1086",)))
    assert run(["status", "--uname"], capsys)[1] == "6.1.0-56-amd64+fix-x=1.2\n"
    out = run(["status"], capsys)[1]
    assert "effective kernel 6.1.0-56-amd64+fix-x=1.2, fixes CVE-2024-1086" in out
    data = json.loads(run(["status", "--uname", "--json"], capsys)[1])
    assert data == {"effective_kernel": "6.1.0-56-amd64+fix-x=1.2", "cves": ["CVE-2024-1086"]}


def test_a_failure_with_details_is_still_one_json_object(harness: KernelHarness, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """A retire that times out: its report (the holders) and the failure are one object."""
    from dynamos.kernel import editions
    from dynamos.kernel.editions import RetireResult, RetireTimeout

    result = RetireResult("up", "f", 1, "f_v2", False, 1, 1.0, [{"pid": 7, "tid": 7, "comm": "cat", "stack": []}])

    def timing_out(*_a, **_k):
        raise RetireTimeout("up f: edition 1 retired; 1 call still run in it", result)

    monkeypatch.setattr(editions, "retire", timing_out)
    status, out, _ = run(["retire", "up", "f", "1", "--json"], capsys)
    data = json.loads(out)  # one object: a second would make this fail
    assert status == 6 and data["ok"] is False and data["exit_status"] == 6
    assert data["holders"][0]["comm"] == "cat" and data["drained"] is False
