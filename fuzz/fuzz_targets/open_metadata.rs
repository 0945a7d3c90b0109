//! `ThinMetadata::open` and read paths on a valid image damaged by the input: must never panic.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ublk_thin_fuzz::open_metadata(data));
