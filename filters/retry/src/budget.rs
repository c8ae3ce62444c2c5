//! Retry budgets across Envoy workers: Linkerd's `retryRatio` / `minRetriesPerSecond` / `ttl`.
//! Over the last `ttl`, retries ≤ retryRatio × requests + minRetriesPerSecond × ttl.
//!
//! One shared-data value per rule holds a ring of [`SLOTS`] time slots (`ttl / SLOTS` each)
//! counting requests and retries; it is read-modify-written with compare-and-swap, so the
//! accounting is exact across workers. The value is created at configure time (a missing key
//! would accept any write). Honest accounting is "reserve and refund": at request time the
//! filter reserves the retries it lets the router make (so concurrent requests can never
//! overdraw the budget), and in the log phase it refunds the reserved retries the router did
//! not use (the attempt count Envoy observed).

use meshwasm_sdk_ext::{shared, Host, HostError, LogLevel};

use crate::config::Budget;

/// Time slots per ttl window.
pub const SLOTS: usize = 10;
const SLOT_BYTES: usize = 24;
pub const STATE_BYTES: usize = SLOTS * SLOT_BYTES;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Slot {
    /// `monotonic_ms / slot_ms` of the slot's period.
    pub epoch: u64,
    pub requests: u64,
    pub retries: u64,
}

/// The ring of slots (pure: decoding, reserving, refunding).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Window {
    pub slots: [Slot; SLOTS],
}

/// A reservation to refund in the log phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reservation {
    pub epoch: u64,
    pub retries: u32,
}

pub fn slot_ms(budget: &Budget) -> u64 {
    (budget.ttl.as_millis() as u64 / SLOTS as u64).max(1)
}

impl Window {
    pub fn decode(b: &[u8]) -> Option<Self> {
        if b.len() != STATE_BYTES {
            return None;
        }
        let mut w = Window::default();
        for (slot, chunk) in w.slots.iter_mut().zip(b.chunks_exact(SLOT_BYTES)) {
            let word = |i: usize| chunk.get(i * 8..i * 8 + 8).and_then(shared::decode_u64);
            *slot = Slot { epoch: word(0)?, requests: word(1)?, retries: word(2)? };
        }
        Some(w)
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(STATE_BYTES);
        for s in &self.slots {
            out.extend_from_slice(&s.epoch.to_le_bytes());
            out.extend_from_slice(&s.requests.to_le_bytes());
            out.extend_from_slice(&s.retries.to_le_bytes());
        }
        out
    }

    fn live(&self, now: u64) -> impl Iterator<Item = &Slot> {
        self.slots.iter().filter(move |s| s.epoch <= now && now - s.epoch < SLOTS as u64)
    }

    /// Requests and retries within the window ending at slot epoch `now`.
    pub fn totals(&self, now: u64) -> (u64, u64) {
        self.live(now).fold((0, 0), |(q, r), s| (q + s.requests, r + s.retries))
    }

    fn slot_mut(&mut self, epoch: u64) -> Option<&mut Slot> {
        self.slots.get_mut((epoch % SLOTS as u64) as usize)
    }

    /// Count one request at slot epoch `now` and reserve up to `want` retries for it.
    /// Returns the retries granted.
    pub fn reserve(&mut self, budget: &Budget, now: u64, want: u32) -> u32 {
        let Some(slot) = self.slot_mut(now) else { return 0 };
        if slot.epoch != now {
            *slot = Slot { epoch: now, requests: 0, retries: 0 };
        }
        slot.requests += 1;
        let (requests, retries) = self.totals(now);
        let allowed = u64::try_from(u128::from(requests) * u128::from(budget.ratio_ppm) / 1_000_000)
            .unwrap_or(u64::MAX)
            .saturating_add(budget.reserve());
        let available = allowed.saturating_sub(retries);
        let granted = u32::try_from(available.min(u64::from(want))).unwrap_or(want);
        if let Some(slot) = self.slot_mut(now) {
            slot.retries += u64::from(granted);
        }
        granted
    }

    /// Give back `n` retries reserved in slot `epoch` (nothing if that slot has expired).
    pub fn refund(&mut self, epoch: u64, n: u32) {
        if let Some(slot) = self.slot_mut(epoch) {
            if slot.epoch == epoch {
                slot.retries = slot.retries.saturating_sub(u64::from(n));
            }
        }
    }
}

/// The shared-data key of a rule's budget (the slot length is part of it, so a changed ttl
/// starts a fresh window instead of misreading the old one).
pub fn key(plugin_name: &str, rule: &str, budget: &Budget) -> String {
    format!("meshwasm.retry.{plugin_name}.{rule}.budget.{}ms", slot_ms(budget))
}

/// Create the key (configure time) if it does not exist.
pub fn init(host: &dyn Host, key: &str) {
    if host.shared_data(key).0.is_none() {
        let _ = host.set_shared_data(key, &Window::default().encode(), None);
    }
}

/// Read-modify-write the window with CAS.
fn update<T>(host: &dyn Host, key: &str, mut f: impl FnMut(&mut Window) -> T) -> Result<T, HostError> {
    for _ in 0..shared::MAX_CAS_RETRIES {
        let (value, cas) = host.shared_data(key);
        // A missing or malformed value would accept any write: refuse rather than guess.
        let (Some(value), Some(cas)) = (value, cas) else { return Err(HostError::NotFound) };
        let mut w = Window::decode(&value).ok_or(HostError::BadArgument)?;
        let r = f(&mut w);
        match host.set_shared_data(key, &w.encode(), Some(cas)) {
            Ok(()) => return Ok(r),
            Err(HostError::CasMismatch) => continue,
            Err(e) => return Err(e),
        }
    }
    Err(HostError::CasMismatch)
}

pub fn epoch_now(host: &dyn Host, budget: &Budget) -> u64 {
    host.monotonic_ns() / 1_000_000 / slot_ms(budget)
}

/// Count a request and reserve up to `want` retries. When the budget cannot be read, no
/// retries are granted (the safe side: a retry storm is what budgets prevent).
pub fn reserve(host: &dyn Host, key: &str, budget: &Budget, want: u32) -> Reservation {
    let epoch = epoch_now(host, budget);
    match update(host, key, |w| w.reserve(budget, epoch, want)) {
        Ok(retries) => Reservation { epoch, retries },
        Err(e) => {
            host.log(LogLevel::Warn, &format!("meshwasm.retry: budget {key} unavailable ({e}); not retrying"));
            Reservation { epoch, retries: 0 }
        }
    }
}

pub fn refund(host: &dyn Host, key: &str, r: Reservation, unused: u32) {
    if unused == 0 {
        return;
    }
    if let Err(e) = update(host, key, |w| w.refund(r.epoch, unused)) {
        host.log(LogLevel::Warn, &format!("meshwasm.retry: budget {key}: refund failed ({e})"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshwasm_sdk_ext::fake::FakeHost;
    use proptest::prelude::*;
    use std::time::Duration;

    fn budget(ratio_ppm: u64, min: u64, ttl_s: u64) -> Budget {
        Budget { ratio_ppm, min_retries_per_second: min, ttl: Duration::from_secs(ttl_s) }
    }

    #[test]
    fn ratio_and_reserve() {
        let b = budget(200_000, 1, 10); // 20 %, 10 always
        let mut w = Window::default();
        let granted: u32 = (0..100).map(|_| w.reserve(&b, 5, 2)).sum();
        // 100 requests: 20 + 10 retries at most.
        assert_eq!(granted, 30);
        assert_eq!(w.totals(5), (100, 30));
        // Refunds make room again.
        w.refund(5, 10);
        assert_eq!(w.reserve(&b, 5, 2), 2);
        // The window slides: 10 slots later everything has expired.
        assert_eq!(w.totals(15), (0, 0));
        assert_eq!(w.reserve(&b, 15, 2), 2);
        // A refund for an expired slot is dropped.
        w.refund(5, 5);
        assert_eq!(w.totals(15), (1, 2));
    }

    #[test]
    fn encode_roundtrip_and_malformed() {
        let mut w = Window::default();
        w.reserve(&budget(1_000_000, 0, 1), 42, 3);
        assert_eq!(Window::decode(&w.encode()), Some(w));
        assert_eq!(Window::decode(&[0; 7]), None);
    }

    #[test]
    fn shared_with_conflicts_and_missing_key() {
        let h = FakeHost::new();
        let b = budget(0, 1, 2); // only the reserve: 2 retries per window
        let k = key("p", "r", &b);
        assert_eq!(k, "meshwasm.retry.p.r.budget.200ms");
        let missing = reserve(&h, &k, &b, 5);
        assert_eq!(missing.retries, 0, "no key: no retries, never an unconditional write");
        assert!(h.shared.borrow().get(&k).is_none());
        init(&h, &k);
        h.cas_conflicts.set(5);
        assert_eq!(reserve(&h, &k, &b, 5).retries, 2);
        let r = reserve(&h, &k, &b, 5);
        assert_eq!(r.retries, 0);
        refund(&h, &k, Reservation { epoch: r.epoch, retries: 2 }, 1);
        assert_eq!(reserve(&h, &k, &b, 5).retries, 1);
        h.advance(Duration::from_secs(3));
        assert_eq!(reserve(&h, &k, &b, 5).retries, 2, "the window slid");
    }

    proptest! {
        /// Whatever the arrival pattern, after every grant the window holds retries ≤ ratio ×
        /// requests + reserve (Linkerd's semantics: deposits expire with their slot, so a window
        /// can later be over without a grant, and then nothing is granted).
        #[test]
        fn never_overdrawn(ratio_ppm in 0u64..2_000_000, min in 0u64..5, events in proptest::collection::vec((0u64..3, 0u32..4, 0u32..4), 1..300)) {
            let b = budget(ratio_ppm, min, 1);
            let mut w = Window::default();
            let mut now = 0;
            for (step, want, used) in events {
                now += step;
                let g = w.reserve(&b, now, want);
                prop_assert!(g <= want);
                // Every grant keeps the window within the budget.
                let (q, r) = w.totals(now);
                prop_assert!(g == 0 || u128::from(r) * 1_000_000 <= u128::from(q) * u128::from(ratio_ppm) + u128::from(b.reserve()) * 1_000_000);
                w.refund(now, g - used.min(g));
            }
        }
    }
}
