//! The Lua scripts (one atomic round trip each) and their replies.

use std::time::Duration;

use portcullis_layers::token_bucket::{Denied, PerBucket};
use redis::Script;

use crate::Error;

const PRELUDE: &str = include_str!("lua/prelude.lua");

/// Every script: the shared prelude (load the key, `TIME`, helpers) followed by its body.
pub(crate) struct Scripts {
    pub(crate) reserve: Script,
    pub(crate) settle: Script,
    pub(crate) pause: Script,
    pub(crate) clear_pause: Script,
    pub(crate) clamp: Script,
    pub(crate) set_limits: Script,
    pub(crate) fetch: Script,
}

impl Scripts {
    pub(crate) fn new() -> Self {
        let s = |body: &str| Script::new(&format!("{PRELUDE}\n{body}"));
        Scripts {
            reserve: s(include_str!("lua/reserve.lua")),
            settle: s(include_str!("lua/settle.lua")),
            pause: s(include_str!("lua/pause.lua")),
            clear_pause: s(include_str!("lua/clear_pause.lua")),
            clamp: s(include_str!("lua/clamp.lua")),
            set_limits: s(include_str!("lua/set_limits.lua")),
            fetch: s(include_str!("lua/fetch.lua")),
        }
    }
}

fn bad_reply(reply: &[i64]) -> Error {
    Error::Redis(redis::RedisError::from((
        redis::ErrorKind::Parse,
        "unexpected script reply",
        format!("{reply:?}"),
    )))
}

/// A key's state on the server (µs on the server's clock).
#[derive(Debug, Clone, Copy)]
pub(crate) struct State {
    pub(crate) now: i64,
    pub(crate) floor: i64,
    pub(crate) paused: i64,
    pub(crate) tat: PerBucket<i64>,
}

/// The farthest from the server's `now` a value of a reply may be (two centuries, in µs): the
/// scripts heal anything beyond it, and a reply is read the same way, so that no value read
/// back from Redis can overflow the arithmetic or ask for a wait of millennia.
pub(crate) const BOUND: i64 = 6_300_000_000_000_000;

impl State {
    pub(crate) fn parse(r: &[i64]) -> Result<State, Error> {
        match r {
            // The server's clock: µs since the epoch, so positive and far from the limits.
            [now, floor, paused, t0, t1, t2, t3] if (1..BOUND).contains(now) => {
                let near = |v: i64| v.clamp(now - BOUND, now + BOUND);
                Ok(State {
                    now: *now,
                    floor: near(*floor),
                    paused: near(*paused),
                    tat: PerBucket::from_array([*t0, *t1, *t2, *t3]).map(near),
                })
            }
            _ => Err(bad_reply(r)),
        }
    }
}

/// The reply of the reserve script: a refusal, or the wait, the reservation's number and the
/// new state.
pub(crate) type Reserved = Result<(Duration, i64, State), Denied>;

pub(crate) fn parse_reserve(r: &[i64]) -> Result<Reserved, Error> {
    let pos = |v: i64| v.clamp(0, BOUND) as u64;
    match r {
        [1, cost, capacity] => Ok(Err(Denied::OverCapacity {
            cost: pos(*cost),
            capacity: pos(*capacity),
        })),
        [2, wait] => Ok(Err(Denied::Throttled {
            retry_after: Duration::from_micros(pos(*wait)),
        })),
        [0, wait, seq, state @ ..] => Ok(Ok((
            Duration::from_micros(pos(*wait)),
            *seq,
            State::parse(state)?,
        ))),
        _ => Err(bad_reply(r)),
    }
}
