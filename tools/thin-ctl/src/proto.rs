//! The daemon's control protocol: one JSON object per line each way, on a root-only Unix
//! socket. A request names a command; the response is `{"ok":true,"result":..}` or
//! `{"ok":false,"error":".."}`.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A command for a pool.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    Ping,
    Status,
    List,
    Create {
        thin: String,
        size: u64,
    },
    Snapshot {
        origin: String,
        snap: String,
    },
    Delete {
        thin: String,
    },
    Resize {
        thin: String,
        size: u64,
    },
    Grow {
        data_size: Option<u64>,
        metadata_size: Option<u64>,
    },
    Trim,
    SetTransactionId {
        current: u64,
        new: u64,
    },
    Expose {
        thin: String,
        queues: u16,
        depth: u16,
        id: Option<u32>,
        io_buf: u32,
    },
    Unexpose {
        thin: String,
    },
    Export {
        thin: String,
        /// `unix:PATH` or `tcp:HOST:PORT`.
        nbd: String,
        allow_remote: bool,
    },
    Unexport {
        thin: String,
    },
    Stop,
}

/// The answer to one request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub result: Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Response {
    pub fn from_result(r: anyhow::Result<Value>) -> Response {
        match r {
            Ok(result) => Response {
                ok: true,
                result,
                error: None,
            },
            Err(e) => Response {
                ok: false,
                result: Value::Null,
                error: Some(format!("{e:#}")),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_as_tagged_json() {
        let r = Request::Expose {
            thin: "a".into(),
            queues: 2,
            depth: 64,
            id: None,
            io_buf: 1 << 19,
        };
        let s = serde_json::to_string(&r).unwrap();
        assert!(s.starts_with(r#"{"cmd":"expose""#), "{s}");
        assert_eq!(serde_json::from_str::<Request>(&s).unwrap(), r);
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"format_everything"}"#).is_err());
    }
}
