//! The fixed-newstyle handshake: greeting, client flags, then options until the client picks
//! the export (`NBD_OPT_GO` or `NBD_OPT_EXPORT_NAME`) or leaves.
//!
//! Options answered: `EXPORT_NAME`, `ABORT`, `LIST`, `INFO` and `GO` (export size and flags,
//! block size constraints always, name and description when asked). Everything else,
//! structured replies, metadata contexts and TLS included, gets `NBD_REP_ERR_UNSUP`, so
//! clients fall back to simple replies. A stopping export answers `NBD_REP_ERR_SHUTDOWN`.
//!
//! Invariants: option data is read in full before it is answered, so the stream stays in
//! step; a client that breaks a MUST of the spec (unknown client flags, a wrong option magic,
//! an export name it cannot have after `EXPORT_NAME`) is disconnected, everything else gets
//! an error reply; option data and the number of options are bounded.

use crate::proto::{self, InfoRequest, OptionHeader, OPTION_HEADER_BYTES};
use crate::request::Shape;
use crate::socket::{Reader, Socket};
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};

/// Largest option data read into memory; larger options are skipped and refused.
const MAX_OPTION_BYTES: u32 = 64 << 10;
/// Options one connection may send before it is considered a denial of service.
const MAX_OPTIONS: usize = 1024;

/// What the handshake needs to know about the export.
#[derive(Debug)]
pub(crate) struct Offer<'a> {
    pub name: &'a str,
    pub description: &'a str,
    pub shape: Shape,
    pub stopping: &'a AtomicBool,
}

impl Offer<'_> {
    fn knows(&self, name: &str) -> bool {
        name.is_empty() || name == self.name
    }
}

/// Runs the handshake; true when the transmission phase begins.
pub(crate) async fn negotiate(
    sock: &Socket,
    reader: &mut Reader,
    offer: &Offer<'_>,
) -> io::Result<bool> {
    sock.write_all(&proto::greeting()).await?;
    let mut flags = [0u8; 4];
    reader.read_exact(sock, &mut flags).await?;
    let flags = proto::client_flags(flags);
    if flags & !(proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES) != 0 {
        tracing::debug!("NBD client sent unknown client flags {flags:#x}: disconnecting");
        return Ok(false);
    }
    let no_zeroes = flags & proto::FLAG_C_NO_ZEROES != 0;
    for _ in 0..MAX_OPTIONS {
        let mut hdr = [0u8; OPTION_HEADER_BYTES];
        reader.read_exact(sock, &mut hdr).await?;
        let hdr = OptionHeader::decode(&hdr);
        if hdr.magic != proto::IHAVEOPT {
            tracing::debug!(
                "NBD client sent option magic {:#x}: disconnecting",
                hdr.magic
            );
            return Ok(false);
        }
        let reply = |r: u32, payload: &[u8]| proto::option_reply(hdr.option, r, payload);
        if hdr.len > MAX_OPTION_BYTES {
            if hdr.option == proto::OPT_EXPORT_NAME {
                // It cannot be answered with an error; the name is too long to be ours.
                return Ok(false);
            }
            reader.skip(sock, u64::from(hdr.len)).await?;
            sock.write_all(&reply(proto::REP_ERR_TOO_BIG, b"option data too large"))
                .await?;
            continue;
        }
        let mut data = vec![0u8; hdr.len as usize];
        reader.read_exact(sock, &mut data).await?;
        if offer.stopping.load(Ordering::Relaxed) && hdr.option != proto::OPT_ABORT {
            if hdr.option == proto::OPT_EXPORT_NAME {
                return Ok(false);
            }
            sock.write_all(&reply(proto::REP_ERR_SHUTDOWN, b"the export is stopping"))
                .await?;
            continue;
        }
        let shape = &offer.shape;
        match hdr.option {
            proto::OPT_EXPORT_NAME => {
                let known = std::str::from_utf8(&data).is_ok_and(|n| offer.knows(n));
                if !known {
                    return Ok(false);
                }
                let r = proto::export_name_reply(shape.size_bytes, shape.flags(), no_zeroes);
                sock.write_all(&r).await?;
                return Ok(true);
            }
            proto::OPT_ABORT => {
                // The client closes next; it may not wait for the reply.
                let _ = sock.write_all(&reply(proto::REP_ACK, &[])).await;
                return Ok(false);
            }
            proto::OPT_LIST => {
                let mut out;
                if data.is_empty() {
                    out = reply(proto::REP_SERVER, &proto::rep_server(offer.name));
                    out.extend(reply(proto::REP_ACK, &[]));
                } else {
                    out = reply(proto::REP_ERR_INVALID, b"NBD_OPT_LIST takes no data");
                }
                sock.write_all(&out).await?;
            }
            proto::OPT_INFO | proto::OPT_GO => {
                let Some(req) = InfoRequest::decode(&data) else {
                    sock.write_all(&reply(proto::REP_ERR_INVALID, b"malformed info request"))
                        .await?;
                    continue;
                };
                if !offer.knows(&req.name) {
                    sock.write_all(&reply(proto::REP_ERR_UNKNOWN, b"no such export"))
                        .await?;
                    continue;
                }
                let mut out = reply(
                    proto::REP_INFO,
                    &proto::info_export(shape.size_bytes, shape.flags()),
                );
                out.extend(reply(
                    proto::REP_INFO,
                    &proto::info_block_size(
                        shape.min_block,
                        shape.preferred_block(),
                        shape.max_payload,
                    ),
                ));
                if req.infos.contains(&proto::INFO_NAME) {
                    let name = proto::info_string(proto::INFO_NAME, offer.name);
                    out.extend(reply(proto::REP_INFO, &name));
                }
                if req.infos.contains(&proto::INFO_DESCRIPTION) {
                    let d = proto::info_string(proto::INFO_DESCRIPTION, offer.description);
                    out.extend(reply(proto::REP_INFO, &d));
                }
                out.extend(reply(proto::REP_ACK, &[]));
                sock.write_all(&out).await?;
                if hdr.option == proto::OPT_GO {
                    return Ok(true);
                }
            }
            _ => {
                sock.write_all(&reply(proto::REP_ERR_UNSUP, b"option not supported"))
                    .await?;
            }
        }
    }
    tracing::debug!("NBD client sent {MAX_OPTIONS} options without choosing: disconnecting");
    Ok(false)
}
