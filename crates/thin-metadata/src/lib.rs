//! dm-thin v2 metadata.
#![forbid(unsafe_code)]
