//! Cross-worker state in Envoy shared data, updated with compare-and-swap so it is exact
//! across workers. Values are little-endian u64 counters.

use crate::host::{Host, HostError, LogLevel};

/// How often a CAS update is retried before giving up (contention is brief in practice).
pub const MAX_CAS_RETRIES: u32 = 64;

pub fn encode_u64(v: u64) -> [u8; 8] {
    v.to_le_bytes()
}

pub fn decode_u64(b: &[u8]) -> Option<u64> {
    let arr: [u8; 8] = b.try_into().ok()?;
    Some(u64::from_le_bytes(arr))
}

/// Outcome of a CAS update.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Update<T> {
    /// Written; carries the caller's result.
    Done(T),
    /// The closure declined to write; carries its result.
    Declined(T),
}

/// Read-modify-write a u64 with CAS. `f(current)` returns `Ok(new)` to write, `Err(r)` to
/// decline. A missing (or malformed) key reads as 0.
pub fn update_u64<T>(
    host: &dyn Host,
    key: &str,
    mut f: impl FnMut(u64) -> Result<(u64, T), T>,
) -> Result<Update<T>, HostError> {
    for _ in 0..MAX_CAS_RETRIES {
        let (value, cas) = host.shared_data(key);
        let current = value.as_deref().and_then(decode_u64).unwrap_or(0);
        match f(current) {
            Err(r) => return Ok(Update::Declined(r)),
            Ok((next, r)) => match host.set_shared_data(key, &encode_u64(next), cas) {
                Ok(()) => return Ok(Update::Done(r)),
                Err(HostError::CasMismatch) => continue,
                Err(e) => return Err(e),
            },
        }
    }
    host.log(LogLevel::Warn, &format!("shared data {key}: gave up after {MAX_CAS_RETRIES} CAS conflicts"));
    Err(HostError::CasMismatch)
}

/// Create the key with value 0 if it does not exist yet (call at configure time, so that the
/// first request's write is a CAS and not an unconditional write).
pub fn init_u64(host: &dyn Host, key: &str) {
    if host.shared_data(key).0.is_none() {
        let _ = host.set_shared_data(key, &encode_u64(0), None);
    }
}

/// Take one slot of a limit shared by all workers: `Ok(true)` if taken, `Ok(false)` if the
/// limit is reached.
pub fn try_acquire(host: &dyn Host, key: &str, limit: u64) -> Result<bool, HostError> {
    update_u64(host, key, |n| if n < limit { Ok((n + 1, true)) } else { Err(false) }).map(|u| match u {
        Update::Done(r) | Update::Declined(r) => r,
    })
}

/// Give back a slot taken by `try_acquire` (saturating at zero).
pub fn release(host: &dyn Host, key: &str) -> Result<(), HostError> {
    update_u64(host, key, |n| if n > 0 { Ok((n - 1, ())) } else { Err(()) }).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::FakeHost;

    #[test]
    fn acquire_release_with_conflicts() {
        let h = FakeHost::new();
        init_u64(&h, "k");
        h.cas_conflicts.set(3);
        assert_eq!(try_acquire(&h, "k", 2), Ok(true));
        assert_eq!(try_acquire(&h, "k", 2), Ok(true));
        assert_eq!(try_acquire(&h, "k", 2), Ok(false));
        assert_eq!(h.shared_u64("k"), Some(2));
        release(&h, "k").unwrap();
        release(&h, "k").unwrap();
        release(&h, "k").unwrap();
        assert_eq!(h.shared_u64("k"), Some(0));
    }

    #[test]
    fn gives_up_under_endless_conflicts() {
        let h = FakeHost::new();
        init_u64(&h, "k");
        h.cas_conflicts.set(1000);
        assert_eq!(try_acquire(&h, "k", 2), Err(HostError::CasMismatch));
    }
}
