//! Every block decoder of `thin_metadata::format` on arbitrary bytes: must never panic.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ublk_thin_fuzz::decode_blocks(data));
