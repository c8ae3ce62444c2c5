//! Buckets in Envoy shared data, exact across workers.
//!
//! A rule's buckets live in a fixed table of `max_keys` slots, shared-data keys
//! `<prefix>.<index>`, all created (empty) at configuration time. Envoy's shared data has no
//! delete and accepts any write to a missing key, so creating every slot up front is what
//! makes each later write a compare-and-swap, and what bounds memory: a flood of distinct
//! keys reuses slots instead of adding keys.
//!
//! A key hashes to a slot and probes up to [`PROBES`] slots. A slot holds
//! `[2][base: u128][last_used_ns: u64][tokens_per_fill: u64][fill_interval_ns: u64][key bytes]`,
//! or `[0]` when empty. The spec is stored with the state so that a configuration change
//! (same plugin and rule names, another bucket) converts the state instead of misreading it. When every probed slot
//! holds another key, the new key takes a slot whose bucket has refilled (a full bucket is
//! the same as no bucket, so nothing changes), else the least recently used one: that key's
//! bucket is forgotten (counted as `keys_evicted`) and starts full when it comes back.

use meshwasm_sdk_ext::shared::MAX_CAS_RETRIES;
use meshwasm_sdk_ext::{Host, HostError, LogLevel};

use crate::bucket::{BucketSpec, Take};

/// Slots probed per key.
pub const PROBES: u32 = 8;
/// Longer keys are stored as a prefix plus a hash, so a slot stays small whatever the
/// request carries.
pub const MAX_KEY_BYTES: usize = 256;

const EMPTY: [u8; 1] = [0];
const VERSION: u8 = 2;
const HEADER: usize = 1 + 16 + 8 + 8 + 8;

#[derive(Debug, Clone)]
pub struct SlotTable {
    prefix: String,
    size: u32,
    /// The key of slot 0, kept for unkeyed rules (one slot): no formatting per request.
    first: String,
}

/// What a take did to the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Taken {
    pub take: Take,
    /// Another key's bucket (not yet refilled) was forgotten to make room.
    pub evicted: bool,
}

struct Slot<'a> {
    base: u128,
    last_used: u64,
    tokens_per_fill: u64,
    fill_interval_ns: u64,
    key: &'a [u8],
}

impl Slot<'_> {
    /// The state in terms of `spec` (converted if it was stored under another spec).
    fn base(&self, spec: &BucketSpec, now_ns: u64) -> u128 {
        if (self.tokens_per_fill, self.fill_interval_ns) == (spec.tokens_per_fill, spec.fill_interval_ns) {
            return self.base;
        }
        let old = BucketSpec {
            max_tokens: u64::from(u32::MAX),
            tokens_per_fill: self.tokens_per_fill.max(1),
            fill_interval_ns: self.fill_interval_ns.max(1),
        };
        spec.rebase(&old, self.base, now_ns)
    }
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// Anything else (an empty slot, a slot written by another version) reads as empty.
fn parse(v: &[u8]) -> Option<Slot<'_>> {
    if v.first() != Some(&VERSION) || v.len() < HEADER {
        return None;
    }
    Some(Slot {
        base: u128::from_le_bytes(v.get(1..17)?.try_into().ok()?),
        last_used: u64_at(v, 17)?,
        tokens_per_fill: u64_at(v, 25)?,
        fill_interval_ns: u64_at(v, 33)?,
        key: v.get(HEADER..)?,
    })
}

fn encode(base: u128, last_used: u64, spec: &BucketSpec, key: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(HEADER + key.len());
    v.push(VERSION);
    v.extend_from_slice(&base.to_le_bytes());
    v.extend_from_slice(&last_used.to_le_bytes());
    v.extend_from_slice(&spec.tokens_per_fill.to_le_bytes());
    v.extend_from_slice(&spec.fill_interval_ns.to_le_bytes());
    v.extend_from_slice(key);
    v
}

/// FNV-1a, 64 bit: stable across workers and restarts (the slot of a key must not depend on
/// the VM that computes it).
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3))
}

/// Bound a key's length: keep a prefix and append the hash of the whole key.
pub fn bounded_key(mut key: Vec<u8>) -> Vec<u8> {
    if key.len() > MAX_KEY_BYTES {
        let h = fnv1a(&key);
        key.truncate(MAX_KEY_BYTES - 17);
        key.push(0x1f);
        key.extend_from_slice(format!("{h:016x}").as_bytes());
    }
    key
}

impl SlotTable {
    pub fn new(prefix: String, size: u32) -> Self {
        let first = format!("{prefix}.0");
        Self { prefix, size: size.max(1), first }
    }

    fn slot_key(&self, i: u32) -> std::borrow::Cow<'_, str> {
        if i == 0 {
            std::borrow::Cow::Borrowed(&self.first)
        } else {
            std::borrow::Cow::Owned(format!("{}.{i}", self.prefix))
        }
    }

    /// Create the empty slots that do not exist yet (every worker does this when it loads
    /// the configuration; the ones already there are left alone).
    pub fn init(&self, host: &dyn Host) {
        for i in 0..self.size {
            let k = self.slot_key(i);
            if host.shared_data(&k).0.is_none() {
                if let Err(e) = host.set_shared_data(&k, &EMPTY, None) {
                    host.log(LogLevel::Warn, &format!("meshwasm.ratelimit: cannot create {k}: {e}"));
                    return;
                }
            }
        }
    }

    /// Where `key` lives: its slot with its state, or else the slot it would take (the first
    /// empty one, else a refilled bucket, else the least recently used, which is an eviction).
    fn probe(&self, host: &dyn Host, key: &[u8], spec: &BucketSpec, now_ns: u64) -> Option<Probe> {
        let start = (fnv1a(key) % u64::from(self.size)) as u32;
        let mut refilled: Option<Probe> = None;
        let mut oldest: Option<(Probe, u64)> = None;
        for p in 0..PROBES.min(self.size) {
            let slot = (start + p) % self.size;
            let (value, cas) = host.shared_data(&self.slot_key(slot));
            let Some(s) = value.as_deref().and_then(parse) else {
                return Some(Probe { slot, cas, state: None, evicts: false });
            };
            if s.key == key {
                return Some(Probe { slot, cas, state: Some((s.base(spec, now_ns), s.last_used)), evicts: false });
            }
            if spec.is_full(s.base(spec, now_ns), now_ns) {
                refilled = refilled.or(Some(Probe { slot, cas, state: None, evicts: false }));
            } else if oldest.as_ref().is_none_or(|(_, t)| s.last_used < *t) {
                oldest = Some((Probe { slot, cas, state: None, evicts: true }, s.last_used));
            }
        }
        refilled.or(oldest.map(|(p, _)| p))
    }

    /// Run `attempt` until its write (a CAS on the slot it probed) goes through, or it needs
    /// no write; a CAS conflict means another worker wrote in between: probe again.
    fn with_retries<T>(
        &self,
        host: &dyn Host,
        mut attempt: impl FnMut() -> Result<Attempt<T>, HostError>,
    ) -> Result<T, HostError> {
        for _ in 0..MAX_CAS_RETRIES {
            let (slot, cas, value, result) = match attempt()? {
                Attempt::Done(r) => return Ok(r),
                Attempt::Write { slot, cas, value, result } => (slot, cas, value, result),
            };
            match host.set_shared_data(&self.slot_key(slot), &value, cas) {
                Ok(()) => return Ok(result),
                Err(HostError::CasMismatch) => continue,
                Err(e) => return Err(e),
            }
        }
        host.log(
            LogLevel::Warn,
            &format!("meshwasm.ratelimit: {}: gave up after {MAX_CAS_RETRIES} CAS conflicts", self.prefix),
        );
        Err(HostError::CasMismatch)
    }

    /// Take a token for `key` at `now_ns`.
    pub fn take(&self, host: &dyn Host, key: &[u8], spec: &BucketSpec, now_ns: u64) -> Result<Taken, HostError> {
        self.with_retries(host, || {
            let p = self.probe(host, key, spec, now_ns).ok_or(HostError::NotFound)?;
            let take = spec.take(p.state.map(|(base, _)| base), now_ns);
            if !take.admitted {
                return Ok(Attempt::Done(Taken { take, evicted: false }));
            }
            Ok(Attempt::Write {
                slot: p.slot,
                cas: p.cas,
                value: encode(take.base, now_ns, spec, key),
                result: Taken { take, evicted: p.evicts },
            })
        })
    }

    /// Give back the token `take` took for `key` (if the key still holds its slot).
    pub fn refund(&self, host: &dyn Host, key: &[u8], spec: &BucketSpec, now_ns: u64) -> Result<(), HostError> {
        self.with_retries(host, || match self.probe(host, key, spec, now_ns) {
            Some(Probe { slot, cas, state: Some((base, last_used)), .. }) => {
                Ok(Attempt::Write { slot, cas, value: encode(spec.refund(base), last_used, spec, key), result: () })
            }
            _ => Ok(Attempt::Done(())),
        })
    }
}

/// A probed slot: its CAS, this key's `(base, last_used)` if the slot holds the key, and
/// whether taking it forgets another key's live bucket.
struct Probe {
    slot: u32,
    cas: Option<u32>,
    state: Option<(u128, u64)>,
    evicts: bool,
}

enum Attempt<T> {
    Done(T),
    Write { slot: u32, cas: Option<u32>, value: Vec<u8>, result: T },
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshwasm_sdk_ext::fake::FakeHost;

    const S: u64 = 1_000_000_000;
    const SPEC: BucketSpec = BucketSpec { max_tokens: 2, tokens_per_fill: 1, fill_interval_ns: 10 * S };

    #[test]
    fn keys_have_their_own_buckets_and_memory_is_bounded() {
        let host = FakeHost::new();
        let t = SlotTable::new("rl.r".into(), 16);
        t.init(&host);
        assert_eq!(host.shared.borrow().len(), 16);
        let now = 100 * S;
        for _ in 0..2 {
            assert!(t.take(&host, b"a", &SPEC, now).unwrap().take.admitted);
        }
        assert!(!t.take(&host, b"a", &SPEC, now).unwrap().take.admitted);
        assert!(t.take(&host, b"b", &SPEC, now).unwrap().take.admitted);
        // A flood of 1000 distinct keys: the table does not grow, and keys get evicted.
        let mut evicted = 0;
        for i in 0..1000 {
            let r = t.take(&host, format!("flood-{i}").as_bytes(), &SPEC, now + i).unwrap();
            assert!(r.take.admitted);
            evicted += u32::from(r.evicted);
        }
        assert_eq!(host.shared.borrow().len(), 16);
        assert!(evicted > 900, "{evicted}");
    }

    #[test]
    fn refilled_buckets_are_reused_without_eviction() {
        let host = FakeHost::new();
        let t = SlotTable::new("rl.r".into(), 1);
        t.init(&host);
        assert!(t.take(&host, b"a", &SPEC, 100 * S).unwrap().take.admitted);
        let r = t.take(&host, b"b", &SPEC, 100 * S).unwrap();
        assert!(r.evicted, "a's bucket is not full yet");
        let r = t.take(&host, b"a", &SPEC, 200 * S).unwrap();
        assert!(!r.evicted, "b's bucket has refilled: reusing its slot loses nothing");
    }

    #[test]
    fn cas_conflicts_are_retried_and_refund_works() {
        let host = FakeHost::new();
        let t = SlotTable::new("rl.r".into(), 4);
        t.init(&host);
        host.cas_conflicts.set(5);
        assert_eq!(t.take(&host, b"a", &SPEC, 100 * S).unwrap().take.remaining, 1);
        assert_eq!(t.take(&host, b"a", &SPEC, 100 * S).unwrap().take.remaining, 0);
        t.refund(&host, b"a", &SPEC, 100 * S).unwrap();
        assert!(t.take(&host, b"a", &SPEC, 100 * S).unwrap().take.admitted);
        host.cas_conflicts.set(10_000);
        assert_eq!(t.take(&host, b"a", &SPEC, 200 * S), Err(HostError::CasMismatch));
    }

    #[test]
    fn state_survives_a_spec_change() {
        let host = FakeHost::new();
        let t = SlotTable::new("rl.r".into(), 1);
        t.init(&host);
        let now = 100 * S;
        let old = BucketSpec { max_tokens: 10, tokens_per_fill: 10, fill_interval_ns: S };
        for _ in 0..8 {
            assert!(t.take(&host, b"", &old, now).unwrap().take.admitted);
        }
        // Fewer tokens per fill: the 2 tokens left carry over (they used to read as none, forever).
        let new = BucketSpec { max_tokens: 10, tokens_per_fill: 1, fill_interval_ns: 60 * S };
        assert_eq!(t.take(&host, b"", &new, now).unwrap().take.remaining, 1);
        assert_eq!(t.take(&host, b"", &new, now).unwrap().take.remaining, 0);
        assert!(!t.take(&host, b"", &new, now).unwrap().take.admitted);
    }

    #[test]
    fn long_keys_are_bounded() {
        let k = bounded_key(vec![b'x'; 10_000]);
        assert_eq!(k.len(), MAX_KEY_BYTES);
        assert_ne!(bounded_key(vec![b'x'; 10_000]), bounded_key(vec![b'y'; 10_000]));
        assert_eq!(bounded_key(b"short".to_vec()), b"short");
    }
}
