#!/usr/bin/env python3
"""Verify courier's Standard Webhooks signature with the specification's own library.

    pip install standardwebhooks
    python3 verify_standard_webhooks.py WHSEC BODY_FILE HEADERS_FILE

WHSEC is the account's standard_webhooks_secret ("whsec_..."); BODY_FILE the raw body
as received; HEADERS_FILE a JSON object of the request's headers (webhook-id,
webhook-timestamp, webhook-signature at least). Prints "ok" and exits 0 when the
signature verifies and the timestamp is within the library's tolerance (5 minutes);
otherwise prints "mismatch" and exits 1. Exit 2 on a usage error.
"""

import json
import sys

from standardwebhooks.webhooks import Webhook, WebhookVerificationError


def main(argv):
    if len(argv) != 3:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    secret, body_file, headers_file = argv
    with open(body_file, "rb") as f:  # raw bytes: verify before parsing
        body = f.read()
    with open(headers_file) as f:
        headers = json.load(f)
    try:
        Webhook(secret).verify(body, headers, json_parse=False)
    except WebhookVerificationError:
        print("mismatch")
        return 1
    print("ok")
    return 0


sys.exit(main(sys.argv[1:]))
