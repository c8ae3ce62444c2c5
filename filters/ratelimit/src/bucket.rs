//! The token bucket, as pure arithmetic. Same semantics as Envoy's local rate limit (its
//! atomic token bucket): the bucket starts full, refills continuously at
//! `tokensPerFill / fillInterval` up to `maxTokens`, and a request takes one whole token.
//! Refill is computed from time; there is no timer.
//!
//! The state is one number, `base`: the instant at which the bucket was (or would have been)
//! empty, in *scaled* time units of `1 ns / tokens_per_fill`, so that one token is exactly
//! `fill_interval_ns` units and everything stays in integers. Tokens available at `now` are
//! `min(max_tokens, (now·tpf − base) / fill_interval_ns)`.

/// A validated bucket: `1 <= tokens_per_fill <= max_tokens <= u32::MAX`, `fill_interval_ns >= 1ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BucketSpec {
    pub max_tokens: u64,
    pub tokens_per_fill: u64,
    pub fill_interval_ns: u64,
}

/// The outcome of taking a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Take {
    pub admitted: bool,
    /// The state to store (unchanged when rejected).
    pub base: u128,
    /// Whole tokens left after this request (`x-ratelimit-remaining`).
    pub remaining: u64,
    /// Seconds until a token is available, rounded up; 0 while tokens remain
    /// (`x-ratelimit-reset`, and `retry-after` on a rejection).
    pub reset_secs: u64,
}

const NANOS_PER_SEC: u128 = 1_000_000_000;
/// Scaled time starts here, above any bucket's capacity (at most `u32::MAX` tokens of 10
/// years, about 2^90 units), so `now − capacity` never goes below zero however small the
/// clock reads (a monotonic clock starts near zero at boot). `now` stays below 2^101.
const ORIGIN: u128 = 1 << 100;

impl BucketSpec {
    fn now(&self, now_ns: u64) -> u128 {
        ORIGIN + u128::from(now_ns) * u128::from(self.tokens_per_fill)
    }
    fn token(&self) -> u128 {
        u128::from(self.fill_interval_ns)
    }
    fn capacity(&self) -> u128 {
        u128::from(self.max_tokens) * self.token()
    }

    /// Scaled units available at `now` (capped at capacity). `None` is a bucket never used: full.
    fn available(&self, base: Option<u128>, now_ns: u64) -> u128 {
        match base {
            None => self.capacity(),
            // A clock that went backwards reads as an empty bucket, never as a full one.
            Some(b) => self.now(now_ns).saturating_sub(b).min(self.capacity()),
        }
    }

    fn ceil_secs(&self, units: u128) -> u64 {
        let per_sec = u128::from(self.tokens_per_fill) * NANOS_PER_SEC;
        u64::try_from(units.div_ceil(per_sec)).unwrap_or(u64::MAX)
    }

    /// Take one token at `now_ns` from a bucket in state `base`.
    pub fn take(&self, base: Option<u128>, now_ns: u64) -> Take {
        let avail = self.available(base, now_ns);
        let token = self.token();
        if avail < token {
            return Take {
                admitted: false,
                base: base.unwrap_or_else(|| self.now(now_ns).saturating_sub(avail)),
                remaining: 0,
                reset_secs: self.ceil_secs(token - avail),
            };
        }
        let left = avail - token;
        let remaining = u64::try_from(left / token).unwrap_or(u64::MAX);
        Take {
            admitted: true,
            base: self.now(now_ns).saturating_sub(left),
            remaining,
            reset_secs: if remaining >= 1 { 0 } else { self.ceil_secs(token - left) },
        }
    }

    /// State stored under another spec (the configuration changed while the bucket lived),
    /// converted to this spec: the whole tokens it held carry over, capped at `max_tokens`;
    /// a fraction of a token is dropped (the stricter side).
    pub fn rebase(&self, old: &BucketSpec, base: u128, now_ns: u64) -> u128 {
        let tokens = old.available(Some(base), now_ns) / old.token();
        let avail = tokens.min(u128::from(self.max_tokens)) * self.token();
        self.now(now_ns).saturating_sub(avail)
    }

    /// Give a token back (a later rule of the same request rejected it).
    pub fn refund(&self, base: u128) -> u128 {
        base.saturating_sub(self.token())
    }

    /// A full bucket is the same as no bucket: its slot can be reused without changing any
    /// decision.
    pub fn is_full(&self, base: u128, now_ns: u64) -> bool {
        self.available(Some(base), now_ns) >= self.capacity()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const S: u64 = 1_000_000_000;

    /// Drive a bucket through (time, expected admitted, remaining, reset) steps.
    fn run(spec: BucketSpec, steps: &[(u64, bool, u64, u64)]) {
        let mut base = None;
        for (i, &(t, admitted, remaining, reset)) in steps.iter().enumerate() {
            let r = spec.take(base, t);
            assert_eq!((r.admitted, r.remaining, r.reset_secs), (admitted, remaining, reset), "step {i} at {t}");
            base = Some(r.base);
        }
    }

    /// The sequences below were observed on Envoy 1.40's native local_ratelimit with
    /// `enable_x_ratelimit_headers: DRAFT_VERSION_03` (see the differential integration test).
    #[test]
    fn matches_native_sequences() {
        let t0 = 1_000 * S;
        run(
            BucketSpec { max_tokens: 3, tokens_per_fill: 1, fill_interval_ns: 4 * S },
            &[
                (t0, true, 2, 0),
                (t0, true, 1, 0),
                (t0, true, 0, 4),
                (t0, false, 0, 4),
                (t0 + 2_700_000_000, false, 0, 2),
                (t0 + 3_200_000_000, false, 0, 1),
                (t0 + 4_900_000_000, true, 0, 4),
                (t0 + 4_900_000_000, false, 0, 4),
            ],
        );
        run(
            BucketSpec { max_tokens: 5, tokens_per_fill: 2, fill_interval_ns: 3 * S },
            &[
                (t0, true, 4, 0),
                (t0, true, 3, 0),
                (t0, true, 2, 0),
                (t0, true, 1, 0),
                (t0, true, 0, 2),
                (t0, false, 0, 2),
                (t0 + 1_600_000_000, true, 0, 2),
                (t0 + 1_600_000_000, false, 0, 2),
            ],
        );
    }

    #[test]
    fn a_clock_near_zero_still_starts_full() {
        let spec = BucketSpec { max_tokens: 1000, tokens_per_fill: 1, fill_interval_ns: 3600 * S };
        let a = spec.take(None, 5 * S);
        assert_eq!(a.remaining, 999);
        assert_eq!(spec.take(Some(a.base), 6 * S).remaining, 998);
    }

    #[test]
    fn refill_caps_at_max_and_refund_returns_a_token() {
        let spec = BucketSpec { max_tokens: 2, tokens_per_fill: 1, fill_interval_ns: S };
        let a = spec.take(None, 10 * S);
        assert!(spec.is_full(a.base, 11 * S));
        assert!(!spec.is_full(a.base, 10 * S + 1));
        let b = spec.take(Some(a.base), 100 * S);
        assert_eq!(b.remaining, 1, "refill is capped at maxTokens");
        let c = spec.take(Some(spec.refund(b.base)), 100 * S);
        assert_eq!(c.remaining, 1, "the refunded token is available again");
    }

    #[test]
    fn rebase_keeps_whole_tokens_across_a_config_change() {
        let old = BucketSpec { max_tokens: 10, tokens_per_fill: 10, fill_interval_ns: S };
        let new = BucketSpec { max_tokens: 10, tokens_per_fill: 1, fill_interval_ns: 60 * S };
        let now = 1_000 * S;
        let mut base = None;
        for _ in 0..7 {
            base = Some(old.take(base, now).base);
        }
        let b = new.rebase(&old, base.unwrap(), now);
        let t = new.take(Some(b), now);
        assert_eq!((t.admitted, t.remaining), (true, 2), "3 tokens carried over, one taken");
        // Never more than the new maximum.
        let fresh = old.take(None, now).base;
        let small = BucketSpec { max_tokens: 2, tokens_per_fill: 1, fill_interval_ns: S };
        assert_eq!(small.take(Some(small.rebase(&old, fresh, now)), now).remaining, 1);
    }

    proptest! {
        /// Over any schedule, admitted requests never exceed what the bucket allows:
        /// `max_tokens + elapsed · tokens_per_fill / fill_interval`.
        #[test]
        fn never_admits_more_than_allowed(
            max in 1u64..20, tpf in 1u64..20, fill_ms in 1u64..5000,
            gaps in proptest::collection::vec(0u64..3_000_000_000, 1..200),
        ) {
            let tpf = tpf.min(max);
            let spec = BucketSpec { max_tokens: max, tokens_per_fill: tpf, fill_interval_ns: fill_ms * 1_000_000 };
            let t0 = 1_700_000_000 * S;
            let (mut now, mut base, mut admitted) = (t0, None, 0u64);
            for g in gaps {
                now += g;
                let r = spec.take(base, now);
                if r.admitted { admitted += 1; }
                base = Some(r.base);
            }
            let allowed = u128::from(max) + u128::from(now - t0) * u128::from(tpf) / u128::from(spec.fill_interval_ns);
            prop_assert!(u128::from(admitted) <= allowed);
        }
    }
}
