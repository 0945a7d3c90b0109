//! Async block locks for the remap engine (issue 3; not yet written).
#![forbid(unsafe_code)]
