//! Shared helpers for the cross-crate tests in tests/tests.
//!
//! - `model`: the reference model and random workload of thin-metadata's own model test,
//!   included from there so that every test checks against one model;
//! - `oracle`: running thin-provisioning-tools (thin_check, thin_dump, thin_restore), and
//!   thin-metadata's own checker beside them;
//! - `scratch`: temporary directories;
//! - `seeds`: which seeds a randomized test runs, and how a failure says to replay it;
//! - `xml`: thin_dump's XML.

#[path = "../../crates/thin-metadata/tests/common/mod.rs"]
pub mod model;
pub mod oracle;
pub mod scratch;
pub mod seeds;
pub mod xml;
