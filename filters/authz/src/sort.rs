//! A stable insertion sort for the short lists this filter orders (rules by issuer, policies
//! by name, token locations), instead of `slice::sort*`: std's driftsort/quicksort is
//! instantiated once per element type, 3–4 KiB each in the module; the seven this crate
//! linked (six sorts, and `BTreeMap::from_iter`'s in `obj::string_map` and the `jwks` map)
//! cost 28.5 KiB (571,061 → 541,900 bytes). The lists are configuration-sized (n² compares
//! are nothing) and the result is `sort_by`'s: stable.

use std::cmp::Ordering;

/// Sort `v` stably by `cmp` (as `slice::sort_by`).
pub fn sort_by<T>(v: &mut [T], mut cmp: impl FnMut(&T, &T) -> Ordering) {
    for i in 1..v.len() {
        let mut j = i;
        while j > 0 {
            match (v.get(j - 1), v.get(j)) {
                (Some(a), Some(b)) if cmp(a, b) == Ordering::Greater => v.swap(j - 1, j),
                _ => break,
            }
            j -= 1;
        }
    }
}

/// Sort `v` (as `slice::sort`).
pub fn sort<T: Ord>(v: &mut [T]) {
    sort_by(v, T::cmp);
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn same_as_std_stable_sort(v in prop::collection::vec((0u8..8, any::<u16>()), 0..40)) {
            let mut ours = v.clone();
            super::sort_by(&mut ours, |a, b| a.0.cmp(&b.0));
            let mut theirs = v.clone();
            theirs.sort_by_key(|a| a.0);
            prop_assert_eq!(&ours, &theirs);
            let mut ours = v.clone();
            super::sort(&mut ours);
            let mut theirs = v;
            theirs.sort();
            prop_assert_eq!(ours, theirs);
        }
    }
}
