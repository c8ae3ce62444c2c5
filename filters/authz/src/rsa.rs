//! RSA signature verification (RS256/384/512: PKCS#1 v1.5; PS256/384/512: PSS with the salt
//! length recovered), public keys only, instead of the `rsa` crate: its big-integer library
//! (`crypto-bigint`, generic over limb counts, with Karatsuba multiplication and constant-time
//! machinery a public-key operation does not need) cost 62.0 KiB of `authz.wasm` after
//! wasm-opt (541,900 → 478,380 bytes, this module included; see docs/authz.md "Size and
//! speed").
//!
//! What it does is RFC 8017's RSAVP1 + EMSA-PKCS1-v1_5 / EMSA-PSS verification, step for step
//! as `rsa` 0.10 does it (same key checks and messages, same length and range checks on the
//! signature, same salt detection), with a Montgomery exponentiation on 32-bit limbs. Nothing
//! here is secret: the key is public, and so are the signature and the message, so variable
//! time is fine. `tests` prove it equal to `rsa` 0.10 (a dev-dependency) on generated keys,
//! valid signatures, and signatures, keys and messages mutated at random.

use sha2::{Digest, Sha256, Sha384, Sha512};

/// A validated RSA public key with its Montgomery constants.
#[derive(Clone)]
pub struct PublicKey {
    /// The modulus, 32-bit limbs, least significant first, without leading zero limbs.
    n: Vec<u32>,
    /// Significant bits of the modulus.
    bits: usize,
    e: u32,
    /// `-n⁻¹ mod 2³²`.
    n0inv: u32,
    /// `R² mod n` with `R = 2^(32·limbs)`.
    r2: Vec<u32>,
}

/// The accepted modulus sizes (as `rsa::PublicKey::new_with_size_limits(.., 512..=16384)`).
pub const MIN_BITS: usize = 512;
pub const MAX_BITS: usize = 16384;

/// Big-endian bytes → limbs (least significant first), leading zero limbs dropped.
fn from_be(bytes: &[u8]) -> Vec<u32> {
    let mut limbs: Vec<u32> =
        bytes.rchunks(4).map(|c| c.iter().fold(0u32, |acc, b| (acc << 8) | u32::from(*b))).collect();
    while limbs.last() == Some(&0) {
        limbs.pop();
    }
    limbs
}

/// `x` as exactly `len` big-endian bytes (the caller checks that it fits).
fn to_be(x: &[u32], len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    for (i, o) in out.iter_mut().rev().enumerate() {
        let limb = x.get(i / 4).copied().unwrap_or(0);
        *o = (limb >> (8 * (i % 4))) as u8;
    }
    out
}

fn bit_width(x: &[u32]) -> usize {
    match x.iter().rposition(|l| *l != 0) {
        Some(i) => 32 * i + 32 - x.get(i).map_or(0, |l| l.leading_zeros() as usize),
        None => 0,
    }
}

/// `a >= b` for equally long limb slices.
fn ge(a: &[u32], b: &[u32]) -> bool {
    for (x, y) in a.iter().rev().zip(b.iter().rev()) {
        if x != y {
            return x > y;
        }
    }
    true
}

/// `a -= b` (equal lengths, `a >= b`); returns the borrow.
fn sub_assign(a: &mut [u32], b: &[u32]) -> bool {
    let mut borrow = 0u64;
    for (x, y) in a.iter_mut().zip(b) {
        let v = u64::from(*x).wrapping_sub(u64::from(*y)).wrapping_sub(borrow);
        *x = v as u32;
        borrow = (v >> 63) & 1;
    }
    borrow != 0
}

impl PublicKey {
    /// `rsa::PublicKey::new_with_size_limits(n, e, 512..=16384)` for e = 3 or 65537 (the
    /// caller's rule), with `rsa`'s error messages.
    pub fn new(n_be: &[u8], e: u32) -> Result<Self, &'static str> {
        let n = from_be(n_be);
        let bits = bit_width(&n);
        if bits < MIN_BITS {
            return Err("modulus too small");
        }
        if bits > MAX_BITS {
            return Err("modulus too large");
        }
        let n0 = n.first().copied().unwrap_or(0);
        if n0 & 1 == 0 {
            return Err("invalid modulus");
        }
        // Newton's iteration for n0⁻¹ mod 2³² (each step doubles the correct bits).
        let mut inv: u32 = 1;
        for _ in 0..5 {
            inv = inv.wrapping_mul(2u32.wrapping_sub(n0.wrapping_mul(inv)));
        }
        let mut key = Self { n, bits, e, n0inv: inv.wrapping_neg(), r2: Vec::new() };
        key.r2 = key.r_squared();
        Ok(key)
    }

    /// `R² mod n`: `2^(32·limbs + s) mod n` by doubling from `2^(bits − 1)` (a few dozen
    /// steps), then `j` Montgomery squarings, each doubling the power of two above `R`:
    /// `(R·2^s)² / R = R·2^(2s)`, with `s · 2^j = 32·limbs` (`s` odd).
    fn r_squared(&self) -> Vec<u32> {
        let l = self.n.len();
        let total = 32 * l;
        let j = 5 + l.trailing_zeros() as usize;
        let s = total >> j;
        let mut x = vec![0u32; l];
        if let Some(limb) = x.get_mut((self.bits - 1) / 32) {
            *limb = 1 << ((self.bits - 1) % 32);
        }
        for _ in 0..(total + s + 1 - self.bits) {
            let mut carry = 0u32;
            for limb in x.iter_mut() {
                let next = *limb >> 31;
                *limb = (*limb << 1) | carry;
                carry = next;
            }
            if carry != 0 || ge(&x, &self.n) {
                sub_assign(&mut x, &self.n);
            }
        }
        for _ in 0..j {
            x = self.mul(&x, &x);
        }
        x
    }

    /// The signature length: the modulus in bytes.
    pub fn size(&self) -> usize {
        self.bits.div_ceil(8)
    }

    /// Montgomery product `a · b · R⁻¹ mod n` (CIOS; `a`, `b` < n, as long as `n`).
    fn mul(&self, a: &[u32], b: &[u32]) -> Vec<u32> {
        let l = self.n.len();
        let mut t = vec![0u32; l + 2];
        let carry_into = |t: &mut [u32], mut c: u64| {
            for x in t.iter_mut().skip(l) {
                let v = u64::from(*x) + c;
                *x = v as u32;
                c = v >> 32;
            }
        };
        for &bi in b {
            let mut c = 0u64;
            for (tj, &aj) in t.iter_mut().zip(a) {
                let v = u64::from(*tj) + u64::from(aj) * u64::from(bi) + c;
                *tj = v as u32;
                c = v >> 32;
            }
            carry_into(&mut t, c);
            let m = t.first().copied().unwrap_or(0).wrapping_mul(self.n0inv);
            let mut c = 0u64;
            for (tj, &nj) in t.iter_mut().zip(&self.n) {
                let v = u64::from(*tj) + u64::from(m) * u64::from(nj) + c;
                *tj = v as u32;
                c = v >> 32;
            }
            carry_into(&mut t, c);
            // t[0] is now 0: divide by 2³².
            t.rotate_left(1);
        }
        // t < 2n: one subtraction at most.
        let high = t.get(l).copied().unwrap_or(0);
        t.truncate(l);
        if high != 0 || ge(&t, &self.n) {
            sub_assign(&mut t, &self.n);
        }
        t
    }

    /// RSAVP1 after RFC 8017 §8.2.2 steps 1–2: `s^e mod n` for a signature of exactly
    /// `size()` bytes whose value is below `n`; `None` otherwise.
    fn public_op(&self, sig: &[u8]) -> Option<Vec<u32>> {
        if sig.len() != self.size() {
            return None;
        }
        let mut s = from_be(sig);
        s.resize(self.n.len(), 0);
        if ge(&s, &self.n) {
            return None;
        }
        let base = self.mul(&s, &self.r2); // s·R
        let mut acc = base.clone();
        let top = 31 - self.e.leading_zeros();
        for i in (0..top).rev() {
            acc = self.mul(&acc, &acc);
            if self.e >> i & 1 == 1 {
                acc = self.mul(&acc, &base);
            }
        }
        let mut one = vec![0u32; self.n.len()];
        if let Some(first) = one.first_mut() {
            *first = 1;
        }
        Some(self.mul(&acc, &one))
    }
}

/// The hash functions JWT's RS*/PS* name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hash {
    Sha256,
    Sha384,
    Sha512,
}

impl Hash {
    fn digest(self, data: &[u8]) -> Vec<u8> {
        match self {
            Self::Sha256 => Sha256::digest(data).to_vec(),
            Self::Sha384 => Sha384::digest(data).to_vec(),
            Self::Sha512 => Sha512::digest(data).to_vec(),
        }
    }

    fn len(self) -> usize {
        match self {
            Self::Sha256 => 32,
            Self::Sha384 => 48,
            Self::Sha512 => 64,
        }
    }

    /// The DER `DigestInfo` prefix of PKCS#1 v1.5 (RFC 8017 §9.2 note 1).
    fn prefix(self) -> [u8; 19] {
        let (len_all, id, len) = match self {
            Self::Sha256 => (0x31, 1, 0x20),
            Self::Sha384 => (0x41, 2, 0x30),
            Self::Sha512 => (0x51, 3, 0x40),
        };
        [
            0x30, len_all, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, id, 0x05, 0x00,
            0x04, len,
        ]
    }
}

/// RSASSA-PKCS1-v1_5 verification of `msg` (RFC 8017 §8.2.2).
pub fn verify_pkcs1v15(key: &PublicKey, hash: Hash, msg: &[u8], sig: &[u8]) -> bool {
    let Some(m) = key.public_op(sig) else { return false };
    let k = key.size();
    let em = to_be(&m, k);
    let hashed = hash.digest(msg);
    let prefix = hash.prefix();
    let t_len = prefix.len() + hashed.len();
    if k < t_len + 11 {
        return false;
    }
    // EM = 0x00 || 0x01 || PS (0xff…) || 0x00 || DigestInfo prefix || H
    let ps_end = k - t_len - 1;
    em.first() == Some(&0)
        && em.get(1) == Some(&1)
        && em.get(2..ps_end).is_some_and(|ps| ps.iter().all(|b| *b == 0xff))
        && em.get(ps_end) == Some(&0)
        && em.get(ps_end + 1..k - hashed.len()) == Some(&prefix[..])
        && em.get(k - hashed.len()..) == Some(&hashed[..])
}

/// MGF1 with `hash`: `out ^= MGF1(seed, out.len())`.
fn mgf1_xor(hash: Hash, seed: &[u8], out: &mut [u8]) {
    let mut counter: u32 = 0;
    for chunk in out.chunks_mut(hash.len()) {
        let mut input = seed.to_vec();
        input.extend_from_slice(&counter.to_be_bytes());
        for (o, m) in chunk.iter_mut().zip(hash.digest(&input)) {
            *o ^= m;
        }
        counter = counter.wrapping_add(1);
    }
}

/// RSASSA-PSS verification of `msg` with the salt length recovered from the encoding (RFC
/// 8017 §8.1.2 and §9.1.2; `rsa`'s `new_with_auto_salt_len`, BoringSSL's default).
pub fn verify_pss(key: &PublicKey, hash: Hash, msg: &[u8], sig: &[u8]) -> bool {
    let Some(m) = key.public_op(sig) else { return false };
    let em_bits = key.bits - 1;
    let em_len = em_bits.div_ceil(8);
    if bit_width(&m) > 8 * em_len {
        return false;
    }
    let mut em = to_be(&m, em_len);
    let m_hash = hash.digest(msg);
    let h_len = hash.len();
    if em_len < h_len + 2 || em.last() != Some(&0xbc) {
        return false;
    }
    let (db, rest) = em.split_at_mut(em_len - h_len - 1);
    let Some(h) = rest.get(..h_len) else { return false };
    let unused = 8 * em_len - em_bits;
    let top_mask = 0xffu8.checked_shl(8 - unused as u32).unwrap_or(0);
    if db.first().is_some_and(|b| b & top_mask != 0) {
        return false;
    }
    mgf1_xor(hash, h, db);
    if let Some(b) = db.first_mut() {
        *b &= 0xff >> unused;
    }
    // DB = 0x00… || 0x01 || salt: the first non-zero byte must be the separator.
    let Some(sep) = db.iter().position(|b| *b != 0) else { return false };
    if db.get(sep) != Some(&1) {
        return false;
    }
    let Some(salt) = db.get(sep + 1..) else { return false };
    let mut m_prime = vec![0u8; 8];
    m_prime.extend_from_slice(&m_hash);
    m_prime.extend_from_slice(salt);
    hash.digest(&m_prime) == h
}

#[cfg(test)]
mod tests {
    use super::*;
    use ::rsa as lib;
    use lib::signature::{SignatureEncoding, Signer, Verifier};
    use lib::traits::PublicKeyParts;
    use proptest::prelude::*;

    /// RSA keys of several sizes (generated once: key generation is slow).
    fn keys() -> &'static [lib::PrivateKey] {
        use std::sync::OnceLock;
        static KEYS: OnceLock<Vec<lib::PrivateKey>> = OnceLock::new();
        KEYS.get_or_init(|| {
            let mut rng = rand::rng();
            let mut out = Vec::new();
            for (bits, e) in [(512, 65537u64), (1024, 3), (1031, 65537), (2048, 65537), (1537, 3)] {
                let e = lib::BoxedUint::from(e);
                out.push(lib::PrivateKey::new_with_exp_unchecked(&mut rng, bits, e).unwrap());
            }
            out
        })
    }

    fn theirs(pk: &lib::PublicKey, pss: bool, hash: Hash, msg: &[u8], sig: &[u8]) -> bool {
        use lib::{pkcs1v15, pss as p};
        let pk = pk.clone();
        if pss {
            let Ok(sig) = p::Signature::try_from(sig) else { return false };
            match hash {
                Hash::Sha256 => p::VerifyingKey::<Sha256>::new_with_auto_salt_len(pk).verify(msg, &sig).is_ok(),
                Hash::Sha384 => p::VerifyingKey::<Sha384>::new_with_auto_salt_len(pk).verify(msg, &sig).is_ok(),
                Hash::Sha512 => p::VerifyingKey::<Sha512>::new_with_auto_salt_len(pk).verify(msg, &sig).is_ok(),
            }
        } else {
            let Ok(sig) = pkcs1v15::Signature::try_from(sig) else { return false };
            match hash {
                Hash::Sha256 => pkcs1v15::VerifyingKey::<Sha256>::new(pk).verify(msg, &sig).is_ok(),
                Hash::Sha384 => pkcs1v15::VerifyingKey::<Sha384>::new(pk).verify(msg, &sig).is_ok(),
                Hash::Sha512 => pkcs1v15::VerifyingKey::<Sha512>::new(pk).verify(msg, &sig).is_ok(),
            }
        }
    }

    /// `None` when the key is too short for the hash (and salt).
    fn sign(sk: &lib::PrivateKey, pss: bool, hash: Hash, msg: &[u8], salt: usize) -> Option<Vec<u8>> {
        use lib::{pkcs1v15, pss as p};
        let mut rng = rand::rng();
        let sk = sk.clone();
        match (pss, hash) {
            (false, Hash::Sha256) => pkcs1v15::SigningKey::<Sha256>::new(sk).try_sign(msg).ok().map(|s| s.to_vec()),
            (false, Hash::Sha384) => pkcs1v15::SigningKey::<Sha384>::new(sk).try_sign(msg).ok().map(|s| s.to_vec()),
            (false, Hash::Sha512) => pkcs1v15::SigningKey::<Sha512>::new(sk).try_sign(msg).ok().map(|s| s.to_vec()),
            (true, Hash::Sha256) => {
                use lib::signature::RandomizedSigner;
                p::SigningKey::<Sha256>::new_with_salt_len(sk, salt)
                    .try_sign_with_rng(&mut rng, msg)
                    .ok()
                    .map(|s| s.to_vec())
            }
            (true, Hash::Sha384) => {
                use lib::signature::RandomizedSigner;
                p::SigningKey::<Sha384>::new_with_salt_len(sk, salt)
                    .try_sign_with_rng(&mut rng, msg)
                    .ok()
                    .map(|s| s.to_vec())
            }
            (true, Hash::Sha512) => {
                use lib::signature::RandomizedSigner;
                p::SigningKey::<Sha512>::new_with_salt_len(sk, salt)
                    .try_sign_with_rng(&mut rng, msg)
                    .ok()
                    .map(|s| s.to_vec())
            }
        }
    }

    fn ours_key(pk: &lib::PublicKey) -> PublicKey {
        let e = pk.e().to_be_bytes_trimmed_vartime();
        let e = e.iter().fold(0u32, |a, b| (a << 8) | u32::from(*b));
        PublicKey::new(&pk.n().to_be_bytes_trimmed_vartime(), e).unwrap()
    }

    fn hash_of(i: u8) -> Hash {
        [Hash::Sha256, Hash::Sha384, Hash::Sha512][usize::from(i % 3)]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

        /// Valid signatures, then the same with a byte flipped in the signature or the
        /// message, or a signature under another hash or padding: both agree every time.
        #[test]
        fn same_as_rsa_crate(k in 0usize..5, h in 0u8..3, h2 in 0u8..3, pss in any::<bool>(), salt in 0usize..40,
                             msg in prop::collection::vec(any::<u8>(), 0..64), flip in any::<(u16, u8)>(), what in 0u8..5) {
            let sk = &keys()[k];
            let pk = lib::PublicKey::from(sk);
            let ours = ours_key(&pk);
            let hash = hash_of(h);
            let salt = salt.min(pk.size().saturating_sub(hash.len() + 2 + 1));
            let Some(mut sig) = sign(sk, pss, hash, &msg, salt) else { return Ok(()) };
            let mut m = msg.clone();
            let mut vh = hash;
            let mut vpss = pss;
            match what {
                0 => {}
                1 => { let i = usize::from(flip.0) % sig.len(); sig[i] ^= flip.1 | 1; }
                2 => m.push(flip.1),
                3 => vh = hash_of(h2),
                _ => vpss = !pss,
            }
            let want = theirs(&pk, vpss, vh, &m, &sig);
            let got = if vpss { verify_pss(&ours, vh, &m, &sig) } else { verify_pkcs1v15(&ours, vh, &m, &sig) };
            prop_assert_eq!(got, want);
            if what == 0 { prop_assert!(got); }
        }

        /// Arbitrary signature bytes (wrong lengths, values ≥ n, garbage): both reject alike.
        #[test]
        fn garbage_signatures(k in 0usize..5, h in 0u8..3, pss in any::<bool>(), sig in prop::collection::vec(any::<u8>(), 0..300), top in any::<bool>()) {
            let pk = lib::PublicKey::from(&keys()[k]);
            let ours = ours_key(&pk);
            let mut sig = sig;
            if top { sig.resize(pk.size(), 0xff); }
            let hash = hash_of(h);
            let want = theirs(&pk, pss, hash, b"m", &sig);
            let got = if pss { verify_pss(&ours, hash, b"m", &sig) } else { verify_pkcs1v15(&ours, hash, b"m", &sig) };
            prop_assert_eq!(got, want);
        }

        /// Key acceptance and its messages equal `rsa`'s for moduli of any size and parity.
        #[test]
        fn keys_accepted_alike(n in prop::collection::vec(any::<u8>(), 0..80), big in 0usize..3, e3 in any::<bool>()) {
            let mut n = n;
            if big == 1 { n.resize(64 + n.len(), 0xab); }
            if big == 2 { n = vec![0x80; 2049]; n.push(1); }
            let e: u32 = if e3 { 3 } else { 65537 };
            let theirs = lib::PublicKey::new_with_size_limits(
                lib::BoxedUint::from_be_slice_vartime(&n), lib::BoxedUint::from(u64::from(e)), MIN_BITS..=MAX_BITS)
                .map(|_| ()).map_err(|e| e.to_string());
            let ours = PublicKey::new(&n, e).map(|_| ()).map_err(str::to_string);
            prop_assert_eq!(ours, theirs);
        }
    }
}
