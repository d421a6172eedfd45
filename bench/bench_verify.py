"""What signature verification adds to ``apply`` on the host: reading and checking a package
(``read_package``, the baseline ``apply`` always paid) vs the same plus verifying its signature
with gpgv against a trust store (``TrustPolicy.verify``). Target: at most 50 ms more.

The package is signed by a throwaway signer and holds a module of ``--module-kib`` (a livepatch
module is a few hundred KiB); medians of ``--runs`` runs, measured in the same invocation.

Usage: python bench/bench_verify.py [--runs N] [--module-kib K] [--json]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import print_results  # noqa: E402

from dynamos.builder.signing import new_signer  # noqa: E402
from dynamos.kernel.trust import TrustPolicy  # noqa: E402
from dynamos.update.model import FunctionSpec, UpdateSource  # noqa: E402
from dynamos.update.package import read_package, write_package  # noqa: E402


def timed(fn, runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--module-kib", type=int, default=512)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        signer = new_signer(Path(tmp) / "signer", "bench signer")
        store = Path(tmp) / "trusted"
        store.mkdir()
        (store / "bench.gpg").write_bytes(signer.trusted_keyring.read_bytes())
        source = UpdateSource(directory=Path(tmp), name="bench", description="bench",
                              functions=(FunctionSpec("cmdline_proc_show", "cmdline_proc_show_v2"),), c_files=())
        module = signer.sign_module(b"\x7fELF" + os.urandom(args.module_kib * 1024))
        path = write_package(Path(tmp) / "bench.dynpkg", source=source, kernel_release="6.1.0-56-amd64",
                             vermagic="6.1.0-56-amd64 SMP preempt mod_unload modversions", module=module,
                             signer=signer.manifest_signer(), sign=signer.sign_manifest)
        policy = TrustPolicy(store)
        read_package(path)
        policy.verify(read_package(path))  # warm the page cache and gpgv's binary
        baseline = timed(lambda: read_package(path), args.runs)
        verified = timed(lambda: policy.verify(read_package(path)), args.runs)
    base, full = statistics.median(baseline), statistics.median(verified)
    print_results({
        "runs": args.runs,
        "module_kib": args.module_kib,
        "read_package_ms": round(base * 1000, 2),
        "read_and_verify_ms": round(full * 1000, 2),
        "verification_adds_ms": round((full - base) * 1000, 2),
        "ratio": round(full / base, 2),
        "target_ms": 50,
    }, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
