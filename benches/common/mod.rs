//! What the benchmarks share: their server processes and ports.

use std::process::Child;

/// A process killed when the benchmark is done with it.
pub struct Killed(pub Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A port free on 127.0.0.1 for TCP (nats-server) and UDP alike, most of
/// the time.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
