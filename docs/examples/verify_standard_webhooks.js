#!/usr/bin/env node
// Verify courier's Standard Webhooks signature with the specification's own library.
//
//   npm install standardwebhooks
//   node verify_standard_webhooks.js WHSEC BODY_FILE HEADERS_FILE
//
// WHSEC is the account's standard_webhooks_secret ("whsec_..."); BODY_FILE the raw body
// as received; HEADERS_FILE a JSON object of the request's headers. Prints "ok" and
// exits 0 when the signature verifies (and the timestamp is within 5 minutes);
// otherwise prints "mismatch" and exits 1. Exit 2 on a usage error.
"use strict";

const fs = require("node:fs");
const { Webhook } = require("standardwebhooks");

const args = process.argv.slice(2);
if (args.length !== 3) {
  console.error("usage: node verify_standard_webhooks.js WHSEC BODY_FILE HEADERS_FILE");
  process.exit(2);
}
const [secret, bodyFile, headersFile] = args;
// The raw body as a string of its exact bytes: verify before parsing.
const body = fs.readFileSync(bodyFile).toString("utf8");
const headers = JSON.parse(fs.readFileSync(headersFile, "utf8"));
try {
  new Webhook(secret).verify(body, headers);
  console.log("ok");
} catch (err) {
  console.log("mismatch");
  process.exit(1);
}
