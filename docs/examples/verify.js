#!/usr/bin/env node
// Verify a courier / GoodFit webhook signature.
//
//   node verify.js SECRET BODY_FILE SIGNATURE_HEADER_VALUE
//
// Prints "ok" and exits 0 when SIGNATURE_HEADER_VALUE (the value of the
// x-goodfit-hmac-sha256 header, e.g. "sha256=3f2a...") equals
// "sha256=" + lowercase hex HMAC-SHA256(SECRET as UTF-8, raw body bytes);
// otherwise prints "mismatch" and exits 1. Exit 2 on a usage error.
//
// The body is read as raw bytes: sign exactly what arrived, never a re-encoded
// or re-serialized copy.
'use strict'

const crypto = require('crypto')
const fs = require('fs')

const signatureAlgorithm = 'sha256'
const encodeFormat = 'hex'

// rawBody: Buffer with the request body exactly as received.
// header: the signature header's value, or undefined when it is missing.
function verifySignature (secret, rawBody, header) {
  const hmac = crypto.createHmac(signatureAlgorithm, secret) // a string key is used as UTF-8
  const digest = Buffer.from(signatureAlgorithm + '=' + hmac.update(rawBody).digest(encodeFormat), 'utf8')
  const providerSig = Buffer.from(header || '', 'utf8')
  // timingSafeEqual throws on different lengths: compare the lengths first.
  return providerSig.length === digest.length && crypto.timingSafeEqual(digest, providerSig)
}

function main (argv) {
  if (argv.length !== 3) {
    process.stderr.write('usage: node verify.js SECRET BODY_FILE SIGNATURE_HEADER_VALUE\n')
    return 2
  }
  const [secret, bodyFile, header] = argv
  let rawBody
  try {
    rawBody = fs.readFileSync(bodyFile) // a Buffer: no decoding
  } catch (err) {
    process.stderr.write(`cannot read ${bodyFile}: ${err.message}\n`)
    return 2
  }
  if (verifySignature(secret, rawBody, header)) {
    process.stdout.write('ok\n')
    return 0
  }
  process.stdout.write('mismatch\n')
  return 1
}

module.exports = { verifySignature }

if (require.main === module) {
  process.exitCode = main(process.argv.slice(2))
}
