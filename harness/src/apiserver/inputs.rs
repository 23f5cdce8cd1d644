//! What the envelope takes from outside besides the plugin: random bytes and the time. Both are
//! injectable so a run can be replayed byte for byte (recorded or seeded randomness) and the 3-minute
//! write expiry can be tested without waiting. Production uses the OS CSPRNG and the monotonic clock.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};

/// What a draw of random bytes is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Draw {
    /// The 32-byte seed of a write state (once per key ID).
    Seed,
    /// The 32-byte HKDF `info` of one write.
    Info,
    /// The 12-byte GCM nonce of one write.
    Nonce,
    /// The 16 random bytes of a request UUIDv4.
    Uid,
}

/// A source of random bytes for the envelope.
pub trait Randomness: Send {
    /// Fills `out` with bytes for `draw`.
    fn fill(&mut self, draw: Draw, out: &mut [u8]);
}

/// The OS-seeded CSPRNG (`rand::rng()`): what the apiserver's `crypto/rand` is.
#[derive(Clone, Copy, Debug, Default)]
pub struct OsRandom;

impl Randomness for OsRandom {
    fn fill(&mut self, _draw: Draw, out: &mut [u8]) {
        rand::rng().fill_bytes(out);
    }
}

/// A deterministic stream from a 64-bit seed, for replaying a scenario run. Never for data that matters.
#[derive(Clone)]
pub struct SeededRandom(StdRng);

impl std::fmt::Debug for SeededRandom {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SeededRandom { .. }") // the generator state would reveal every future draw
    }
}

impl SeededRandom {
    /// The stream for `seed`.
    pub fn new(seed: u64) -> Self {
        Self(StdRng::seed_from_u64(seed))
    }
}

impl Randomness for SeededRandom {
    fn fill(&mut self, _draw: Draw, out: &mut [u8]) {
        self.0.fill_bytes(out);
    }
}

/// Recorded bytes handed out per [`Draw`] in order, to re-encrypt byte-identically (golden vectors).
/// A draw with nothing queued (or of the wrong length) falls back to [`OsRandom`], so a missing
/// recording yields a different value, never a weak one.
#[derive(Default)]
pub struct Recorded {
    queues: BTreeMap<Draw, VecDeque<Vec<u8>>>,
}

impl std::fmt::Debug for Recorded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Counts only: a queued seed is key material.
        let queued: BTreeMap<&Draw, usize> = self.queues.iter().map(|(d, q)| (d, q.len())).collect();
        f.debug_struct("Recorded").field("queued", &queued).finish()
    }
}

impl Recorded {
    /// Nothing queued.
    pub fn new() -> Self {
        Self::default()
    }

    /// Queues `bytes` for the next `draw`.
    pub fn push(mut self, draw: Draw, bytes: impl Into<Vec<u8>>) -> Self {
        self.queues.entry(draw).or_default().push_back(bytes.into());
        self
    }
}

impl Randomness for Recorded {
    fn fill(&mut self, draw: Draw, out: &mut [u8]) {
        match self.queues.get_mut(&draw).and_then(VecDeque::pop_front) {
            Some(bytes) if bytes.len() == out.len() => out.copy_from_slice(&bytes),
            _ => OsRandom.fill(draw, out),
        }
    }
}

/// The time source for write-state expiry.
pub trait Clock: Send + Sync {
    /// Now.
    fn now(&self) -> Instant;
}

/// The monotonic system clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
}

/// A clock that only moves when told to.
#[derive(Debug)]
pub struct ManualClock {
    start: Instant,
    offset: Mutex<Duration>,
}

impl ManualClock {
    /// Stopped at the current instant.
    pub fn new() -> Self {
        Self {
            start: Instant::now(),
            offset: Mutex::new(Duration::ZERO),
        }
    }

    /// Moves the clock forward.
    pub fn advance(&self, by: Duration) {
        *self
            .offset
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) += by;
    }
}

impl Default for ManualClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Instant {
        self.start
            + *self
                .offset
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recorded_hands_out_per_draw_in_order_then_falls_back() {
        let mut random = Recorded::new()
            .push(Draw::Nonce, [1; 12])
            .push(Draw::Nonce, [2; 12])
            .push(Draw::Info, [3; 32]);
        let mut nonce = [0; 12];
        random.fill(Draw::Nonce, &mut nonce);
        assert_eq!(nonce, [1; 12]);
        let mut info = [0; 32];
        random.fill(Draw::Info, &mut info);
        assert_eq!(info, [3; 32]);
        random.fill(Draw::Nonce, &mut nonce);
        assert_eq!(nonce, [2; 12]);
        random.fill(Draw::Nonce, &mut nonce);
        assert_ne!(nonce, [2; 12], "nothing left: fresh OS randomness");
    }

    #[test]
    fn seeded_random_replays() {
        let (mut a, mut b) = (SeededRandom::new(7), SeededRandom::new(7));
        let (mut x, mut y) = ([0; 32], [0; 32]);
        a.fill(Draw::Seed, &mut x);
        b.fill(Draw::Seed, &mut y);
        assert_eq!(x, y);
    }

    #[test]
    fn manual_clock_moves_only_when_advanced() {
        let clock = ManualClock::new();
        let t0 = clock.now();
        assert_eq!(clock.now(), t0);
        clock.advance(Duration::from_secs(181));
        assert_eq!(clock.now() - t0, Duration::from_secs(181));
    }
}
