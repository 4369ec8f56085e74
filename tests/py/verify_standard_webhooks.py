"""Verifies requests that courier sent with the Standard Webhooks library.

stdin: {"secrets": {"name": "whsec_..."}, "requests": [{"headers": {...}, "body": "<base64>"}]}
stdout: one object per request: {"<name>": true|false, "tampered:<name>": true|false}
         verified as sent, and with one byte of the body changed.
"""

import base64
import json
import sys

from standardwebhooks.webhooks import Webhook, WebhookVerificationError


def verifies(secret, body, headers):
    try:
        Webhook(secret).verify(body, headers, json_parse=False)
        return True
    except WebhookVerificationError:
        return False


def main():
    job = json.load(sys.stdin)
    results = []
    for request in job["requests"]:
        body = base64.b64decode(request["body"])
        tampered = bytearray(body)
        tampered[len(tampered) // 2] ^= 0x01
        result = {}
        for name, secret in job["secrets"].items():
            result[name] = verifies(secret, body, request["headers"])
            result["tampered:" + name] = verifies(secret, bytes(tampered), request["headers"])
        results.append(result)
    json.dump(results, sys.stdout)


main()
