#!/usr/bin/env node
// Publishes one record-change event for courier, with publisher confirms (docs/events.md).
//
//   npm install amqplib
//   node publish.js ACCOUNT TYPE RECORD_ID [NAME]
//
// Environment: AMQP_URL (default amqp://guest:guest@127.0.0.1:5672/%2f), COURIER_EXCHANGE
// (default record-changes). Prints the event exactly as published, one line.
"use strict";

const amqp = require("amqplib");
const { randomUUID } = require("node:crypto");

async function main() {
  const args = process.argv.slice(2);
  if (args.length < 3 || args.length > 4) {
    console.error("usage: node publish.js ACCOUNT TYPE RECORD_ID [NAME]");
    process.exit(2);
  }
  const [account, type, recordId, name = "Northwind Traders"] = args;
  const url = process.env.AMQP_URL || "amqp://guest:guest@127.0.0.1:5672/%2f";
  const exchange = process.env.COURIER_EXCHANGE || "record-changes";

  const event = {
    id: randomUUID(), // keep it if you retry this publish: receivers dedupe on it
    account,
    type, // "company" or "contact"
    action: "updated", // or "created"
    record_id: recordId,
    occurred_at: new Date().toISOString(),
    record: { id: recordId, name },
  };
  const body = Buffer.from(JSON.stringify(event), "utf8");

  const connection = await amqp.connect(url);
  const channel = await connection.createConfirmChannel();
  let returned = false;
  channel.on("return", () => { returned = true; }); // mandatory: no queue bound
  channel.publish(exchange, `${account}.${type}`, body, {
    persistent: true,
    contentType: "application/json",
    mandatory: true,
  });
  await channel.waitForConfirms(); // rejects if the broker nacked the message
  await connection.close();
  if (returned) {
    console.error("unroutable: no queue is bound for this routing key");
    process.exit(1);
  }
  process.stdout.write(body.toString("utf8") + "\n");
}

main().catch((err) => {
  console.error(err.message);
  process.exit(1);
});
