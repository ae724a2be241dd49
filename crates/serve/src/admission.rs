//! Admission control: at most `capacity` generation jobs are in the server at once (running or
//! queued for the engine). Past that, a request is refused at once with 503 and `Retry-After`
//! (how long the jobs ahead are expected to take), instead of queueing without bound while
//! every client waits longer.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// Counts the jobs in the server and how long a job takes.
#[derive(Debug)]
pub(crate) struct Admission {
    capacity: usize,
    /// Jobs that run side by side.
    parallel: usize,
    in_flight: AtomicUsize,
    /// Exponential moving average of a job's wall time, in milliseconds.
    mean_job_ms: AtomicU64,
}

/// A place in the server, held for as long as its job runs; dropping it frees the place and
/// records the job's duration.
#[derive(Debug)]
pub(crate) struct Ticket {
    admission: Arc<Admission>,
    start: Instant,
}

impl Admission {
    pub fn new(capacity: usize, parallel: usize) -> Self {
        Self {
            capacity,
            parallel: parallel.max(1),
            in_flight: AtomicUsize::new(0),
            mean_job_ms: AtomicU64::new(1000),
        }
    }

    /// A ticket when there is room; otherwise the seconds a client should wait before trying
    /// again (the expected time for the jobs in the server to drain, at least 1).
    pub fn try_admit(self: &Arc<Self>) -> Result<Ticket, u64> {
        let taken = self
            .in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.capacity).then_some(n + 1)
            });
        match taken {
            Ok(_) => Ok(Ticket {
                admission: self.clone(),
                start: Instant::now(),
            }),
            Err(n) => {
                // The jobs ahead drain `parallel` at a time.
                let rounds = n.div_ceil(self.parallel) as u64;
                let ms = self.mean_job_ms.load(Ordering::Relaxed) * rounds;
                Err(ms.div_ceil(1000).max(1))
            }
        }
    }

    /// Jobs in the server now.
    #[cfg(test)]
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let ms = self.start.elapsed().as_millis().min(u64::MAX as u128) as u64;
        let a = &self.admission;
        // Weight 1/8 on the newest job: steady, yet follows a change of load within a few jobs.
        let _ = a
            .mean_job_ms
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |m| {
                Some((m * 7 + ms) / 8)
            });
        a.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admits_up_to_capacity_and_frees_places_on_drop() {
        let a = Arc::new(Admission::new(2, 1));
        let t1 = a.try_admit().unwrap();
        let t2 = a.try_admit().unwrap();
        let retry = a.try_admit().unwrap_err();
        assert!(retry >= 1, "{retry}");
        assert_eq!(a.in_flight(), 2);
        drop(t1);
        assert_eq!(a.in_flight(), 1);
        let t3 = a.try_admit().unwrap();
        drop((t2, t3));
        assert_eq!(a.in_flight(), 0);
    }

    #[test]
    fn retry_after_grows_with_the_jobs_ahead() {
        let a = Arc::new(Admission::new(4, 1));
        let tickets: Vec<Ticket> = (0..4).map(|_| a.try_admit().unwrap()).collect();
        // Four jobs of the initial 1 s estimate ahead.
        assert_eq!(a.try_admit().unwrap_err(), 4);
        drop(tickets);
        // Quick jobs pull the estimate down.
        for _ in 0..40 {
            drop(a.try_admit().unwrap());
        }
        let tickets: Vec<Ticket> = (0..4).map(|_| a.try_admit().unwrap()).collect();
        assert_eq!(a.try_admit().unwrap_err(), 1);
        drop(tickets);
    }
}
