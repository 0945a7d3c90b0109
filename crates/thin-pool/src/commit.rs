//! Commits: group commit for flushes, the periodic commit, and the committer thread.
//!
//! A flush takes a ticket and waits until a commit *round* that started after the ticket was
//! issued has finished. The committer starts a round whenever tickets are waiting (or the
//! periodic interval passed with changes pending): it takes every ticket issued so far, so
//! all flushes that arrived during the previous round's I/O share the next one.
//!
//! A round: note `change_seq`, then `commit_with_barrier`, which captures the transaction,
//! flushes the data device (every data write whose mapping the transaction records completed
//! before the mapping was inserted, hence before the capture, hence before this flush), then
//! writes the metadata. With nothing to commit a round is just the data flush.
//! On success `durable_seq` moves up to the noted value: a thin whose last change is at or
//! below it needs no commit for its next flush or FUA write.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use block_io::data::{rt, DataDevice};

use crate::error::{PoolError, Result};
use crate::pool::{DeviceFactory, Shared};
use crate::status::{bump, PoolMode};

/// How often the committer looks at queued writes' deadlines while some wait for space: how
/// late a queued write may notice its timeout.
const SPACE_TICK: Duration = Duration::from_millis(5);

impl Shared {
    /// Runs (or joins) a commit round and waits for it.
    pub async fn commit_and_wait(&self) -> Result<()> {
        let ticket = {
            let mut st = self.commit.lock();
            if st.stop {
                return Err(PoolError::ShuttingDown);
            }
            st.requested += 1;
            st.requested
        };
        self.commit_cv.notify_all();
        self.commit_done
            .wait_until(|| {
                let st = self.commit.lock();
                st.completed >= ticket || st.stop
            })
            .await;
        let st = self.commit.lock();
        if st.ok_through >= ticket {
            Ok(())
        } else if st.completed >= ticket {
            drop(st);
            self.check_writable()?;
            Err(PoolError::ReadOnly("the commit failed".into()))
        } else {
            Err(PoolError::ShuttingDown)
        }
    }

    /// Every change up to `seq` is durable.
    fn note_durable(&self, seq: u64) {
        self.durable_seq.fetch_max(seq, Ordering::SeqCst);
        if let Some(log) = &self.cfg.change_log {
            log.durable(seq);
        }
    }

    /// One round: commit (or just flush the data) and record the outcome.
    fn round(&self, flush_data: &dyn Fn() -> std::io::Result<()>) -> Result<()> {
        let seq = self.change_seq.load(Ordering::SeqCst);
        // Every cut counted here finished its metadata change before this load, so the
        // commit below (or the clean state found) includes it.
        let cut = self.cut_seq.load(Ordering::SeqCst);
        if !matches!(self.mode(), PoolMode::Write | PoolMode::OutOfDataSpace) {
            // No commit can succeed; flushes of unchanged thins still flush the data.
            flush_data().map_err(PoolError::DataIo)?;
            return Err(PoolError::ReadOnly("the pool is read-only".into()));
        }
        if !self.meta.has_uncommitted_changes() {
            flush_data().map_err(PoolError::DataIo)?;
            self.note_durable(seq);
            self.cut_durable.fetch_max(cut, Ordering::SeqCst);
            return Ok(());
        }
        let free_before = self.meta.status().nr_free_data_blocks;
        let t0 = Instant::now();
        match self.meta.commit_with_barrier(flush_data) {
            Ok(()) => {
                self.counters.record_commit(t0.elapsed());
                self.note_durable(seq);
                self.cut_durable.fetch_max(cut, Ordering::SeqCst);
                // Blocks freed in the committed transaction can be allocated now.
                if free_before > 0 || self.space.has_waiters() {
                    self.space_changed();
                }
                Ok(())
            }
            Err(e) => {
                bump(&self.counters.commit_failures);
                let why = format!("commit failed: {e}");
                self.latch_read_only(why.clone());
                Err(PoolError::ReadOnly(why))
            }
        }
    }

    /// The commit at close: everything acknowledged becomes durable.
    pub fn final_commit(&self) -> Result<()> {
        if !matches!(self.mode(), PoolMode::Write | PoolMode::OutOfDataSpace) {
            return Ok(());
        }
        // The committer's last round flushed the data and committed; only changes made after
        // it (none, once the worker has stopped first) are left. They carry no data writes.
        self.meta.commit().map_err(|e| {
            let why = format!("final commit failed: {e}");
            self.latch_read_only(why.clone());
            PoolError::ReadOnly(why)
        })
    }
}

/// The committer thread's body.
pub(crate) fn run<B: DataDevice>(shared: &Shared, make_device: &dyn DeviceFactory<B>) {
    let dev = match make_device() {
        Ok(d) => Some(d),
        Err(e) => {
            shared.set_mode(
                PoolMode::ReadOnly,
                format!("cannot open the data device for commits: {e}"),
            );
            None
        }
    };
    let flush_data = || match &dev {
        Some(d) => rt::block_on(d.flush()),
        None => Err(std::io::Error::other("no data device for commits")),
    };
    let mut next_periodic = Instant::now() + shared.cfg.commit_interval;
    loop {
        let target = {
            let mut st = shared.commit.lock();
            loop {
                if st.stop {
                    // The last round serves every flush still waiting and commits the rest.
                    let target = st.requested;
                    drop(st);
                    let ok = shared.round(&flush_data).is_ok();
                    let mut st = shared.commit.lock();
                    st.completed = st.completed.max(target);
                    if ok {
                        st.ok_through = st.ok_through.max(target);
                    }
                    drop(st);
                    shared.commit_done.notify_all();
                    return;
                }
                if st.requested > st.completed {
                    break Some(st.requested);
                }
                let now = Instant::now();
                if now >= next_periodic {
                    next_periodic = now + shared.cfg.commit_interval;
                    if shared.meta.has_uncommitted_changes() {
                        break None;
                    }
                }
                let mut wait = next_periodic.saturating_duration_since(now);
                if shared.space.has_waiters() {
                    wait = wait.min(SPACE_TICK);
                    // Queued writes check their deadlines on each wake-up.
                    shared.space.notify_all();
                }
                shared.commit_cv.wait_for(&mut st, wait);
            }
        };
        let ok = shared.round(&flush_data).is_ok();
        if target.is_none() {
            continue;
        }
        let mut st = shared.commit.lock();
        let target = target.unwrap_or(st.completed);
        st.completed = st.completed.max(target);
        if ok {
            st.ok_through = st.ok_through.max(target);
        }
        drop(st);
        next_periodic = Instant::now() + shared.cfg.commit_interval;
        shared.commit_done.notify_all();
    }
}
