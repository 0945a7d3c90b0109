//! The data-device conformance suite, run against every engine: seeded random reads, writes,
//! vectored I/O, zeroes, copies, discards and flushes from concurrent workers, checked against
//! a byte model, plus the size/alignment errors every engine must give. Engines run under
//! tight limits so requests queue, and the limits are checked afterwards.

mod data_common;

use block_io::data::rt::{block_on, StandaloneRing};
use block_io::data::{DataDevice, Limits};
use data_common::{open_engine, run_model, seed, Engine};

const LIMITS: Limits = Limits {
    max_in_flight: 3,
    max_in_flight_bytes: 48 * 1024,
};

fn conformance(engine: Engine, default_seed: u64) {
    let seed = seed(default_seed);
    let (dev, _file) = open_engine(engine, LIMITS);
    block_on(run_model(&dev, seed, 6, 250));
    if let Some(stats) = dev.limiter_stats() {
        assert_eq!(
            stats.nr_in_flight, 0,
            "{engine:?}: permits leaked: {stats:?}"
        );
        assert_eq!(stats.nr_in_flight_bytes, 0, "{engine:?}: {stats:?}");
        assert!(
            stats.max_in_flight_seen <= LIMITS.max_in_flight,
            "{engine:?}: {stats:?}"
        );
        assert!(
            stats.max_in_flight_bytes_seen <= LIMITS.max_in_flight_bytes,
            "{engine:?}: {stats:?}"
        );
        // Inline sync I/O completes inside `poll`, so it never has two requests in flight.
        if engine != Engine::SyncInline {
            assert!(
                stats.nr_waited > 0,
                "{engine:?}: limits never reached: {stats:?}"
            );
        }
    }
    let ring = StandaloneRing::stats();
    assert_eq!(
        (ring.nr_in_flight, ring.nr_orphans),
        (0, 0),
        "{engine:?}: {ring:?}"
    );
    // The device still answers after the run.
    block_on(dev.flush()).unwrap();
}

#[test]
fn conformance_uring() {
    conformance(Engine::Uring, 1);
}

#[test]
fn conformance_uring_tiny_ring() {
    conformance(Engine::UringTinyRing, 2);
}

#[test]
fn conformance_sync_pool() {
    conformance(Engine::SyncPool, 3);
}

#[test]
fn conformance_sync_inline() {
    conformance(Engine::SyncInline, 4);
}

#[test]
fn conformance_forced_fallback() {
    conformance(Engine::ForcedFallback, 5);
}

#[test]
fn conformance_memory() {
    conformance(Engine::Memory, 6);
}

#[test]
fn conformance_faulty_without_faults() {
    conformance(Engine::Faulty, 7);
}
