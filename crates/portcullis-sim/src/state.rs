//! The state every connection shares: settings, faults, limits, stats, the RNG.

use std::sync::Mutex;
use std::time::Duration;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::cache::PromptCache;
use crate::limits::Limiter;
use crate::scenario::{Family, FaultKind, FaultPlan, FaultRule, Scenario};
use crate::stats::Stats;

/// Locks a mutex, recovering from poisoning (a panic elsewhere must not wedge the server).
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Settings that are read per request.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Settings {
    pub seed: u64,
    pub max_body_bytes: usize,
    pub chunk_delay: Duration,
    pub answer_words: u32,
}

/// The faults in force and how often each rule fired.
#[derive(Debug)]
pub(crate) struct FaultState {
    plan: FaultPlan,
    fired: Vec<u64>,
    fired_phase: Vec<Vec<u64>>,
    start: Instant,
}

impl FaultState {
    fn new(plan: FaultPlan, start: Instant) -> Self {
        FaultState {
            fired: vec![0; plan.faults.len()],
            fired_phase: plan
                .timeline
                .iter()
                .map(|p| vec![0; p.faults.len()])
                .collect(),
            plan,
            start,
        }
    }

    /// The plan in force.
    pub(crate) fn plan(&self) -> &FaultPlan {
        &self.plan
    }

    /// The timeline phase in force at `now`, if any.
    fn phase(&self, now: Instant) -> Option<usize> {
        let elapsed = now.saturating_duration_since(self.start).as_secs_f64();
        let mut end = 0.0;
        for (i, p) in self.plan.timeline.iter().enumerate() {
            match p.duration_secs {
                None => return Some(i),
                Some(d) => {
                    end += d;
                    if elapsed < end {
                        return Some(i);
                    }
                }
            }
        }
        None
    }
}

/// What the fault rules decided for one request.
#[derive(Debug, Clone, Default)]
pub(crate) struct Chosen {
    /// Total added latency.
    pub latency: Duration,
    /// The fault to apply, if any.
    pub fault: Option<FaultRule>,
}

/// Shared by the server, its connections and the handle.
#[derive(Debug)]
pub(crate) struct Shared {
    pub settings: Mutex<Settings>,
    pub faults: Mutex<FaultState>,
    pub limiter: Mutex<Limiter>,
    pub stats: Mutex<Stats>,
    /// The prompt prefixes held, for cache reads.
    pub cache: Mutex<PromptCache>,
    pub rng: Mutex<SmallRng>,
    pub shutdown: watch::Sender<bool>,
    /// [`Scenario::deployments`]: fixed at start.
    pub deployments: Vec<String>,
}

impl Shared {
    pub(crate) fn new(s: &Scenario) -> Self {
        Shared {
            settings: Mutex::new(Settings {
                seed: s.seed,
                max_body_bytes: s.max_body_bytes,
                chunk_delay: Duration::from_millis(s.chunk_delay_ms),
                answer_words: s.answer_words,
            }),
            faults: Mutex::new(FaultState::new(s.plan(), Instant::now())),
            limiter: Mutex::new(Limiter::new(s.limits.clone())),
            stats: Mutex::new(Stats::default()),
            cache: Mutex::new(PromptCache::default()),
            rng: Mutex::new(SmallRng::seed_from_u64(s.seed)),
            shutdown: watch::channel(false).0,
            deployments: s.deployments.clone(),
        }
    }

    pub(crate) fn settings(&self) -> Settings {
        *lock(&self.settings)
    }

    /// Replaces the faults and restarts the timeline clock.
    pub(crate) fn set_plan(&self, plan: FaultPlan) {
        *lock(&self.faults) = FaultState::new(plan, Instant::now());
    }

    /// Forgets how often rules fired and restarts the timeline clock.
    pub(crate) fn restart_plan(&self) {
        let plan = lock(&self.faults).plan.clone();
        self.set_plan(plan);
    }

    pub(crate) fn stats(&self, f: impl FnOnce(&mut Stats)) {
        f(&mut lock(&self.stats));
    }

    /// Rolls the dice for a request of `family`.
    pub(crate) fn decide(&self, family: Family, stream: bool) -> Chosen {
        let now = Instant::now();
        let mut state = lock(&self.faults);
        let mut rng = lock(&self.rng);
        let phase = state.phase(now);
        let FaultState {
            plan,
            fired,
            fired_phase,
            ..
        } = &mut *state;
        let base = plan.faults.iter().zip(fired.iter_mut());
        let timed = match phase {
            Some(i) => plan.timeline[i]
                .faults
                .iter()
                .zip(fired_phase[i].iter_mut()),
            None => [].iter().zip([].iter_mut()),
        };
        let mut chosen = Chosen::default();
        for (rule, fired) in base.chain(timed) {
            let applies = rule.family.covers(family)
                && (stream || !rule.kind.stream_only())
                && rule.times.is_none_or(|n| *fired < n)
                && (rule.kind == FaultKind::Latency || chosen.fault.is_none());
            // Only roll for rules that could fire, so the dice stay reproducible.
            if !applies || (rule.probability < 1.0 && !rng.random_bool(rule.probability)) {
                continue;
            }
            *fired += 1;
            if rule.kind == FaultKind::Latency {
                chosen.latency += Duration::from_millis(rule.latency_ms.unwrap_or(0));
            } else {
                chosen.fault = Some(rule.clone());
            }
        }
        chosen
    }
}
