//! Durations as Istio and Envoy users write them: protobuf JSON (`"5s"`, `"0.250s"`) and
//! Go style (`"250ms"`, `"1m"`, `"1h30m"`, `"1.5s"`, `"100us"`).

use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// Parse a duration string. Negative durations and empty strings are rejected.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    if t.is_empty() {
        return Err("empty duration".into());
    }
    if t == "0" {
        return Ok(Duration::ZERO);
    }
    let mut rest = t;
    let mut total_nanos: u128 = 0;
    while !rest.is_empty() {
        let num_len = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(rest.len());
        if num_len == 0 {
            return Err(format!("invalid duration {s:?}: expected a number"));
        }
        let (num, after) = rest.split_at(num_len);
        let unit_len = after.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(after.len());
        let (unit, next) = after.split_at(unit_len);
        let nanos_per_unit: u128 = match unit {
            "ns" => 1,
            "us" | "µs" | "μs" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            "" => return Err(format!("invalid duration {s:?}: missing unit (use h, m, s, ms, us, ns)")),
            u => return Err(format!("invalid duration {s:?}: unknown unit {u:?}")),
        };
        total_nanos = total_nanos
            .checked_add(scale(num, nanos_per_unit).ok_or_else(|| format!("invalid duration {s:?}"))?)
            .ok_or_else(|| format!("duration {s:?} is too large"))?;
        rest = next;
    }
    let secs = u64::try_from(total_nanos / 1_000_000_000).map_err(|_| format!("duration {s:?} is too large"))?;
    // Remainder is < 1e9 so it always fits.
    let nanos = u32::try_from(total_nanos % 1_000_000_000).unwrap_or(0);
    Ok(Duration::new(secs, nanos))
}

/// `"1.25"` × unit, exact in integer nanoseconds (digits past nanosecond precision are dropped).
fn scale(num: &str, unit: u128) -> Option<u128> {
    let (int, frac) = match num.split_once('.') {
        Some((i, f)) => (i, f),
        None => (num, ""),
    };
    if int.is_empty() && frac.is_empty() {
        return None;
    }
    if frac.contains('.') {
        return None;
    }
    let int_v: u128 = if int.is_empty() { 0 } else { int.parse().ok()? };
    let mut v = int_v.checked_mul(unit)?;
    let mut place = unit;
    for d in frac.bytes() {
        place /= 10;
        if place == 0 {
            break;
        }
        v = v.checked_add(u128::from(d - b'0') * place)?;
    }
    Some(v)
}

/// Serde helper: `#[serde(deserialize_with = "meshwasm_sdk_ext::duration::de")]`.
pub fn de<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    parse_duration(&s).map_err(serde::de::Error::custom)
}

/// Serde helper for optional durations.
pub fn de_opt<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let s = Option::<String>::deserialize(d)?;
    s.map(|s| parse_duration(&s).map_err(serde::de::Error::custom)).transpose()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn table() {
        let ms = Duration::from_millis;
        for (s, want) in [
            ("5s", ms(5000)),
            ("0.250s", ms(250)),
            ("250ms", ms(250)),
            ("1m", ms(60_000)),
            ("1h30m", ms(5_400_000)),
            ("1.5s", ms(1500)),
            ("100us", Duration::from_micros(100)),
            ("0", Duration::ZERO),
            ("0s", Duration::ZERO),
            (".5s", ms(500)),
            ("2.000000001s", Duration::new(2, 1)),
        ] {
            assert_eq!(parse_duration(s), Ok(want), "{s}");
        }
        for bad in ["", "5", "s", "-1s", "1x", "1..2s", "1s5", "abc", "1e3s"] {
            assert!(parse_duration(bad).is_err(), "{bad} should fail");
        }
    }

    proptest! {
        #[test]
        fn never_panics(s in ".{0,24}") { let _ = parse_duration(&s); }

        #[test]
        fn millis_roundtrip(n in 0u64..10_000_000) {
            prop_assert_eq!(parse_duration(&format!("{n}ms")), Ok(Duration::from_millis(n)));
            let secs = format!("{}.{:03}s", n / 1000, n % 1000);
            prop_assert_eq!(parse_duration(&secs), Ok(Duration::from_millis(n)));
        }
    }
}
