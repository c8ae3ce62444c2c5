//! Timers for paused streams. Proxy-Wasm gives each root context one periodic tick; the
//! scheduler keeps the per-stream deadlines and tells the adapter what tick period to arm so
//! the next deadline is hit to the millisecond. Pure: time is passed in.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::time::Duration;

/// Deadlines keyed by stream (context id), each with a payload.
#[derive(Debug)]
pub struct Scheduler<T> {
    heap: BinaryHeap<Reverse<(Duration, u64, u32)>>,
    entries: HashMap<u32, (Duration, u64, T)>,
    seq: u64,
}

impl<T> Default for Scheduler<T> {
    fn default() -> Self {
        Self { heap: BinaryHeap::new(), entries: HashMap::new(), seq: 0 }
    }
}

impl<T> Scheduler<T> {
    /// Schedule (or reschedule) `id` at `deadline` (time since the Unix epoch).
    pub fn schedule(&mut self, id: u32, deadline: Duration, payload: T) {
        self.seq += 1;
        self.heap.push(Reverse((deadline, self.seq, id)));
        self.entries.insert(id, (deadline, self.seq, payload));
    }

    /// Forget `id` (the stream went away). Its heap entry is dropped lazily.
    pub fn cancel(&mut self, id: u32) -> Option<T> {
        let out = self.entries.remove(&id).map(|(_, _, p)| p);
        if self.entries.is_empty() {
            self.heap.clear();
        }
        out
    }

    pub fn is_scheduled(&self, id: u32) -> bool {
        self.entries.contains_key(&id)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Remove and return every entry whose deadline is at or before `now`, earliest first.
    pub fn pop_due(&mut self, now: Duration) -> Vec<(u32, T)> {
        let mut due = Vec::new();
        while let Some(Reverse((deadline, seq, id))) = self.heap.peek().copied() {
            if deadline > now {
                break;
            }
            self.heap.pop();
            // Skip stale heap entries (cancelled or rescheduled).
            if self.entries.get(&id).is_some_and(|(_, s, _)| *s == seq) {
                if let Some((_, _, p)) = self.entries.remove(&id) {
                    due.push((id, p));
                }
            }
        }
        due
    }

    /// The earliest live deadline.
    pub fn next_deadline(&mut self) -> Option<Duration> {
        while let Some(Reverse((deadline, seq, id))) = self.heap.peek().copied() {
            if self.entries.get(&id).is_some_and(|(_, s, _)| *s == seq) {
                return Some(deadline);
            }
            self.heap.pop();
        }
        None
    }

    /// The tick period to arm now: time to the next deadline in whole milliseconds, at least
    /// 1 ms (rounded up so we never wake early), or 0 to disable the tick when idle.
    pub fn tick_period_ms(&mut self, now: Duration) -> u32 {
        period_ms(self.next_deadline(), now)
    }
}

/// The tick period that wakes at `next` (time since the Unix epoch): whole milliseconds,
/// rounded up, at least 1; 0 (tick disabled) when there is nothing to wake for.
pub fn period_ms(next: Option<Duration>, now: Duration) -> u32 {
    match next {
        None => 0,
        Some(d) => {
            let ms = d.saturating_sub(now).as_nanos().div_ceil(1_000_000);
            u32::try_from(ms.max(1)).unwrap_or(u32::MAX)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    #[test]
    fn order_cancel_reschedule() {
        let mut s = Scheduler::default();
        s.schedule(1, ms(300), "a");
        s.schedule(2, ms(100), "b");
        s.schedule(3, ms(200), "c");
        assert_eq!(s.tick_period_ms(ms(0)), 100);
        assert_eq!(s.cancel(2), Some("b"));
        assert_eq!(s.tick_period_ms(ms(50)), 150);
        s.schedule(1, ms(150), "a2");
        assert_eq!(s.pop_due(ms(160)), vec![(1, "a2")]);
        assert_eq!(s.pop_due(ms(160)), vec![]);
        assert_eq!(s.pop_due(ms(1000)), vec![(3, "c")]);
        assert!(s.is_empty());
        assert_eq!(s.tick_period_ms(ms(1000)), 0);
    }

    #[test]
    fn rounds_up_and_never_zero() {
        let mut s = Scheduler::default();
        s.schedule(1, Duration::from_micros(1500), ());
        assert_eq!(s.tick_period_ms(ms(0)), 2);
        assert_eq!(s.tick_period_ms(ms(5)), 1);
    }

    #[test]
    fn cancel_all_frees_heap() {
        let mut s = Scheduler::default();
        for i in 0..100 {
            s.schedule(i, ms(u64::from(i)), ());
        }
        for i in 0..100 {
            s.cancel(i);
        }
        assert!(s.heap.is_empty());
    }
}
