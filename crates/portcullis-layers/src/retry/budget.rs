//! The retry budget shared by every clone of a retry layer.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use super::backoff::nanos;
use super::config::{BudgetConfig, ConfigError, in_range, positive};

/// Slots of the sliding window: requests and retries older than the window leave it one slot
/// (a tenth of the window) at a time.
const SLOTS: usize = 10;

/// Caps retries at a fraction of requests, over a sliding window, plus a small floor per
/// second: `retries ≤ retry_ratio × requests + min_per_sec × window`.
///
/// A dead provider otherwise turns every request into `1 + max_retries` calls. With the
/// default 20 %, once the floor is spent a failure storm costs at most 1.2 calls per request,
/// and the excess requests fail at once with
/// [`RetryStop::BudgetExhausted`](portcullis_core::RetryStop::BudgetExhausted).
///
/// Every request is [deposited](RetryBudget::deposit); every retry must
/// [withdraw](RetryBudget::try_withdraw). A deposit that falls in the current slot is one
/// atomic addition; everything else (a withdrawal, a deposit that moves the window on) holds a
/// `std` mutex for a few additions. Time comes from `tokio::time`, so paused-time tests drive
/// the window.
///
/// ```
/// use std::time::Duration;
/// use portcullis_layers::retry::{BudgetConfig, RetryBudget};
///
/// let config = BudgetConfig { retry_ratio: 0.5, min_per_sec: 0.0, window: Duration::from_secs(10) };
/// let budget = RetryBudget::new(&config).unwrap();
/// for _ in 0..4 {
///     budget.deposit();
/// }
/// assert!(budget.try_withdraw());
/// assert!(budget.try_withdraw());
/// assert!(!budget.try_withdraw()); // 2 retries for 4 requests at 50 %
/// ```
#[derive(Debug)]
pub struct RetryBudget {
    ratio: f64,
    reserve: f64,
    slot: u64,
    window: Mutex<Window>,
    /// What `head_end` counts from.
    origin: Instant,
    /// The end of the head slot, in nanoseconds since `origin` (0 before the first use):
    /// a deposit before it belongs to the head slot and only adds to `fresh`.
    head_end: AtomicU64,
    /// Deposits made into the head slot without the mutex, not yet added to `window`; the
    /// mutex holder adds them before the window moves on. (A deposit that raced with that move
    /// counts in the next slot: it leaves the window one slot late, never early.)
    fresh: AtomicU64,
}

#[derive(Debug, Default)]
struct Window {
    slots: [Counts; SLOTS],
    head: usize,
    head_start: Option<Instant>,
    total: Counts,
}

#[derive(Debug, Default, Clone, Copy)]
struct Counts {
    requests: u64,
    retries: u64,
}

impl RetryBudget {
    /// A budget from a validated [`BudgetConfig`].
    pub fn new(config: &BudgetConfig) -> Result<Self, ConfigError> {
        let ratio = in_range("budget.retry_ratio", config.retry_ratio, 0.0, 1.0)?;
        let per_sec = in_range("budget.min_per_sec", config.min_per_sec, 0.0, f64::MAX)?;
        let window = positive("budget.window_ms", config.window)?;
        Ok(Self::from_parts(ratio, per_sec, window))
    }

    fn from_parts(ratio: f64, per_sec: f64, window: Duration) -> Self {
        RetryBudget {
            ratio,
            reserve: per_sec * window.as_secs_f64(),
            slot: (nanos(window) / SLOTS as u64).max(1),
            window: Mutex::new(Window::default()),
            origin: Instant::now(),
            head_end: AtomicU64::new(0),
            fresh: AtomicU64::new(0),
        }
    }

    /// Records one request (each call to the layer, not each attempt).
    pub fn deposit(&self) {
        self.deposit_at(Instant::now());
    }

    /// [`deposit`](Self::deposit) at `now`, a time the caller just read.
    pub(crate) fn deposit_at(&self, now: Instant) {
        let at = nanos(now.saturating_duration_since(self.origin));
        if at < self.head_end.load(Ordering::Acquire) {
            self.fresh.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.with_window_at(now, |w| {
            w.slots[w.head].requests += 1;
            w.total.requests += 1;
        });
    }

    /// Takes one retry from the budget; `false` when it is spent.
    pub fn try_withdraw(&self) -> bool {
        self.with_window(|w| {
            let allowed = self.ratio * w.total.requests as f64 + self.reserve;
            if (w.total.retries + 1) as f64 > allowed {
                return false;
            }
            w.slots[w.head].retries += 1;
            w.total.retries += 1;
            true
        })
    }

    /// Requests and retries counted in the current window.
    pub fn counts(&self) -> (u64, u64) {
        self.with_window(|w| (w.total.requests, w.total.retries))
    }

    fn with_window<T>(&self, f: impl FnOnce(&mut Window) -> T) -> T {
        self.with_window_at(Instant::now(), f)
    }

    fn with_window_at<T>(&self, now: Instant, f: impl FnOnce(&mut Window) -> T) -> T {
        let mut w = self.window.lock().unwrap_or_else(|p| p.into_inner());
        // The lock-free deposits belong to the head slot as it is before moving on.
        let fresh = self.fresh.swap(0, Ordering::AcqRel);
        let head = w.head;
        w.slots[head].requests += fresh;
        w.total.requests += fresh;
        w.advance(now, self.slot);
        if let Some(start) = w.head_start {
            let end = nanos(start.saturating_duration_since(self.origin)).saturating_add(self.slot);
            self.head_end.store(end, Ordering::Release);
        }
        f(&mut w)
    }
}

impl Default for RetryBudget {
    /// The defaults of [`BudgetConfig`]: 20 % of requests plus 1 retry per second, over 10 s.
    fn default() -> Self {
        Self::from_parts(0.2, 1.0, Duration::from_secs(10))
    }
}

impl Window {
    /// Moves the head to the slot that contains `now`, forgetting the slots that left the
    /// window.
    fn advance(&mut self, now: Instant, slot: u64) {
        let start = *self.head_start.get_or_insert(now);
        let steps = nanos(now.saturating_duration_since(start)) / slot;
        if steps == 0 {
            return;
        }
        for _ in 0..steps.min(SLOTS as u64) {
            self.head = (self.head + 1) % SLOTS;
            let old = std::mem::take(&mut self.slots[self.head]);
            self.total.requests -= old.requests;
            self.total.retries -= old.retries;
        }
        // `steps · slot` ≤ the elapsed time, so this neither overflows nor passes `now`.
        self.head_start = Some(start + Duration::from_nanos(steps * slot));
    }
}
