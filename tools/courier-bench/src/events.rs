//! Test data: realistic events of both types, with unique ids the receiver can count.

use std::time::{SystemTime, UNIX_EPOCH};

/// xorshift64*: enough randomness for test data, no dependency.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len() as u64) as usize]
    }
}

#[rustfmt::skip]
const FIRST: &[&str] = &[
    "Grace", "Oskar", "Mei", "Noah", "Amara", "Lukas", "Sofía", "Kenji", "Zoë", "Ravi",
    "Ingrid", "Tomás", "Aisha", "Chen", "Olivia", "Mateo",
];
#[rustfmt::skip]
const LAST: &[&str] = &[
    "Kim", "Novak", "Patel", "García", "O'Brien", "Müller", "Nakamura", "Okafor", "Silva",
    "Johansson", "Rossi", "Dubois", "Kowalski", "Haddad",
];
#[rustfmt::skip]
const COMPANY: &[&str] = &[
    "Cyberdyne Systems", "Adventure Works", "Tailspin Toys", "Humongous Insurance",
    "Southridge Video", "Northwind Traders", "Fabrikam \\\"Labs\\\"", "Contoso Ltd",
    "Wide World Importers", "Blue Yonder Airlines", "Lamna Healthcare", "Proseware, Inc.",
];
#[rustfmt::skip]
const INDUSTRY: &[&str] = &[
    "Financial Services", "Software", "Healthcare", "Retail", "Manufacturing", "Logistics",
    "Education", "Media & Entertainment",
];
#[rustfmt::skip]
const TITLE: &[&str] = &[
    "CTO", "Procurement Lead", "Revenue Operations Manager", "VP Sales", "Head of Data",
    "Account Executive", "Marketing Director", "Chief Financial Officer",
];
const COUNTRY: &[&str] = &["GB", "US", "DE", "JP", "FR", "BR", "IN", "NG", "SE", "ES"];
#[rustfmt::skip]
const WORDS: &[&str] = &[
    "platform", "customer", "pipeline", "growth", "enterprise", "regional", "partner",
    "analytics", "renewal", "expansion", "mid-market", "signals", "intent", "hiring", "funding",
    "launch", "migration", "integration", "quarterly", "forecast", "über", "café", "naïve",
    "\\n", "\\t", "\\u00e9",
];

/// Builds realistic events: 740–1,000 bytes (mean ≈ 870), both types, unique ids.
pub struct EventGen {
    rng: Rng,
    accounts: u32,
    tag: String,
}

impl EventGen {
    pub fn new(seed: u64, accounts: u32) -> Self {
        let mut rng = Rng::new(seed ^ now_ns());
        let tag: String = (0..6)
            .map(|_| char::from(b'a' + rng.below(26) as u8))
            .collect();
        Self {
            rng,
            accounts: accounts.max(1),
            tag,
        }
    }

    /// Routing key and body of event `seq`, with `bench_ts` (ns since the epoch) when given.
    pub fn event(&mut self, seq: u64, bench_ts: Option<u64>) -> (String, Vec<u8>) {
        let r = &mut self.rng;
        let account = format!("acct-{:04}", r.below(u64::from(self.accounts)));
        let company = r.below(10) < 6;
        let kind = if company { "company" } else { "contact" };
        let action = if r.below(4) == 0 {
            "created"
        } else {
            "updated"
        };
        let target = 740 + r.below(261) as usize;
        let record_id = format!("{account}-{}-{:06}", &kind[..2], r.below(1_000_000));
        let mut s = String::with_capacity(1100);
        s.push_str(&format!("{{\"id\":\"{}-{seq}\"", self.tag));
        if let Some(ts) = bench_ts {
            s.push_str(&format!(",\"bench_ts\":{ts}"));
        }
        s.push_str(&format!(
            ",\"account\":\"{account}\",\"type\":\"{kind}\",\"action\":\"{action}\",\"record_id\":\"{record_id}\""
        ));
        if r.below(5) != 0 {
            s.push_str(&format!(
                ",\"occurred_at\":\"2026-11-{:02}T{:02}:{:02}:{:02}.{:03}Z\"",
                1 + r.below(28),
                r.below(24),
                r.below(60),
                r.below(60),
                r.below(1000)
            ));
        }
        if company {
            let name = r.pick(COMPANY);
            s.push_str(&format!(
                ",\"record\":{{\"id\":\"{record_id}\",\"name\":\"{name}\",\"domain\":\"d{}.example\",\"employees\":{},\"industry\":\"{}\",\"country\":\"{}\",\"founded\":{},\"revenue_usd\":{},\"tags\":[\"{}\",\"{}\"],\"description\":\"",
                r.below(100_000),
                1 + r.below(50_000),
                r.pick(INDUSTRY),
                r.pick(COUNTRY),
                1950 + r.below(75),
                r.below(5_000_000_000),
                r.pick(WORDS),
                r.pick(WORDS),
            ));
        } else {
            let (first, last) = (r.pick(FIRST), r.pick(LAST));
            s.push_str(&format!(
                ",\"record\":{{\"id\":\"{record_id}\",\"first_name\":\"{first}\",\"last_name\":\"{last}\",\"email\":\"{}.{}@c{}.example\",\"title\":\"{}\",\"company_id\":\"{account}-co-{:06}\",\"phone\":\"+44 20 7946 {:04}\",\"seniority\":{},\"notes\":\"",
                first.to_lowercase(),
                last.to_lowercase().replace('\'', ""),
                r.below(100_000),
                r.pick(TITLE),
                r.below(1_000_000),
                r.below(10_000),
                r.below(6),
            ));
        }
        // Pad the free-text field to the target size (the closing `"}}` is 3 bytes).
        while s.len() + 3 < target {
            let w = r.pick(WORDS);
            if s.len() + w.len() + 4 > target {
                s.push('.');
            } else {
                s.push_str(w);
                s.push(' ');
            }
        }
        s.push_str("\"}}");
        let routing_key = format!("{account}.{kind}");
        (routing_key, s.into_bytes())
    }
}

/// Nanoseconds since the epoch: what `bench_ts` carries.
pub fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_events_are_valid_and_sized() {
        let mut g = EventGen::new(7, 20);
        let mut total = 0;
        for seq in 0..2000 {
            let (key, body) = g.event(seq, if seq % 2 == 0 { Some(now_ns()) } else { None });
            let e = courier::event::parse(&body, 1 << 20)
                .unwrap_or_else(|err| panic!("{err}: {}", String::from_utf8_lossy(&body)));
            assert_eq!(key, format!("{}.{}", e.account, e.kind));
            assert!((500..=1000).contains(&body.len()), "{}", body.len());
            serde_json::from_slice::<serde_json::Value>(&body).expect("valid JSON");
            total += body.len();
        }
        let mean = total / 2000;
        assert!((820..=920).contains(&mean), "mean {mean}");
    }
}
