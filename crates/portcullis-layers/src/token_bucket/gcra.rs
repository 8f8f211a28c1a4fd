//! The admission arithmetic of one key, with no locks and no clock: every instant is passed in.
//!
//! # The algorithm: reservation at decision time (GCRA)
//!
//! Each bucket of a key keeps one number, its *theoretical arrival time* `tat`: the instant at
//! which the bucket would be full again. Its level at `t` is `capacity - rate·max(0, tat - t)`,
//! negative while reservations are queued. A request costing `c` fits at the earliest `t` with
//! `level(t) ≥ c`. A reservation:
//!
//! 1. refuses at once, consuming nothing, if `c > capacity` ([`Denied::OverCapacity`]);
//! 2. computes its admission instant `at`: the latest of now, the key's pause, the previous
//!    reservation's `at` (the FIFO floor) and, for every bucket, the instant it can afford its
//!    share of the cost;
//! 3. refuses at once, consuming nothing, if `at - now` exceeds the allowed wait
//!    ([`Denied::Throttled`]);
//! 4. otherwise charges every bucket *at `at`* (`tat = max(tat, at) + c / rate`), atomically.
//!
//! Admission instants never decrease, so the charges are applied in time order, which makes
//! this exactly the Generic Cell Rate Algorithm for each bucket: the cost admitted in any
//! window of length `T` is at most `capacity + rate·T`. A large request is never starved: the
//! small ones that come after it are queued after it.
//!
//! # Refunds: what is guaranteed
//!
//! A refund (a dropped waiter, or reconciliation with real usage below the estimate) must not
//! make a bucket more generous than if the refunded cost had never been charged. Reservations
//! made after the refunded one were already scheduled, so:
//!
//! - the **latest** reservation of a key, dropped before admission, is undone exactly: the
//!   buckets and the FIFO floor are as if it had never been made, and the next arrival takes its
//!   place;
//! - any other refund returns `min(refund, rate·(tat_after_it - latest_admission))`, the part
//!   provably unused by the reservations scheduled after it, and nothing for a bucket that was
//!   full again (or clamped, or re-limited) since;
//! - a reservation cancelled in the middle of the queue keeps what it could not return then;
//!   once every reservation after it is undone too, that rest is returned, so a queue dropped
//!   in any order gives everything back;
//! - waiters already sleeping keep their slot (it never moves later); the refund goes to the
//!   next reservations.
//!
//! An overrun (real usage above the estimate) is charged at once, as consumed now.
//!
//! [`Denied::OverCapacity`]: super::Denied::OverCapacity
//! [`Denied::Throttled`]: super::Denied::Throttled

use std::time::Duration;

use super::config::{KeyLimits, Rate};
use super::per_bucket::{PerBucket, Remaining};
use super::store::{Denied, Levels};

/// Nanoseconds since a store's origin: the virtual clock of the arithmetic.
pub(crate) type Nanos = u64;

/// `d` in nanoseconds, saturating.
pub(crate) fn nanos(d: Duration) -> Nanos {
    d.as_nanos().min(u128::from(u64::MAX)) as u64
}

/// One bucket's limit, in the units of the arithmetic.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    capacity: u64,
    nanos_per_unit: f64,
}

impl Bucket {
    fn new(rate: Rate) -> Self {
        Bucket {
            capacity: rate.capacity(),
            nanos_per_unit: 1e9 / rate.refill_per_sec(),
        }
    }
    /// Time to refill `units`, rounded up (charging more is the safe side).
    fn refill_time(&self, units: u64) -> Nanos {
        ceil_nanos(units as f64 * self.nanos_per_unit)
    }
    /// How far ahead of `tat` a cost of `units` may be admitted, rounded down.
    fn tolerance(&self, units: u64) -> Nanos {
        // `as` truncates toward zero, which for a value ≥ 0 is rounding down (and saturates
        // as `floor() as u64` does), without a call to libm's `floor`.
        (self.capacity.saturating_sub(units) as f64 * self.nanos_per_unit) as u64
    }
    fn level(&self, tat: Nanos, now: Nanos) -> f64 {
        let debt = tat as f64 - now as f64;
        if debt <= 0.0 {
            self.capacity as f64
        } else {
            self.capacity as f64 - debt / self.nanos_per_unit
        }
    }
}

/// `x.ceil() as u64` for `x ≥ 0`, without a call to libm's `ceil`: truncate, then add one if
/// that dropped a fraction. Saturates as the cast does.
fn ceil_nanos(x: f64) -> Nanos {
    let t = x as u64;
    if (t as f64) < x {
        t.saturating_add(1)
    } else {
        t
    }
}

/// The buckets of `limits`, in the units of the arithmetic.
fn buckets(limits: KeyLimits) -> PerBucket<Option<Bucket>> {
    PerBucket::from(limits).map(|r| r.map(Bucket::new))
}

/// A granted reservation: what settling it needs.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Reservation {
    seq: u64,
    cost: PerBucket<u64>,
    tat_before: PerBucket<Nanos>,
    tat_after: PerBucket<Nanos>,
    epoch: PerBucket<u64>,
    prev_floor: Nanos,
}

/// A reservation cancelled in the middle of the queue, waiting to become the tail.
#[derive(Debug)]
struct Cancelled {
    seq: u64,
    /// What it charged each bucket that was not yet returned.
    owed: PerBucket<Nanos>,
    epoch: PerBucket<u64>,
    prev_floor: Nanos,
}

/// At most this many mid-queue cancellations are remembered per key.
const MAX_CANCELLED: usize = 64;

/// The state of one key's buckets.
#[derive(Debug)]
pub(crate) struct KeyState {
    limits: KeyLimits,
    buckets: PerBucket<Option<Bucket>>,
    tat: PerBucket<Nanos>,
    /// Bumped whenever a bucket's chain of reservations restarts (it was full), or is clamped or
    /// re-limited: refunds of earlier reservations then return nothing to it.
    epoch: PerBucket<u64>,
    /// The latest admission instant (FIFO floor).
    floor: Nanos,
    paused_until: Nanos,
    seq: u64,
    /// Reservations cancelled while later ones were queued: only part of their cost could be
    /// returned then. When every reservation after one of them is undone, the rest is.
    cancelled: Vec<Cancelled>,
}

impl KeyState {
    /// A key with full buckets at `now`.
    pub(crate) fn new(limits: KeyLimits, now: Nanos) -> Self {
        KeyState {
            limits,
            buckets: buckets(limits),
            tat: PerBucket::splat(now),
            epoch: PerBucket::default(),
            floor: now,
            paused_until: now,
            seq: 0,
            cancelled: Vec::new(),
        }
    }

    /// Reserves `cost` at the earliest slot, unless it is over a capacity or further than
    /// `max_wait`: returns the wait and the reservation.
    pub(crate) fn reserve(
        &mut self,
        cost: PerBucket<u64>,
        max_wait: Duration,
        now: Nanos,
    ) -> Result<(Duration, Reservation), Denied> {
        let mut at = now.max(self.floor).max(self.paused_until);
        for ((b, c), tat) in self.buckets.zip(cost).zip(self.tat) {
            if let Some(b) = b {
                if c > b.capacity {
                    return Err(Denied::OverCapacity {
                        cost: c,
                        capacity: b.capacity,
                    });
                }
                at = at.max(tat.saturating_sub(b.tolerance(c)));
            }
        }
        let wait = Duration::from_nanos(at - now);
        if wait > max_wait {
            return Err(Denied::Throttled { retry_after: wait });
        }
        let (tat_before, prev_floor) = (self.tat, self.floor);
        let charges = self.buckets.zip(cost);
        for ((b, c), (tat, epoch)) in charges.zip(self.tat.as_mut().zip(self.epoch.as_mut())) {
            if let Some(b) = b {
                if at > *tat {
                    *epoch += 1;
                }
                *tat = (*tat).max(at) + b.refill_time(c);
            }
        }
        self.floor = at;
        self.seq += 1;
        let reservation = Reservation {
            seq: self.seq,
            cost,
            tat_before,
            tat_after: self.tat,
            epoch: self.epoch,
            prev_floor,
        };
        Ok((wait, reservation))
    }

    /// Ends reservation `r`: cancelled (`actual` is `None`), or used at `actual`.
    pub(crate) fn settle(&mut self, r: &Reservation, actual: Option<PerBucket<u64>>, now: Nanos) {
        let cancelled = actual.is_none();
        let tail = cancelled && self.seq == r.seq;
        let actual = actual.unwrap_or_default();
        let mut owed = PerBucket::default();
        let per_bucket = self.buckets.zip(r.cost.zip(actual));
        let ticket = r.tat_before.zip(r.tat_after).zip(r.epoch);
        let state = self
            .tat
            .as_mut()
            .zip(self.epoch.as_mut())
            .zip(owed.as_mut());
        for (((b, (cost, actual)), ((before, after), r_epoch)), ((tat, epoch), owed)) in
            per_bucket.zip(ticket).zip(state)
        {
            let Some(b) = b else { continue };
            if actual > cost {
                // An overrun: consumed now.
                if now > *tat {
                    *epoch += 1;
                }
                *tat = (*tat).max(now) + b.refill_time(actual - cost);
            } else if actual < cost && *epoch == r_epoch {
                let charged = after - before;
                let refund = if tail {
                    charged
                } else {
                    b.refill_time(cost - actual)
                        .min(after.saturating_sub(self.floor))
                };
                *tat = tat.saturating_sub(refund);
                *owed = charged.saturating_sub(refund);
            }
        }
        if tail {
            self.floor = r.prev_floor;
            self.seq = r.seq - 1;
            // Earlier reservations cancelled mid-queue are now the tail: return the rest.
            while let Some(pos) = self.cancelled.iter().position(|c| c.seq == self.seq) {
                let c = self.cancelled.swap_remove(pos);
                let state = self.tat.as_mut().zip(self.epoch);
                for (((tat, epoch), b), (owed, c_epoch)) in
                    state.zip(self.buckets).zip(c.owed.zip(c.epoch))
                {
                    if b.is_some() && epoch == c_epoch {
                        *tat = tat.saturating_sub(owed);
                    }
                }
                self.floor = c.prev_floor;
                self.seq = c.seq - 1;
            }
        } else if cancelled {
            // Kept even when nothing is owed: it links the chain to the reservations before it.
            if self.cancelled.len() == MAX_CANCELLED {
                // Bounded memory: the oldest entry's rest is forgone (never over-generous).
                let oldest = (0..self.cancelled.len()).min_by_key(|&i| self.cancelled[i].seq);
                if let Some(i) = oldest {
                    self.cancelled.swap_remove(i);
                }
            }
            self.cancelled.push(Cancelled {
                seq: r.seq,
                owed,
                epoch: r.epoch,
                prev_floor: r.prev_floor,
            });
        }
    }

    /// How long admissions are still paused at `now`.
    pub(crate) fn paused_for(&self, now: Nanos) -> Option<Duration> {
        (self.paused_until > now).then(|| Duration::from_nanos(self.paused_until - now))
    }

    /// Pauses admissions until `until` (or later, if already paused longer).
    pub(crate) fn pause(&mut self, until: Nanos) {
        self.paused_until = self.paused_until.max(until);
    }

    /// Ends a pause (reservations already scheduled keep their slots).
    pub(crate) fn clear_pause(&mut self) {
        self.paused_until = 0;
    }

    /// Lowers each level to what remains at `now`.
    pub(crate) fn clamp(&mut self, remaining: Remaining, now: Nanos) {
        let state = self.tat.as_mut().zip(self.epoch.as_mut());
        for ((b, rem), (tat, epoch)) in self.buckets.zip(remaining).zip(state) {
            if let (Some(b), Some(rem)) = (b, rem) {
                let t = now.saturating_add(b.refill_time(b.capacity.saturating_sub(rem)));
                if t > *tat {
                    *tat = t;
                    *epoch += 1;
                }
            }
        }
    }

    /// Changes the limits at `now`, keeping each level (debt included), capped by the new
    /// capacity.
    pub(crate) fn set_limits(&mut self, limits: KeyLimits, now: Nanos) {
        let new = buckets(limits);
        let state = self.tat.as_mut().zip(self.epoch.as_mut());
        for ((old, nb), (tat, epoch)) in self.buckets.zip(new).zip(state) {
            *tat = match (old, nb) {
                (Some(old), Some(nb)) => {
                    // Keep the level (debt included): same units missing, new refill speed.
                    let missing = old.capacity as f64 - old.level(*tat, now);
                    let missing = missing.max(0.0) - (old.capacity as f64 - nb.capacity as f64);
                    now.saturating_add((missing.max(0.0) * nb.nanos_per_unit).ceil() as u64)
                }
                _ => now.max(*tat),
            };
            *epoch += 1;
        }
        self.buckets = new;
        self.limits = limits;
    }

    /// The levels at `now`.
    pub(crate) fn snapshot(&self, now: Nanos) -> Levels {
        let mut queued = self.floor.max(self.paused_until);
        for (b, tat) in self.buckets.zip(self.tat) {
            if let Some(b) = b {
                queued = queued.max(tat.saturating_sub(b.tolerance(0)));
            }
        }
        Levels::new(
            self.limits,
            self.buckets
                .zip(self.tat)
                .map(|(b, tat)| b.map(|b| b.level(tat, now))),
            self.paused_for(now),
            Duration::from_nanos(queued.saturating_sub(now)),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Nanos = 1_000_000_000;

    /// 1 request/s (capacity 1) and 1000 tokens/s (capacity 1000).
    fn key(now: Nanos) -> KeyState {
        let limits = KeyLimits::unlimited()
            .with_requests(Rate::new(1, 1.0).unwrap())
            .with_tokens(Rate::new(1000, 1000.0).unwrap());
        KeyState::new(limits, now)
    }

    fn cost(tokens: u64) -> PerBucket<u64> {
        PerBucket {
            requests: 1,
            tokens,
            ..PerBucket::default()
        }
    }

    const LONG: Duration = Duration::from_secs(3600);

    #[test]
    fn slots_are_handed_out_at_the_rate_in_fifo_order() {
        let mut k = key(0);
        let waits: Vec<_> = (0..4)
            .map(|_| k.reserve(cost(1), LONG, 0).unwrap().0.as_secs())
            .collect();
        assert_eq!(waits, [0, 1, 2, 3]);
        assert_eq!(k.snapshot(0).requests(), Some(-3.0));
        assert_eq!(k.snapshot(0).queued_for, Duration::from_secs(3));
    }

    #[test]
    fn refusals_consume_nothing() {
        let mut k = key(0);
        k.reserve(cost(1), LONG, 0).unwrap();
        assert_eq!(
            k.reserve(cost(1001), LONG, 0).unwrap_err(),
            Denied::OverCapacity {
                cost: 1001,
                capacity: 1000
            }
        );
        assert_eq!(
            k.reserve(cost(1), Duration::from_millis(999), 0)
                .unwrap_err(),
            Denied::Throttled {
                retry_after: Duration::from_secs(1)
            }
        );
        assert_eq!(k.snapshot(0).requests(), Some(0.0));
        assert_eq!(k.snapshot(0).tokens(), Some(999.0));
    }

    #[test]
    fn the_tail_is_undone_exactly() {
        let mut k = key(0);
        k.reserve(cost(1), LONG, 0).unwrap();
        let (_, b) = k.reserve(cost(500), LONG, 0).unwrap();
        k.settle(&b, None, S / 2);
        assert_eq!(k.snapshot(S / 2).requests(), Some(0.5));
        assert_eq!(
            k.reserve(cost(1), LONG, S / 2).unwrap().0,
            Duration::from_millis(500)
        );
    }

    #[test]
    fn reconciliation_refunds_and_charges_the_overrun() {
        let mut k = key(0);
        let (_, a) = k.reserve(cost(500), LONG, 0).unwrap();
        k.settle(&a, Some(cost(100)), 0);
        assert_eq!(k.snapshot(0).tokens(), Some(900.0));
        let (_, b) = k
            .reserve(
                PerBucket {
                    requests: 0,
                    ..cost(100)
                },
                LONG,
                0,
            )
            .unwrap();
        k.settle(
            &b,
            Some(PerBucket {
                requests: 0,
                ..cost(300)
            }),
            0,
        );
        assert_eq!(k.snapshot(0).tokens(), Some(600.0));
    }

    #[test]
    fn pause_clamp_and_limits() {
        let mut k = key(0);
        k.pause(2 * S);
        assert_eq!(k.paused_for(S), Some(Duration::from_secs(1)));
        assert_eq!(
            k.reserve(cost(1), LONG, 0).unwrap().0,
            Duration::from_secs(2)
        );
        k.clamp(
            Remaining {
                tokens: Some(10),
                ..Remaining::default()
            },
            2 * S,
        );
        assert_eq!(k.snapshot(2 * S).tokens(), Some(10.0));
        let limits = KeyLimits::unlimited().with_tokens(Rate::new(2000, 2000.0).unwrap());
        k.set_limits(limits, 2 * S);
        assert_eq!(
            k.snapshot(2 * S).tokens(),
            Some(10.0),
            "the level carries over"
        );
        assert_eq!(k.snapshot(2 * S).requests(), None);
    }
}
