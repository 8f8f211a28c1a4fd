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
//! # The chain, and why every refund is exact
//!
//! Every step above has the form `tat ↦ max(tat, x) + d` (a charge at `x`; a clamp is
//! `max(tat, x)`, an overrun a charge at now), and such steps compose into one step of the same
//! form. A key keeps its history as a *chain*: a `base` point (each bucket's `tat` and the
//! floor), then one link per **live** reservation (reserved, not yet settled: a waiter, or a
//! call in flight), in the order they were made. A link is the reservation's own charge at its
//! slot `at`, followed by one composed step for everything that happened after it and before
//! the next live reservation (reservations already settled, clamps, overruns).
//!
//! Invariants, after every operation:
//!
//! 1. `tail = fold(base, links)`: the levels and the next slot are those of the chain.
//! 2. The chain holds each settled reservation at the cost it kept (the real usage, capped by
//!    the estimate; the estimate if dropped unsettled), at its slot, in its place; it holds
//!    nothing of a cancelled one. So it is the GCRA run over the reservations **not
//!    cancelled**: a model that never saw the cancelled ones.
//! 3. A live reservation not yet due has the earliest slot the GCRA gives it after the links
//!    before it, not before its release (its arrival, or the pause then in force) and not
//!    before the last time it was rescheduled (a waiter can be admitted early, never in the
//!    past). A reservation already due when something before it is refunded keeps its slot: it
//!    may have been admitted.
//! 4. Memory: one link per live reservation. Nothing is kept for a settled one but its share
//!    of a composed step, so there is no cap and nothing to forget.
//!
//! Cancelling a reservation (in any order, before or after the ones around it) removes its link
//! and folds the steps after it into the previous link; a refund replaces its charge by the
//! smaller one. Either way the links after it are rescheduled: their slots only move earlier
//! (the chain before them only shrank), and each waiter whose slot moved is woken to sleep
//! until the new one. An overrun (usage above the estimate) is charged as consumed now, after
//! everything already scheduled; a clamp likewise lowers the levels from now on.
//!
//! No bucket ever becomes more generous than the GCRA over what was admitted: slots move only
//! for waiters that are told, due slots never move, and the charges left are exactly those of
//! the reservations that were used.
//!
//! A limit change rescales the levels, so it starts a new chain: reservations made before it
//! keep their slots and their charges (their refunds return nothing), later ones are exact
//! again.
//!
//! [`Denied::OverCapacity`]: super::Denied::OverCapacity
//! [`Denied::Throttled`]: super::Denied::Throttled

use std::collections::VecDeque;
use std::task::Waker;
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

/// One step of a bucket's chain: `tat ↦ max(tat, from) + add`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Charge {
    from: Nanos,
    add: Nanos,
}

impl Charge {
    fn apply(self, tat: Nanos) -> Nanos {
        tat.max(self.from).saturating_add(self.add)
    }

    /// `self`, then `next`, as one step: `max(max(t, a) + d, b) + e = max(t, a, b - d) + d + e`.
    fn then(self, next: Charge) -> Charge {
        Charge {
            from: self.from.max(next.from.saturating_sub(self.add)),
            add: self.add.saturating_add(next.add),
        }
    }
}

/// A point of a key's chain: each bucket's `tat`, and the FIFO floor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Point {
    tat: PerBucket<Nanos>,
    floor: Nanos,
}

/// A stretch of the chain, composed into one step per bucket.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Step {
    charge: PerBucket<Charge>,
    floor: Nanos,
}

impl Step {
    /// `cost` charged to `buckets` at `at`.
    fn admission(buckets: PerBucket<Option<Bucket>>, cost: PerBucket<u64>, at: Nanos) -> Step {
        let charge = buckets.zip(cost).map(|(b, c)| match b {
            Some(b) => Charge {
                from: at,
                add: b.refill_time(c),
            },
            None => Charge::default(),
        });
        Step { charge, floor: at }
    }

    fn apply(&self, p: Point) -> Point {
        Point {
            tat: p.tat.zip(self.charge).map(|(t, c)| c.apply(t)),
            floor: p.floor.max(self.floor),
        }
    }

    fn then(self, next: Step) -> Step {
        Step {
            charge: self.charge.zip(next.charge).map(|(a, b)| a.then(b)),
            floor: self.floor.max(next.floor),
        }
    }
}

/// The earliest slot for `cost` after the chain at `p`, not before `release`.
fn slot(
    buckets: PerBucket<Option<Bucket>>,
    p: Point,
    cost: PerBucket<u64>,
    release: Nanos,
) -> Nanos {
    let mut at = release.max(p.floor);
    for ((b, c), tat) in buckets.zip(cost).zip(p.tat) {
        if let Some(b) = b {
            at = at.max(tat.saturating_sub(b.tolerance(c)));
        }
    }
    at
}

/// A live reservation: one link of the chain.
#[derive(Debug)]
struct Link {
    seq: u64,
    /// The chain just before it: `fold(base, links before it)`.
    before: Point,
    /// The earliest it may be admitted: its arrival, or the pause then in force, or the last
    /// time it was rescheduled.
    release: Nanos,
    cost: PerBucket<u64>,
    /// Its slot: only ever moves earlier.
    at: Nanos,
    /// Made before a limit change: its charge is in the base, its slot fixed.
    frozen: bool,
    /// Everything after it and before the next link.
    after: Step,
    /// The waiter to wake when its slot moves.
    waker: Option<Waker>,
}

/// How a reservation ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum End {
    /// Never used: its charge is removed.
    Cancelled,
    /// Used at this cost: the part of the estimate it did not use is removed, an overrun is
    /// charged now.
    Used(PerBucket<u64>),
    /// Dropped unsettled: its charge stays as reserved.
    Kept,
}

/// The state of one key's buckets: the chain of the module docs.
#[derive(Debug)]
pub(crate) struct KeyState {
    limits: KeyLimits,
    /// The limits the provider last stated, if any (so that unchanged headers cost nothing).
    pub(crate) learned: Option<KeyLimits>,
    buckets: PerBucket<Option<Bucket>>,
    base: Point,
    links: VecDeque<Link>,
    /// `fold(base, links)`.
    tail: Point,
    paused_until: Nanos,
    seq: u64,
}

impl KeyState {
    /// A key with full buckets at `now`.
    pub(crate) fn new(limits: KeyLimits, now: Nanos) -> Self {
        let full = Point {
            tat: PerBucket::splat(now),
            floor: now,
        };
        KeyState {
            limits,
            learned: None,
            buckets: buckets(limits),
            base: full,
            links: VecDeque::new(),
            tail: full,
            paused_until: now,
            seq: 0,
        }
    }

    /// Reserves `cost` at the earliest slot, unless it is over a capacity or further than
    /// `max_wait`: returns the wait and the reservation's number.
    pub(crate) fn reserve(
        &mut self,
        cost: PerBucket<u64>,
        max_wait: Duration,
        now: Nanos,
    ) -> Result<(Duration, u64), Denied> {
        for (b, c) in self.buckets.zip(cost) {
            match b {
                Some(b) if c > b.capacity => {
                    return Err(Denied::OverCapacity {
                        cost: c,
                        capacity: b.capacity,
                    });
                }
                _ => {}
            }
        }
        let release = now.max(self.paused_until);
        let at = slot(self.buckets, self.tail, cost, release);
        let wait = Duration::from_nanos(at - now);
        if wait > max_wait {
            return Err(Denied::Throttled { retry_after: wait });
        }
        let before = self.tail;
        self.tail = Step::admission(self.buckets, cost, at).apply(before);
        self.seq += 1;
        self.links.push_back(Link {
            seq: self.seq,
            before,
            release,
            cost,
            at,
            frozen: false,
            after: Step::default(),
            waker: None,
        });
        Ok((wait, self.seq))
    }

    fn find(&self, seq: u64) -> Option<usize> {
        self.links.binary_search_by_key(&seq, |l| l.seq).ok()
    }

    /// Ends reservation `seq`, whose estimate was `estimate`.
    pub(crate) fn end(&mut self, seq: u64, estimate: PerBucket<u64>, end: End, now: Nanos) {
        let used = match end {
            End::Cancelled => None,
            End::Used(actual) => Some(actual),
            End::Kept => Some(estimate),
        };
        if let Some(actual) = used {
            let over = self
                .buckets
                .zip(actual.zip(estimate))
                .map(|(b, (a, e))| match b {
                    Some(b) if a > e => Charge {
                        from: now,
                        add: b.refill_time(a - e),
                    },
                    _ => Charge::default(),
                });
            self.push(Step {
                charge: over,
                floor: 0,
            });
        }
        let Some(i) = self.find(seq) else { return };
        let Some(link) = self.links.remove(i) else {
            return;
        };
        let kept = match used {
            Some(actual) if !link.frozen => {
                let kept = actual.zip(link.cost).map(|(a, c)| a.min(c));
                Step::admission(self.buckets, kept, link.at)
            }
            // Cancelled, or its charge is already in the base.
            _ => Step::default(),
        };
        self.fold_into(i, kept.then(link.after));
        self.reschedule(i, now);
    }

    /// Folds `step` into the chain just before link `i` (after the last link for `len`).
    fn fold_into(&mut self, i: usize, step: Step) {
        match i.checked_sub(1).and_then(|p| self.links.get_mut(p)) {
            Some(prev) => prev.after = prev.after.then(step),
            None => self.base = step.apply(self.base),
        }
    }

    /// Appends `step` to the chain.
    fn push(&mut self, step: Step) {
        if step != Step::default() {
            self.fold_into(self.links.len(), step);
            self.tail = step.apply(self.tail);
        }
    }

    /// The chain after link `l`.
    fn after(&self, l: &Link) -> Point {
        let own = if l.frozen {
            l.before
        } else {
            Step::admission(self.buckets, l.cost, l.at).apply(l.before)
        };
        l.after.apply(own)
    }

    /// Re-folds the chain from link `i` on, after what comes before it was removed or
    /// lightened: every waiter not yet due takes the earliest slot the chain before it now
    /// gives (never later than its own), and is woken if it moved. Stops where the chain is
    /// as it was (an idle gap absorbed the change): the rest is unchanged.
    fn reschedule(&mut self, i: usize, now: Nanos) {
        let mut p = match i.checked_sub(1).and_then(|p| self.links.get(p)) {
            Some(prev) => self.after(prev),
            None => self.base,
        };
        for l in self.links.range_mut(i..) {
            if l.before == p {
                return;
            }
            l.before = p;
            if l.frozen {
                p = l.after.apply(p);
                continue;
            }
            if l.at > now {
                l.release = l.release.max(now);
                let at = slot(self.buckets, p, l.cost, l.release);
                if at < l.at {
                    l.at = at;
                    if let Some(w) = l.waker.take() {
                        w.wake();
                    }
                }
            }
            p = l
                .after
                .apply(Step::admission(self.buckets, l.cost, l.at).apply(p));
        }
        self.tail = p;
    }

    /// How long reservation `seq` still waits at `now`: until its slot or the end of a pause,
    /// whichever is later. `waker` is woken if its slot moves.
    pub(crate) fn wait(&mut self, seq: u64, waker: &Waker, now: Nanos) -> Duration {
        let paused = self.paused_until.saturating_sub(now);
        let left = match self.find(seq).and_then(|i| self.links.get_mut(i)) {
            Some(l) if l.at > now => {
                match &mut l.waker {
                    Some(w) if w.will_wake(waker) => {}
                    w => *w = Some(waker.clone()),
                }
                l.at - now
            }
            _ => 0,
        };
        Duration::from_nanos(left.max(paused))
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
        let charge = self.buckets.zip(remaining).map(|(b, rem)| match (b, rem) {
            (Some(b), Some(rem)) => Charge {
                from: now.saturating_add(b.refill_time(b.capacity.saturating_sub(rem))),
                add: 0,
            },
            _ => Charge::default(),
        });
        self.push(Step { charge, floor: 0 });
    }

    /// The limits in force.
    pub(crate) fn limits(&self) -> KeyLimits {
        self.limits
    }

    /// Changes the limits at `now`, keeping each level (debt included), capped by the new
    /// capacity. Starts a new chain: the live reservations keep their slots and charges.
    pub(crate) fn set_limits(&mut self, limits: KeyLimits, now: Nanos) {
        let new = buckets(limits);
        let tat = self
            .buckets
            .zip(new)
            .zip(self.tail.tat)
            .map(|((old, nb), tat)| {
                match (old, nb) {
                    (Some(old), Some(nb)) => {
                        // Keep the level (debt included): same units missing, new refill speed.
                        let missing = old.capacity as f64 - old.level(tat, now);
                        let missing = missing.max(0.0) - (old.capacity as f64 - nb.capacity as f64);
                        now.saturating_add((missing.max(0.0) * nb.nanos_per_unit).ceil() as u64)
                    }
                    _ => now.max(tat),
                }
            });
        self.base = Point {
            tat,
            floor: self.tail.floor,
        };
        self.tail = self.base;
        for l in self.links.iter_mut() {
            l.frozen = true;
            l.before = self.base;
            l.after = Step::default();
        }
        self.buckets = new;
        self.limits = limits;
    }

    /// Whether the key is as a new one would be at `now`, but for its limits: every bucket
    /// full, nothing queued, not paused.
    pub(crate) fn is_full(&self, now: Nanos) -> bool {
        self.links.is_empty()
            && self.paused_until <= now
            && self.tail.floor <= now
            && self
                .buckets
                .zip(self.tail.tat)
                .into_iter()
                .all(|(b, tat)| b.is_none() || tat <= now)
    }

    /// The levels at `now`.
    pub(crate) fn snapshot(&self, now: Nanos) -> Levels {
        let tail = self.tail;
        let mut queued = tail.floor.max(self.paused_until);
        for (b, tat) in self.buckets.zip(tail.tat) {
            if let Some(b) = b {
                queued = queued.max(tat.saturating_sub(b.tolerance(0)));
            }
        }
        let paused = self.paused_until.saturating_sub(now);
        Levels::new(
            self.limits,
            self.buckets
                .zip(tail.tat)
                .map(|(b, tat)| b.map(|b| b.level(tat, now))),
            (paused > 0).then(|| Duration::from_nanos(paused)),
            Duration::from_nanos(queued.saturating_sub(now)),
        )
        .with_reservations(self.links.len())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::Wake;

    use proptest::prelude::*;

    use super::*;

    const S: Nanos = 1_000_000_000;
    const LONG: Duration = Duration::from_secs(1 << 30);

    /// `requests` per second (capacity `requests`) and 1000 tokens/s (capacity 1000).
    fn limits(requests: u64) -> KeyLimits {
        KeyLimits::unlimited()
            .with_requests(Rate::new(requests, requests as f64).unwrap())
            .with_tokens(Rate::new(1000, 1000.0).unwrap())
    }

    fn cost(tokens: u64) -> PerBucket<u64> {
        PerBucket {
            requests: 1,
            tokens,
            ..PerBucket::default()
        }
    }

    /// Counts its wake-ups.
    #[derive(Default)]
    struct Count(AtomicUsize);
    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn at(k: &KeyState, seq: u64) -> Nanos {
        k.links[k.find(seq).unwrap()].at
    }

    #[test]
    fn charges_compose() {
        let steps =
            [(5, 3), (0, 7), (20, 0), (9, 2), (0, 0)].map(|(from, add)| Charge { from, add });
        for t in [0, 4, 6, 12, 30] {
            for i in 0..steps.len() {
                for j in i..steps.len() {
                    let one = steps[i..=j].iter().fold(t, |t, s| s.apply(t));
                    let composed = steps[i + 1..=j].iter().fold(steps[i], |a, b| a.then(*b));
                    assert_eq!(composed.apply(t), one, "t={t} steps {i}..={j}");
                }
            }
        }
    }

    #[test]
    fn slots_are_handed_out_at_the_rate_in_fifo_order() {
        let mut k = KeyState::new(limits(1), 0);
        let waits: Vec<_> = (0..4)
            .map(|_| k.reserve(cost(1), LONG, 0).unwrap().0.as_secs())
            .collect();
        assert_eq!(waits, [0, 1, 2, 3]);
        assert_eq!(k.snapshot(0).requests(), Some(-3.0));
        assert_eq!(k.snapshot(0).queued_for, Duration::from_secs(3));
    }

    #[test]
    fn refusals_consume_nothing() {
        let mut k = KeyState::new(limits(1), 0);
        k.reserve(cost(1), LONG, 0).unwrap();
        let over = Denied::OverCapacity {
            cost: 1001,
            capacity: 1000,
        };
        assert_eq!(k.reserve(cost(1001), LONG, 0).unwrap_err(), over);
        let throttled = Denied::Throttled {
            retry_after: Duration::from_secs(1),
        };
        let short = Duration::from_millis(999);
        assert_eq!(k.reserve(cost(1), short, 0).unwrap_err(), throttled);
        assert_eq!(k.snapshot(0).requests(), Some(0.0));
        assert_eq!(k.snapshot(0).tokens(), Some(999.0));
        assert_eq!(k.links.len(), 1);
    }

    #[test]
    fn a_cancellation_moves_the_waiters_after_it_and_wakes_them() {
        let mut k = KeyState::new(limits(1), 0);
        let seqs: Vec<u64> = (0..4)
            .map(|_| k.reserve(cost(1), LONG, 0).unwrap().1)
            .collect();
        let count = Arc::new(Count::default());
        let waker = Waker::from(count.clone());
        assert_eq!(k.wait(seqs[3], &waker, S / 2), Duration::from_millis(2500));
        k.end(seqs[1], cost(1), End::Cancelled, S / 2);
        assert_eq!((at(&k, seqs[2]), at(&k, seqs[3])), (S, 2 * S));
        assert_eq!(
            count.0.load(Ordering::SeqCst),
            1,
            "the moved waiter is woken"
        );
        assert_eq!(k.wait(seqs[3], &waker, S / 2), Duration::from_millis(1500));
        // #0 was due and never admitted: cancelled, it returns what its slot still holds. #2
        // is due too, and may have been admitted: it keeps its slot.
        k.end(seqs[0], cost(1), End::Cancelled, 3 * S / 2);
        assert_eq!((at(&k, seqs[2]), at(&k, seqs[3])), (S, 2 * S));
        assert_eq!(k.snapshot(3 * S / 2).requests(), Some(-0.5));
        assert_eq!(k.links.len(), 2);
    }

    #[test]
    fn reconciliation_refunds_and_charges_the_overrun() {
        let mut k = KeyState::new(limits(100), 0);
        let (_, a) = k.reserve(cost(500), LONG, 0).unwrap();
        k.end(a, cost(500), End::Used(cost(100)), 0);
        assert_eq!(k.snapshot(0).tokens(), Some(900.0));
        let (_, b) = k.reserve(cost(100), LONG, 0).unwrap();
        k.end(b, cost(100), End::Used(cost(300)), 0);
        assert_eq!(k.snapshot(0).tokens(), Some(600.0));
        let (_, c) = k.reserve(cost(100), LONG, 0).unwrap();
        k.end(c, cost(100), End::Kept, 0);
        assert_eq!(k.snapshot(0).tokens(), Some(500.0));
        assert!(k.links.is_empty());
    }

    #[test]
    fn pause_clamp_and_limits() {
        let mut k = KeyState::new(limits(1), 0);
        k.pause(2 * S);
        let (wait, seq) = k.reserve(cost(1), LONG, 0).unwrap();
        assert_eq!(wait, Duration::from_secs(2));
        assert_eq!(k.snapshot(S).paused_for, Some(Duration::from_secs(1)));
        let remaining = Remaining {
            tokens: Some(10),
            ..Remaining::default()
        };
        k.clamp(remaining, 2 * S);
        assert_eq!(k.snapshot(2 * S).tokens(), Some(10.0));
        let limits = KeyLimits::unlimited().with_tokens(Rate::new(2000, 2000.0).unwrap());
        k.set_limits(limits, 2 * S);
        assert_eq!(
            k.snapshot(2 * S).tokens(),
            Some(10.0),
            "the level carries over"
        );
        assert_eq!(k.snapshot(2 * S).requests(), None);
        // A reservation from before the change keeps its charge.
        k.end(seq, cost(1), End::Cancelled, 2 * S);
        assert_eq!(k.snapshot(2 * S).tokens(), Some(10.0));
        assert!(k.links.is_empty());
    }

    /// 1000 waiters on 1 request/s, dropped in a random order: the key is as if they had never
    /// come, and the next caller gets the next second.
    #[test]
    fn a_queue_dropped_in_any_order_leaves_nothing() {
        use rand::seq::SliceRandom;
        use rand::{SeedableRng, rngs::SmallRng};
        let mut rng = SmallRng::seed_from_u64(19);
        let mut k = KeyState::new(limits(1), 0);
        k.reserve(cost(20), LONG, 0).unwrap();
        let before = k.tail;
        let mut seqs: Vec<u64> = (0..1000)
            .map(|i| k.reserve(cost(1 + i % 40), LONG, 0).unwrap().1)
            .collect();
        seqs.shuffle(&mut rng);
        for (i, seq) in seqs.into_iter().enumerate() {
            k.end(seq, cost(0), End::Cancelled, i as u64 * 1000);
        }
        assert_eq!(k.tail, before);
        assert_eq!(k.links.len(), 1);
        assert_eq!(
            k.reserve(cost(1), LONG, S / 2).unwrap().0,
            Duration::from_millis(500)
        );
    }

    // ---- the chain against a model that replays everything not cancelled ------------------

    /// One request of the model.
    #[derive(Debug, Clone)]
    struct Req {
        seq: u64,
        release: Nanos,
        cost: PerBucket<u64>,
        /// What it charges: its cost until settled, then what it kept; `None` once cancelled.
        charge: Option<PerBucket<u64>>,
        /// The slot it was already due at when something before it was refunded.
        pinned: Option<Nanos>,
        admitted: bool,
        settled: bool,
    }

    /// The GCRA replayed from scratch over the requests not cancelled (and the overruns, at
    /// their places), with the rule of invariant 3: a waiter's release rises to the time of
    /// each refund, and a due one is pinned to its slot.
    #[derive(Debug)]
    struct Model {
        buckets: PerBucket<Option<Bucket>>,
        items: Vec<Item>,
    }

    #[derive(Debug, Clone)]
    enum Item {
        Req(Req),
        /// An overrun: `units` consumed at `at`.
        Overrun {
            at: Nanos,
            units: PerBucket<u64>,
        },
    }

    impl Model {
        /// Each request's slot (by position; `None` if cancelled) and each bucket's `tat`.
        // Plain arrays and index loops: the model reads as the textbook GCRA.
        #[allow(clippy::needless_range_loop)]
        fn replay(&self) -> (Vec<Option<Nanos>>, PerBucket<Nanos>) {
            let buckets = self.buckets.into_array();
            let mut tat: [Nanos; 4] = [0; 4];
            let mut floor = 0;
            let mut slots = Vec::new();
            for item in &self.items {
                let (at, units) = match item {
                    Item::Req(r) => {
                        let Some(charge) = r.charge else {
                            slots.push(None);
                            continue;
                        };
                        let cost = r.cost.into_array();
                        let at = r.pinned.unwrap_or_else(|| {
                            let mut at = r.release.max(floor);
                            for i in 0..4 {
                                if let Some(b) = buckets[i] {
                                    at = at.max(tat[i].saturating_sub(b.tolerance(cost[i])));
                                }
                            }
                            at
                        });
                        slots.push(Some(at));
                        floor = floor.max(at);
                        (at, charge.into_array())
                    }
                    Item::Overrun { at, units } => (*at, units.into_array()),
                };
                for i in 0..4 {
                    if let Some(b) = buckets[i] {
                        tat[i] = tat[i].max(at) + b.refill_time(units[i]);
                    }
                }
            }
            (slots, PerBucket::from_array(tat))
        }

        /// A refund at `now`: pins what is due, raises the release of what waits.
        fn refund_at(&mut self, now: Nanos) {
            let (slots, _) = self.replay();
            let reqs = self.items.iter_mut().filter_map(|i| match i {
                Item::Req(r) => Some(r),
                Item::Overrun { .. } => None,
            });
            for (r, at) in reqs.zip(slots) {
                match at {
                    Some(at) if r.pinned.is_none() && at <= now => r.pinned = Some(at),
                    Some(_) if r.pinned.is_none() => r.release = r.release.max(now),
                    _ => {}
                }
            }
        }

        fn reqs(&mut self) -> impl Iterator<Item = &mut Req> {
            self.items.iter_mut().filter_map(|i| match i {
                Item::Req(r) => Some(r),
                Item::Overrun { .. } => None,
            })
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        Reserve(u64),
        Advance(u64),
        /// Cancels the `n`-th waiter not yet admitted (due or not).
        Drop(usize),
        /// Admits every waiter that is due.
        Admit,
        /// Settles the `n`-th call in flight with this share of its estimate (%), or keeps it
        /// unsettled (`None`).
        Finish(usize, Option<u64>),
    }

    /// Operations with these weights: reserve, advance, drop, admit, finish.
    fn op(w: [u32; 5]) -> impl Strategy<Value = Op> {
        prop_oneof![
            w[0] => (0u64..=1000).prop_map(Op::Reserve),
            w[1] => (0u64..400).prop_map(|ms| Op::Advance(ms * 1_000_000)),
            w[2] => any::<usize>().prop_map(Op::Drop),
            w[3] => Just(Op::Admit),
            w[4] => (any::<usize>(), proptest::option::weighted(0.8, 0u64..=150))
                .prop_map(|(n, pct)| Op::Finish(n, pct)),
        ]
    }

    /// Runs `ops` on a key and on the model, checking after every `every` of them and at the
    /// end that the slots of the live reservations and the levels agree, and that the key holds
    /// one link per live reservation.
    fn check(requests: u64, ops: Vec<Op>, every: usize) -> Result<(), TestCaseError> {
        let limits = KeyLimits::unlimited()
            .with_requests(Rate::new(requests, requests as f64 / 2.0).unwrap())
            .with_tokens(Rate::new(1000, 700.0).unwrap());
        let mut k = KeyState::new(limits, 0);
        let mut m = Model {
            buckets: buckets(limits),
            items: Vec::new(),
        };
        let mut now = 0;
        let last = ops.len() - 1;
        for (n, op) in ops.into_iter().enumerate() {
            match op {
                Op::Reserve(tokens) => {
                    let (_, seq) = k.reserve(cost(tokens), LONG, now).unwrap();
                    m.items.push(Item::Req(Req {
                        seq,
                        release: now,
                        cost: cost(tokens),
                        charge: Some(cost(tokens)),
                        pinned: None,
                        admitted: false,
                        settled: false,
                    }));
                }
                Op::Advance(d) => now += d,
                Op::Drop(n) => {
                    let waiting = m.reqs().filter(|r| r.charge.is_some() && !r.admitted);
                    let Some(seq) = waiting.map(|r| r.seq).nth(n % 64) else {
                        continue;
                    };
                    m.refund_at(now);
                    let r = m.reqs().find(|r| r.seq == seq).unwrap();
                    r.charge = None;
                    k.end(seq, r.cost, End::Cancelled, now);
                }
                Op::Admit => {
                    let (slots, _) = m.replay();
                    for (r, at) in m.reqs().zip(slots) {
                        if at.is_some_and(|at| at <= now) {
                            r.admitted = true;
                        }
                    }
                }
                Op::Finish(n, pct) => {
                    let calls = m
                        .reqs()
                        .filter(|r| r.admitted && !r.settled && r.charge.is_some());
                    let Some(r) = calls.into_iter().nth(n % 16) else {
                        continue;
                    };
                    r.settled = true;
                    let (seq, estimate) = (r.seq, r.cost);
                    let Some(pct) = pct else {
                        k.end(seq, estimate, End::Kept, now);
                        continue;
                    };
                    let actual = estimate.map(|c| c * pct / 100);
                    m.refund_at(now);
                    let r = m.reqs().find(|r| r.seq == seq).unwrap();
                    r.charge = Some(actual.zip(estimate).map(|(a, e)| a.min(e)));
                    let over = actual.zip(estimate).map(|(a, e)| a.saturating_sub(e));
                    if over != PerBucket::default() {
                        m.items.push(Item::Overrun {
                            at: now,
                            units: over,
                        });
                    }
                    k.end(seq, estimate, End::Used(actual), now);
                }
            }
            if n % every != 0 && n != last {
                continue;
            }
            let (slots, tat) = m.replay();
            let live: Vec<(u64, Nanos)> = m
                .reqs()
                .zip(slots)
                .filter_map(|(r, at)| if r.settled { None } else { Some((r.seq, at?)) })
                .collect();
            let links: Vec<(u64, Nanos)> = k.links.iter().map(|l| (l.seq, l.at)).collect();
            prop_assert_eq!(&links, &live, "slots of the live reservations at {}", now);
            let configured = k.buckets.zip(k.tail.tat.zip(tat));
            for (b, (got, want)) in configured {
                if b.is_some() {
                    prop_assert_eq!(got, want, "tat at {}", now);
                }
            }
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig {
            cases: 48,
            rng_seed: proptest::test_runner::RngSeed::Fixed(19),
            ..ProptestConfig::default()
        })]

        #[test]
        fn the_chain_is_the_gcra_of_what_was_not_cancelled(
            requests in 1u64..5,
            ops in proptest::collection::vec(op([6, 2, 4, 1, 2]), 1..400),
        ) {
            check(requests, ops, 1)?;
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig {
            cases: 1,
            rng_seed: proptest::test_runner::RngSeed::Fixed(13),
            ..ProptestConfig::default()
        })]

        /// Thousands of waiters queued, then dropped in random orders among other operations.
        #[test]
        fn thousands_of_waiters(
            queue in proptest::collection::vec(op([40, 1, 2, 1, 1]), 2000..2100),
            drain in proptest::collection::vec(op([1, 1, 12, 1, 2]), 2000..2100),
        ) {
            check(2, [queue, drain].concat(), 97)?;
        }
    }
}
