//! The offline checker on a valid image damaged by the input: must never panic, and what it
//! calls clean must open.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ublk_thin_fuzz::check_metadata(data));
