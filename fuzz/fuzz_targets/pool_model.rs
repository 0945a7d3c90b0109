//! The whole pool against its byte-level model (`thin_pool::model`), driven by the input:
//! any mismatch, EIO or unexpected error panics.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ublk_thin_fuzz::pool_model(data));
