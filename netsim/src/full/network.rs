//! Link conditions turmoil does not model itself: per-datagram loss,
//! decided by the run's seeded generator so a run replays exactly.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Mutex;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

pub struct Conditions {
    state: Mutex<State>,
}

struct State {
    /// Loss probability by host pair, smaller address first.
    loss: BTreeMap<(IpAddr, IpAddr), f64>,
    rng: StdRng,
    dropped: u64,
}

impl Conditions {
    pub fn new(seed: u64) -> Self {
        Conditions {
            state: Mutex::new(State {
                loss: BTreeMap::new(),
                rng: StdRng::seed_from_u64(seed),
                dropped: 0,
            }),
        }
    }

    pub fn set_loss(&self, a: IpAddr, b: IpAddr, probability: f64) {
        let mut state = self.lock();
        if probability > 0.0 {
            state.loss.insert(pair(a, b), probability);
        } else {
            state.loss.remove(&pair(a, b));
        }
    }

    /// Whether the datagram from `a` to `b` is lost.
    pub fn drops(&self, a: IpAddr, b: IpAddr) -> bool {
        let mut state = self.lock();
        let drop = match state.loss.get(&pair(a, b)).copied() {
            Some(p) => state.rng.random_bool(p),
            None => false,
        };
        state.dropped += u64::from(drop);
        drop
    }

    /// Datagrams dropped so far.
    pub fn dropped(&self) -> u64 {
        self.lock().dropped
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn pair(a: IpAddr, b: IpAddr) -> (IpAddr, IpAddr) {
    if a <= b {
        (a, b)
    } else {
        (b, a)
    }
}
