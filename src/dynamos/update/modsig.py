"""The kernel's module-signature trailer, read with the standard library.

A signed module is the ELF bytes, a detached PKCS#7 (CMS) signature, a 12-byte
``struct module_signature`` (algorithm/hash/id-type bytes, two length bytes, 3 pad bytes,
big-endian signature length) and the magic string. Only the PKCS#7 id type is in use: the
signer is named inside the signature, so the trailer's own signer/key-id lengths are zero.

Reading lives in the update layer because ``apply`` needs it on hosts that carry no build tools;
writing (which needs openssl) is ``builder/modsign.py``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

MODULE_SIG_MAGIC = b"~Module signature appended~\n"
PKEY_ID_PKCS7 = 2
_TRAILER = struct.Struct(">BBBBB3xI")  # algo, hash, id_type, signer_len, key_id_len, pad, sig_len


@dataclass(frozen=True)
class ModuleSignature:
    """Where a module's appended signature is: ``module[:elf_size]`` is what it signs."""

    elf_size: int
    signature: bytes  # DER PKCS#7 SignedData
    id_type: int


def trailer(signature: bytes) -> bytes:
    """What follows a module's ELF bytes to carry ``signature`` (DER PKCS#7, detached)."""
    return signature + _TRAILER.pack(0, 0, PKEY_ID_PKCS7, 0, 0, len(signature)) + MODULE_SIG_MAGIC


def read_module_signature(module: bytes) -> ModuleSignature | None:
    """The appended signature of ``module``, or None when it carries none (or a torn one)."""
    if not module.endswith(MODULE_SIG_MAGIC):
        return None
    end = len(module) - len(MODULE_SIG_MAGIC)
    if end < _TRAILER.size:
        return None
    _, _, id_type, signer_len, key_id_len, sig_len = _TRAILER.unpack_from(module, end - _TRAILER.size)
    start = end - _TRAILER.size - sig_len - signer_len - key_id_len
    if start <= 0:
        return None
    return ModuleSignature(elf_size=start, signature=module[start:end - _TRAILER.size - signer_len - key_id_len],
                           id_type=id_type)


def unsigned_part(module: bytes) -> bytes:
    """The module's ELF bytes without any appended signature."""
    sig = read_module_signature(module)
    return module if sig is None else module[:sig.elf_size]
