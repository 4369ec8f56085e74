#!/usr/bin/env python3
"""Verify a courier / GoodFit webhook signature.

    python3 verify.py SECRET BODY_FILE SIGNATURE_HEADER_VALUE

Prints "ok" and exits 0 when SIGNATURE_HEADER_VALUE (the value of the
x-goodfit-hmac-sha256 header, e.g. "sha256=3f2a...") equals
"sha256=" + lowercase hex HMAC-SHA256(SECRET as UTF-8, raw body bytes);
otherwise prints "mismatch" and exits 1. Exit 2 on a usage error.

The body is read as raw bytes: sign exactly what arrived, never a decoded,
re-encoded or re-serialized copy.
"""
import hashlib
import hmac
import os
import sys


def verify_signature(secret, raw_body, header):
    """secret: str (used as UTF-8) or bytes; raw_body: bytes exactly as
    received; header: the signature header's value, or None when missing."""
    key = secret.encode("utf-8") if isinstance(secret, str) else secret
    digest = "sha256=" + hmac.new(key, raw_body, hashlib.sha256).hexdigest()
    provider_sig = header or ""
    # compare_digest runs in constant time; compare bytes, since it refuses
    # str values with non-ASCII characters.
    return hmac.compare_digest(digest.encode("utf-8"), provider_sig.encode("utf-8", "surrogateescape"))


def main(argv):
    if len(argv) != 3:
        print("usage: python3 verify.py SECRET BODY_FILE SIGNATURE_HEADER_VALUE", file=sys.stderr)
        return 2
    # os.fsencode gives the argument's bytes as the shell passed them
    # (the UTF-8 encoding of the secret on a UTF-8 system).
    secret, body_file, header = os.fsencode(argv[0]), argv[1], argv[2]
    try:
        with open(body_file, "rb") as f:  # raw bytes: no decoding
            raw_body = f.read()
    except OSError as err:
        print(f"cannot read {body_file}: {err}", file=sys.stderr)
        return 2
    if verify_signature(secret, raw_body, header):
        print("ok")
        return 0
    print("mismatch")
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
