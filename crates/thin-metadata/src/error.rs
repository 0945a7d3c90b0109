//! The one error type of the metadata crate.

use std::io;

/// Which space ran out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Space {
    /// Pool data blocks.
    Data,
    /// 4 KiB metadata blocks.
    Metadata,
}

impl std::fmt::Display for Space {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Space::Data => "data",
            Space::Metadata => "metadata",
        })
    }
}

/// Errors of the metadata crate. Corruption, I/O, lack of space and the read-only latch stay
/// distinct so the pool can react to each differently.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A metadata block failed validation: `block` is where, `path` the blocks from the root
    /// that led there (empty when unknown), `reason` what was wrong.
    #[error("metadata block {block} is corrupt{}: {reason}", path_suffix(path))]
    Corrupt {
        block: u64,
        path: Vec<u64>,
        reason: String,
    },

    /// The metadata device failed.
    #[error("metadata {op} of block {block} failed: {source}")]
    Io {
        op: &'static str,
        block: u64,
        #[source]
        source: io::Error,
    },

    /// No free block is left in the given space.
    #[error("no free {0} blocks left")]
    NoSpace(Space),

    /// A metadata write failed earlier; the metadata refuses changes until it is reopened.
    #[error("metadata is read-only after an earlier write failure")]
    ReadOnly,

    /// The metadata was opened read-only or has the needs_check flag set.
    #[error("metadata needs checking (needs_check flag is set): run thin-ctl check")]
    NeedsCheck,

    /// A thin with this id exists already.
    #[error("thin {0} exists already")]
    ThinExists(u32),

    /// No thin with this id exists.
    #[error("thin {0} does not exist")]
    UnknownThin(u32),

    /// `set_transaction_id` was called with a stale current id.
    #[error("transaction id mismatch: expected {expected}, metadata has {actual}")]
    TransactionIdMismatch { expected: u64, actual: u64 },

    /// An argument is out of range or otherwise unusable.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    /// The device holds no dm-thin metadata, or an unsupported version of it.
    #[error("not dm-thin metadata: {0}")]
    NotFormatted(String),

    /// thin_dump XML that cannot be restored: malformed, or describing metadata that cannot
    /// exist. `line` (1-based) is where the problem was found.
    #[error("XML line {line}: {reason}")]
    Xml { line: u64, reason: String },

    /// Reading XML input or writing XML output failed (`op` says which).
    #[error("{op} failed: {source}")]
    Stream {
        op: &'static str,
        #[source]
        source: io::Error,
    },
}

fn path_suffix(path: &[u64]) -> String {
    if path.is_empty() {
        String::new()
    } else {
        let p: Vec<String> = path.iter().map(u64::to_string).collect();
        format!(" (path {})", p.join(" -> "))
    }
}

/// Result of the metadata crate.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn corrupt(block: u64, reason: impl Into<String>) -> Self {
        Error::Corrupt {
            block,
            path: Vec::new(),
            reason: reason.into(),
        }
    }

    /// True for errors that mean the on-disk metadata is damaged.
    pub fn is_corrupt(&self) -> bool {
        matches!(self, Error::Corrupt { .. } | Error::NotFormatted(_))
    }
}
