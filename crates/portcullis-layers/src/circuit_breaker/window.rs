//! Sliding windows of outcomes, allocated once per key: a ring of the last `n` outcomes, or ten
//! time buckets.

use tokio::time::Instant;

use super::config::Window;

/// Time windows age out in this many steps.
const BUCKETS: u64 = 10;

/// What a window holds now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Totals {
    pub(crate) calls: u32,
    pub(crate) failures: u32,
    pub(crate) slow: u32,
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct Bucket {
    epoch: u64,
    totals: Totals,
}

#[derive(Debug)]
pub(crate) enum Recorder {
    Count {
        /// Bit 0: failure, bit 1: slow.
        ring: Box<[u8]>,
        next: usize,
        totals: Totals,
    },
    Time {
        base: Instant,
        bucket_nanos: u128,
        buckets: Box<[Bucket]>,
    },
}

const FAILURE: u8 = 1;
const SLOW: u8 = 2;
const EMPTY: u64 = u64::MAX;

impl Recorder {
    pub(crate) fn new(window: Window, now: Instant) -> Self {
        match window {
            Window::Count(n) => Recorder::Count {
                ring: vec![0; n as usize].into_boxed_slice(),
                next: 0,
                totals: Totals::default(),
            },
            Window::Time(d) => Recorder::Time {
                base: now,
                bucket_nanos: (d.as_nanos() / u128::from(BUCKETS)).max(1),
                buckets: vec![
                    Bucket {
                        epoch: EMPTY,
                        totals: Totals::default()
                    };
                    BUCKETS as usize
                ]
                .into_boxed_slice(),
            },
        }
    }

    pub(crate) fn record(&mut self, now: Instant, failure: bool, slow: bool) {
        let add = |t: &mut Totals| {
            t.calls += 1;
            t.failures += u32::from(failure);
            t.slow += u32::from(slow);
        };
        match self {
            Recorder::Count { ring, next, totals } => {
                let full = totals.calls as usize == ring.len();
                let cell = &mut ring[*next];
                if full {
                    totals.calls -= 1;
                    totals.failures -= u32::from(*cell & FAILURE != 0);
                    totals.slow -= u32::from(*cell & SLOW != 0);
                }
                *cell = (u8::from(failure) * FAILURE) | (u8::from(slow) * SLOW);
                add(totals);
                *next = (*next + 1) % ring.len();
            }
            Recorder::Time {
                base,
                bucket_nanos,
                buckets,
            } => {
                let epoch = epoch(*base, *bucket_nanos, now);
                let b = &mut buckets[(epoch % BUCKETS) as usize];
                if b.epoch != epoch {
                    *b = Bucket {
                        epoch,
                        totals: Totals::default(),
                    };
                }
                add(&mut b.totals);
            }
        }
    }

    pub(crate) fn totals(&self, now: Instant) -> Totals {
        match self {
            Recorder::Count { totals, .. } => *totals,
            Recorder::Time {
                base,
                bucket_nanos,
                buckets,
            } => {
                let now = epoch(*base, *bucket_nanos, now);
                buckets
                    .iter()
                    .filter(|b| b.epoch <= now && now - b.epoch < BUCKETS)
                    .fold(Totals::default(), |mut acc, b| {
                        acc.calls += b.totals.calls;
                        acc.failures += b.totals.failures;
                        acc.slow += b.totals.slow;
                        acc
                    })
            }
        }
    }

    pub(crate) fn clear(&mut self) {
        match self {
            Recorder::Count { ring, next, totals } => {
                ring.fill(0);
                *next = 0;
                *totals = Totals::default();
            }
            Recorder::Time { buckets, .. } => {
                for b in buckets.iter_mut() {
                    b.epoch = EMPTY;
                }
            }
        }
    }
}

fn epoch(base: Instant, bucket_nanos: u128, now: Instant) -> u64 {
    let n = now.saturating_duration_since(base).as_nanos() / bucket_nanos;
    u64::try_from(n).unwrap_or(EMPTY - 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn count_window_evicts_oldest() {
        let now = Instant::now();
        let mut r = Recorder::new(Window::Count(3), now);
        r.record(now, true, false);
        r.record(now, false, true);
        r.record(now, false, false);
        assert_eq!(
            r.totals(now),
            Totals {
                calls: 3,
                failures: 1,
                slow: 1
            }
        );
        r.record(now, false, false); // evicts the failure
        assert_eq!(r.totals(now).failures, 0);
        assert_eq!(r.totals(now).calls, 3);
        r.clear();
        assert_eq!(r.totals(now), Totals::default());
    }

    #[test]
    fn time_window_ages_out_by_bucket() {
        let base = Instant::now();
        let mut r = Recorder::new(Window::Time(Duration::from_secs(10)), base);
        r.record(base, true, false);
        r.record(base + Duration::from_millis(5500), false, false);
        let at = |ms| base + Duration::from_millis(ms);
        assert_eq!(r.totals(at(9999)).calls, 2);
        assert_eq!(r.totals(at(10_000)).calls, 1);
        assert_eq!(r.totals(at(10_000)).failures, 0);
        assert_eq!(r.totals(at(14_999)).calls, 1);
        assert_eq!(r.totals(at(15_000)).calls, 0);
    }
}
