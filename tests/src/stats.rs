//! Statistical assertions for percentage-driven behaviour.

/// Asserts that `hits` out of `n` Bernoulli trials is consistent with probability `p`:
/// `|hits - n·p| <= 5·sqrt(n·p·(1-p))` (normal approximation, z = 5, so a correct
/// implementation fails about once in 1.7 million runs). For `p` of 0 or 1 the bound is
/// 0: the count must be exact. With n = 400 and p = 0.5 the band is 150..=250, which a
/// filter using 0.25 or 0.75 cannot hit.
#[track_caller]
pub fn assert_binomial(hits: u64, n: u64, p: f64) {
    let (lo, hi) = binomial_band(n, p);
    assert!(
        (lo..=hi).contains(&hits),
        "binomial check failed: hits={hits} n={n} p={p} expected mean {:.1}, allowed {lo}..={hi} (z=5 bound ±{:.1})",
        n as f64 * p,
        binomial_bound(n, p)
    );
}

/// The z = 5 half-width for `n` trials at probability `p`.
pub fn binomial_bound(n: u64, p: f64) -> f64 {
    assert!((0.0..=1.0).contains(&p), "p must be a probability, got {p}");
    5.0 * (n as f64 * p * (1.0 - p)).sqrt()
}

/// The inclusive band of hit counts [`assert_binomial`] accepts.
pub fn binomial_band(n: u64, p: f64) -> (u64, u64) {
    let mean = n as f64 * p;
    let b = binomial_bound(n, p);
    let lo = (mean - b).ceil().max(0.0) as u64;
    let hi = ((mean + b).floor() as u64).min(n);
    (lo, hi)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn band_is_exact_at_the_extremes() {
        assert_eq!(binomial_band(400, 0.0), (0, 0));
        assert_eq!(binomial_band(400, 1.0), (400, 400));
    }

    #[test]
    fn band_at_one_half() {
        assert_eq!(binomial_band(400, 0.5), (150, 250));
        assert_binomial(200, 400, 0.5);
    }

    #[test]
    #[should_panic(expected = "binomial check failed")]
    fn wrong_p_fails() {
        assert_binomial(100, 400, 0.5);
    }

    #[test]
    #[should_panic(expected = "binomial check failed")]
    fn nonzero_hits_at_p0_fails() {
        assert_binomial(1, 400, 0.0);
    }
}
