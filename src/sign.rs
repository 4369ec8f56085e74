//! Signing and delivery ids: pure functions, no I/O.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

type HmacSha256 = Hmac<Sha256>;

/// The signature header's value: `sha256=` and the lowercase hex HMAC-SHA256 of `body`
/// keyed with the secret's UTF-8 bytes.
pub fn signature(secret: &[u8], body: &[u8]) -> String {
    let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC accepts keys of any length");
    mac.update(body);
    let tag = mac.finalize().into_bytes();
    let mut out = String::with_capacity(7 + 64);
    out.push_str("sha256=");
    out.push_str(&hex::encode(tag));
    out
}

/// Checks a `sha256=<hex>` header value in constant time.
pub fn verify(secret: &[u8], body: &[u8], header: &str) -> bool {
    let Some(hex_tag) = header.strip_prefix("sha256=") else {
        return false;
    };
    let Ok(tag) = hex::decode(hex_tag) else {
        return false;
    };
    let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC accepts keys of any length");
    mac.update(body);
    mac.verify_slice(&tag).is_ok()
}

/// The `webhook-signature` value of the Standard Webhooks specification
/// (docs/receiving.md, "Standard Webhooks"): `v1,<base64 HMAC-SHA256>` over
/// `<id>.<timestamp>.<body>` for each key (the secret's base64-decoded bytes), joined by
/// spaces, so that a receiver holding any one of the keys accepts it during a rotation.
pub fn standard_webhooks_signature<'a>(
    keys: impl IntoIterator<Item = &'a [u8]>,
    id: &str,
    timestamp: u64,
    body: &[u8],
) -> String {
    let timestamp = timestamp.to_string();
    let mut out = String::new();
    for key in keys {
        let mut mac = HmacSha256::new_from_slice(key).expect("HMAC accepts keys of any length");
        mac.update(id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.as_bytes());
        mac.update(b".");
        mac.update(body);
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str("v1,");
        out.push_str(&BASE64.encode(mac.finalize().into_bytes()));
    }
    out
}

/// The delivery id of a batch: a hash of its sorted event ids, so the same set of events
/// always carries the same id, whatever their order. 32 hex characters (128 bits).
pub fn delivery_id<'a>(ids: impl IntoIterator<Item = &'a str>) -> String {
    let mut ids: Vec<&str> = ids.into_iter().collect();
    ids.sort_unstable();
    let mut hasher = Sha256::new();
    for id in ids {
        // Length-prefixed, so no two different sets hash the same bytes.
        hasher.update((id.len() as u64).to_le_bytes());
        hasher.update(id.as_bytes());
    }
    hex::encode(&hasher.finalize()[..16])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_vector() {
        // printf '%s' '{"id":"e1"}' | openssl dgst -sha256 -hmac 'topsecret'
        assert_eq!(
            signature(b"topsecret", br#"{"id":"e1"}"#),
            "sha256=b50facbba3f0a244ddddbe1596f555540201d8086ef828ff458202cf1ea37b66"
        );
    }

    #[test]
    fn rfc4231_case_2() {
        // RFC 4231, test case 2: key "Jefe", data "what do ya want for nothing?".
        assert_eq!(
            signature(b"Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn verify_accepts_only_the_right_signature() {
        let sig = signature(b"k", b"body");
        assert!(verify(b"k", b"body", &sig));
        assert!(!verify(b"k", b"body!", &sig));
        assert!(!verify(b"other", b"body", &sig));
        assert!(!verify(b"k", b"body", &sig.replace("sha256=", "")));
    }

    #[test]
    fn standard_webhooks_vector() {
        // The example of the Standard Webhooks reference libraries' tests: secret
        // whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw, id msg_p5jXN8AQM9LWM0D4loKWxJek,
        // timestamp 1614265330, body {"test": 2432232314}.
        let key = BASE64.decode("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let sig = standard_webhooks_signature(
            [key.as_slice()],
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            br#"{"test": 2432232314}"#,
        );
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn standard_webhooks_signs_with_every_key() {
        // printf '%s' 'id1.7.body' | openssl dgst -sha256 -hmac k -binary | base64
        let one = "v1,5ozQWtxSbm984AeWXagMVy3n5ydwQ0R/zHyhBRMey1U=";
        assert_eq!(
            standard_webhooks_signature([&b"k"[..]], "id1", 7, b"body"),
            one
        );
        let two = standard_webhooks_signature([&b"new"[..], &b"k"[..]], "id1", 7, b"body");
        let parts: Vec<&str> = two.split(' ').collect();
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[1], one);
        assert_ne!(parts[0], one);
    }

    #[test]
    fn delivery_id_ignores_order_but_not_content() {
        assert_eq!(delivery_id(["a", "b", "c"]), delivery_id(["c", "a", "b"]));
        assert_ne!(delivery_id(["a", "b"]), delivery_id(["a", "c"]));
        assert_ne!(delivery_id(["ab"]), delivery_id(["a", "b"]));
        assert_eq!(delivery_id(["a"]).len(), 32);
    }
}
