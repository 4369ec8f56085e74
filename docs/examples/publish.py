#!/usr/bin/env python3
"""Publishes one record-change event for courier, with publisher confirms (docs/events.md).

    pip install pika
    python3 publish.py ACCOUNT TYPE RECORD_ID [NAME]

Environment: AMQP_URL (default amqp://guest:guest@127.0.0.1:5672/%2f), COURIER_EXCHANGE
(default record-changes). Prints the event exactly as published, one line.
"""

import json
import os
import sys
import uuid
from datetime import datetime, timezone

import pika


def main():
    if len(sys.argv) not in (4, 5):
        print(__doc__.strip(), file=sys.stderr)
        sys.exit(2)
    account, record_type, record_id = sys.argv[1:4]
    name = sys.argv[4] if len(sys.argv) == 5 else "Northwind Traders"
    url = os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f")
    exchange = os.environ.get("COURIER_EXCHANGE", "record-changes")

    event = {
        "id": str(uuid.uuid4()),  # keep it if you retry this publish: receivers dedupe on it
        "account": account,
        "type": record_type,  # "company" or "contact"
        "action": "updated",  # or "created"
        "record_id": record_id,
        "occurred_at": datetime.now(timezone.utc).isoformat(),
        "record": {"id": record_id, "name": name},
    }
    body = json.dumps(event, separators=(",", ":"), ensure_ascii=False).encode("utf-8")

    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()
    channel.confirm_delivery()  # basic_publish now waits for the broker, raises if refused
    channel.basic_publish(
        exchange=exchange,
        routing_key=f"{account}.{record_type}",
        body=body,
        properties=pika.BasicProperties(delivery_mode=2, content_type="application/json"),
        mandatory=True,  # raises UnroutableError if no queue is bound
    )
    connection.close()
    sys.stdout.write(body.decode("utf-8") + "\n")


main()
