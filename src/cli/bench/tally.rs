//! What a benchmark counts: which events arrived (so losses and duplicates
//! are counted, never hidden), and how late (an HDR histogram).

use std::time::Duration;

/// Bytes at the start of every benchmark payload: publisher index, sequence
/// number, and the send time in nanoseconds since the run's start.
pub const HEADER: usize = 4 + 8 + 8;

/// Writes the header into the first [`HEADER`] bytes of `payload`.
pub fn stamp(payload: &mut [u8], publisher: u32, seq: u64, sent: Duration) {
    payload[..4].copy_from_slice(&publisher.to_be_bytes());
    payload[4..12].copy_from_slice(&seq.to_be_bytes());
    payload[12..20].copy_from_slice(&(sent.as_nanos() as u64).to_be_bytes());
}

/// The header of a payload: publisher, sequence number, send time.
pub fn read_stamp(payload: &[u8]) -> Option<(u32, u64, Duration)> {
    let publisher = u32::from_be_bytes(payload.get(..4)?.try_into().ok()?);
    let seq = u64::from_be_bytes(payload.get(4..12)?.try_into().ok()?);
    let sent = u64::from_be_bytes(payload.get(12..20)?.try_into().ok()?);
    Some((publisher, seq, Duration::from_nanos(sent)))
}

/// Which of the events each publisher sent have been received, and how
/// often. Sequence numbers run from 0 to the publisher's count.
#[derive(Debug, Clone)]
pub struct Tally {
    /// One bit per event, per publisher.
    seen: Vec<Vec<u64>>,
    per_publisher: u64,
    /// Every event handed over, duplicates included.
    pub delivered: u64,
    pub unique: u64,
    pub duplicated: u64,
    /// Events naming a publisher or sequence number that was never sent.
    pub foreign: u64,
}

impl Tally {
    pub fn new(publishers: u32, per_publisher: u64) -> Self {
        let words = per_publisher.div_ceil(64) as usize;
        Tally {
            seen: vec![vec![0; words]; publishers as usize],
            per_publisher,
            delivered: 0,
            unique: 0,
            duplicated: 0,
            foreign: 0,
        }
    }

    pub fn record(&mut self, publisher: u32, seq: u64) {
        self.delivered += 1;
        let Some(bits) = self.seen.get_mut(publisher as usize) else {
            self.foreign += 1;
            return;
        };
        if seq >= self.per_publisher {
            self.foreign += 1;
            return;
        }
        let (word, bit) = ((seq / 64) as usize, 1u64 << (seq % 64));
        if bits[word] & bit == 0 {
            bits[word] |= bit;
            self.unique += 1;
        } else {
            self.duplicated += 1;
        }
    }

    /// Adds what another receiver saw: for members of one queue group, an
    /// event both received is a duplicate.
    pub fn merge(&mut self, other: &Tally) {
        self.delivered += other.delivered;
        self.duplicated += other.duplicated;
        self.foreign += other.foreign;
        for (mine, theirs) in self.seen.iter_mut().zip(&other.seen) {
            for (m, t) in mine.iter_mut().zip(theirs) {
                let both = (*m & *t).count_ones() as u64;
                self.duplicated += both;
                self.unique += (t.count_ones() as u64) - both;
                *m |= t;
            }
        }
    }

    /// Events expected and never received.
    pub fn lost(&self, expected: u64) -> u64 {
        expected.saturating_sub(self.unique)
    }
}

/// One-way latencies, in microseconds.
pub struct Latencies(hdrhistogram::Histogram<u64>);

impl Latencies {
    pub fn new() -> Self {
        // 1 µs to 1 hour at 3 significant digits.
        Latencies(
            hdrhistogram::Histogram::new_with_bounds(1, 3_600_000_000, 3)
                .expect("valid histogram bounds"),
        )
    }

    pub fn record(&mut self, latency: Duration) {
        let micros = (latency.as_micros() as u64).max(1);
        self.0.saturating_record(micros);
    }

    pub fn merge(&mut self, other: &Latencies) {
        // Same bounds on both sides, so adding cannot fail.
        let _ = self.0.add(&other.0);
    }

    pub fn len(&self) -> u64 {
        self.0.len()
    }

    /// The latency at `percentile` (0–100), in microseconds.
    pub fn percentile(&self, percentile: f64) -> u64 {
        self.0.value_at_quantile(percentile / 100.0)
    }

    pub fn max(&self) -> u64 {
        self.0.max()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stamp_reads_back() {
        let mut payload = vec![0u8; 128];
        stamp(&mut payload, 7, 123_456, Duration::from_micros(987));
        assert_eq!(
            read_stamp(&payload),
            Some((7, 123_456, Duration::from_micros(987)))
        );
        assert_eq!(read_stamp(&payload[..HEADER - 1]), None);
    }

    #[test]
    fn losses_and_duplicates_are_counted() {
        let mut tally = Tally::new(2, 100);
        for seq in 0..100 {
            tally.record(0, seq);
        }
        for seq in 0..90 {
            tally.record(1, seq);
        }
        tally.record(1, 5);
        tally.record(1, 5);
        tally.record(2, 0);
        tally.record(0, 100);
        assert_eq!(tally.delivered, 194);
        assert_eq!(tally.unique, 190);
        assert_eq!(tally.duplicated, 2);
        assert_eq!(tally.foreign, 2);
        assert_eq!(tally.lost(200), 10);
    }

    #[test]
    fn a_queue_groups_members_add_up_and_overlap_is_duplication() {
        let mut first = Tally::new(1, 130);
        let mut second = Tally::new(1, 130);
        for seq in 0..70 {
            first.record(0, seq);
        }
        // 65..130: five of them the first member had too.
        for seq in 65..130 {
            second.record(0, seq);
        }
        first.merge(&second);
        assert_eq!(first.delivered, 135);
        assert_eq!(first.unique, 130);
        assert_eq!(first.duplicated, 5);
        assert_eq!(first.lost(130), 0);
    }

    #[test]
    fn percentiles_come_from_the_histogram() {
        let mut latencies = Latencies::new();
        for micros in 1..=1000 {
            latencies.record(Duration::from_micros(micros));
        }
        let mut other = Latencies::new();
        other.record(Duration::from_millis(50));
        latencies.merge(&other);
        assert_eq!(latencies.len(), 1001);
        // Three significant digits: within 0.1%.
        assert!((499..=501).contains(&latencies.percentile(50.0)));
        assert!((989..=991).contains(&latencies.percentile(99.0)));
        assert!((999..=1001).contains(&latencies.percentile(99.9)));
        assert!((49_950..=50_050).contains(&latencies.max()));
    }
}
