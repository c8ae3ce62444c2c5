//! Percentages as Istio writes them (`{"value": 0.0..=100.0}`), kept with Istio's precision:
//! Istio hands Envoy a `FractionalPercent` with denominator `MILLION`, so `0.0001` is the
//! smallest non-zero step. Sampling matches Envoy's `featureEnabled`: `random % D < N`.

use serde::Deserialize;

use crate::config::Path;
use crate::rng::Rng;

/// Istio's `Percentage` message.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Percentage {
    #[serde(deserialize_with = "number_or_string")]
    pub value: f64,
}

/// Proto3 JSON accepts numbers as strings, and Envoy's YAML loader turns every non-integer
/// scalar in a `Struct` (route metadata!) into a string: `value: 0.1` arrives as `"0.1"`.
fn number_or_string<'de, D: serde::Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    struct V;
    impl serde::de::Visitor<'_> for V {
        type Value = f64;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a number")
        }
        fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<f64, E> {
            Ok(v)
        }
        fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<f64, E> {
            Ok(v as f64)
        }
        fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<f64, E> {
            Ok(v as f64)
        }
        fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<f64, E> {
            s.trim().parse::<f64>().map_err(|_| E::custom(format!("expected a number, got {s:?}")))
        }
    }
    d.deserialize_any(V)
}

/// A probability as a fraction `numerator / denominator`, as Envoy's `FractionalPercent`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fraction {
    pub numerator: u64,
    pub denominator: u64,
}

impl Fraction {
    pub const MILLION: u64 = 1_000_000;
    pub const HUNDRED: u64 = 100;
    pub const NEVER: Fraction = Fraction { numerator: 0, denominator: Self::HUNDRED };
    pub const ALWAYS: Fraction = Fraction { numerator: 100, denominator: Self::HUNDRED };

    /// From an Istio `Percentage`, validated to be within 0..=100.
    pub fn from_percentage(p: Percentage, path: &Path) -> Result<Self, crate::ConfigError> {
        if !p.value.is_finite() || !(0.0..=100.0).contains(&p.value) {
            return Err(path.field("value").err(format!("must be in 0..=100, got {}", p.value)));
        }
        // Round to Istio's precision (1e-4 %), i.e. parts per million.
        let numerator = (p.value * 10_000.0).round() as u64;
        Ok(Fraction { numerator, denominator: Self::MILLION })
    }

    /// From a whole-number percent (Istio's deprecated `percent`, Envoy's header values).
    pub fn from_percent(percent: u64) -> Self {
        Fraction { numerator: percent, denominator: Self::HUNDRED }
    }

    /// Envoy's `ProtobufPercentHelper::evaluateFractionalPercent`: a numerator above the
    /// denominator means always.
    pub fn sample(self, rng: &mut impl Rng) -> bool {
        if self.numerator == 0 {
            return false;
        }
        if self.numerator >= self.denominator {
            return true;
        }
        rng.next_u64() % self.denominator < self.numerator
    }

    /// The smaller of two probabilities (exactly, by cross-multiplication).
    #[must_use]
    pub fn min(self, other: Fraction) -> Fraction {
        let a = u128::from(self.numerator) * u128::from(other.denominator);
        let b = u128::from(other.numerator) * u128::from(self.denominator);
        if a <= b {
            self
        } else {
            other
        }
    }

    pub fn as_percent(self) -> f64 {
        if self.denominator == 0 {
            return 0.0;
        }
        self.numerator as f64 * 100.0 / self.denominator as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::WyRand;

    #[test]
    fn istio_precision() {
        let f = Fraction::from_percentage(Percentage { value: 0.1 }, &Path::root()).unwrap();
        assert_eq!(f, Fraction { numerator: 1000, denominator: 1_000_000 });
        let f = Fraction::from_percentage(Percentage { value: 0.0001 }, &Path::root()).unwrap();
        assert_eq!(f.numerator, 1);
        for bad in [-1.0, 100.5, f64::NAN, f64::INFINITY] {
            let e = Fraction::from_percentage(Percentage { value: bad }, &Path::root().field("percentage"));
            assert_eq!(e.unwrap_err().path, "percentage.value");
        }
    }

    #[test]
    fn value_accepts_numeric_strings_as_proto3_json_does() {
        let p: Percentage = serde_json::from_str(r#"{"value":"0.1"}"#).unwrap();
        assert_eq!(p.value, 0.1);
        let p: Percentage = serde_json::from_str(r#"{"value":100}"#).unwrap();
        assert_eq!(p.value, 100.0);
        assert!(serde_json::from_str::<Percentage>(r#"{"value":"lots"}"#).is_err());
        assert!(serde_json::from_str::<Percentage>(r#"{"value":true}"#).is_err());
    }

    #[test]
    fn sample_edges_and_rate() {
        let mut rng = WyRand::new(7);
        assert!(!Fraction::NEVER.sample(&mut rng));
        assert!(Fraction::ALWAYS.sample(&mut rng));
        assert!(Fraction::from_percent(250).sample(&mut rng));
        let f = Fraction::from_percent(30);
        let n = 100_000;
        let hits = (0..n).filter(|_| f.sample(&mut rng)).count() as f64;
        // 30% ± 5 sigma of a binomial(100000, 0.3): sigma ≈ 145.
        assert!((hits - 30_000.0).abs() < 725.0, "{hits}");
    }

    #[test]
    fn min_is_exact() {
        let a = Fraction { numerator: 200_000, denominator: Fraction::MILLION };
        let b = Fraction::from_percent(50);
        assert_eq!(a.min(b), a);
        assert_eq!(b.min(a), a);
    }
}
