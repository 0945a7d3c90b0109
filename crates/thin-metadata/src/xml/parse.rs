//! Reading thin_dump XML into a validated description of the metadata, before anything is
//! written.
//!
//! Two layers: `Lexer` turns bytes into start and end tags (skipping the XML declaration,
//! processing instructions, comments and whitespace; expanding entities in attribute
//! values), and `parse` checks the document's shape and every value as it goes.
//!
//! Invariants:
//! - every error names the line it was found on (1-based); an error at the end of the input
//!   names the last line;
//! - a `Document` that `parse` returns can be written as it is: every number is in range for
//!   its field, every mapping lies inside the data device, no device id and no virtual block
//!   of a device appears twice, and each device's runs are sorted by virtual block;
//! - input is read in fixed-size chunks, so memory grows with the mappings, never with the
//!   length of a line.

use super::ATTR_UUID_BYTES;
use crate::error::{Error, Result};
use crate::format::details::MAX_DATA_BLOCK;
use crate::format::SUPERBLOCK_VERSION;
use crate::types::MAX_THIN_ID;
use std::collections::HashMap;
use std::io::{BufRead, ErrorKind};
use std::ops::Range;

/// The largest mapping time a mapping value can hold (24 bits).
pub(crate) const MAX_MAPPING_TIME: u32 = (1 << 24) - 1;

/// Bytes read from the input at a time.
const CHUNK_BYTES: usize = 64 * 1024;

/// Longest element or attribute name accepted; thin_dump's longest is 15 bytes.
const MAX_NAME_BYTES: usize = 64;

/// Longest attribute value accepted (a number has at most 20 digits; the uuid is short).
const MAX_VALUE_BYTES: usize = 4096;

/// The `<superblock>` attributes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SuperblockAttrs {
    pub uuid: [u8; 16],
    pub time: u32,
    pub transaction: u64,
    pub flags: u32,
    pub version: u32,
    pub data_block_size: u32,
    pub nr_data_blocks: u64,
}

/// `len` consecutive virtual blocks from `origin` mapped to consecutive data blocks from
/// `data`, all with the same time. `line` is where the XML listed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Run {
    pub origin: u64,
    pub data: u64,
    pub len: u64,
    pub time: u32,
    pub line: u64,
}

/// One `<device>` and its mappings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DeviceEntry {
    pub id: u32,
    pub line: u64,
    /// `mapped_blocks` as the XML states it (the restore writes the real count).
    pub stated_mapped_blocks: u64,
    pub transaction: u64,
    pub creation_time: u32,
    pub snap_time: u32,
    /// Sorted by `origin`, not overlapping, none empty.
    pub runs: Vec<Run>,
    /// Blocks the runs map.
    pub nr_mapped: u64,
}

/// A whole validated dump. Devices are sorted by id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Document {
    pub superblock: SuperblockAttrs,
    pub devices: Vec<DeviceEntry>,
}

/// One tag as the lexer saw it; its buffers are reused from tag to tag.
#[derive(Debug, Default)]
struct Tag {
    end: bool,
    /// `<name .../>`: opens and closes at once.
    empty: bool,
    line: u64,
    name: Vec<u8>,
    /// Attribute names and (entity-expanded) values, as ranges of `text`.
    attrs: Vec<(Range<usize>, Range<usize>)>,
    text: Vec<u8>,
}

impl Tag {
    fn name(&self) -> String {
        String::from_utf8_lossy(&self.name).into_owned()
    }

    fn attr(&self, name: &str) -> Option<&[u8]> {
        self.attrs
            .iter()
            .find(|(n, _)| self.text.get(n.clone()) == Some(name.as_bytes()))
            .and_then(|(_, v)| self.text.get(v.clone()))
    }

    fn err(&self, reason: impl Into<String>) -> Error {
        Error::Xml {
            line: self.line,
            reason: reason.into(),
        }
    }

    fn required(&self, name: &str) -> Result<&[u8]> {
        self.attr(name).ok_or_else(|| {
            self.err(format!(
                "<{}> has no {name} attribute (thin_dump always writes it)",
                self.name()
            ))
        })
    }

    fn u64_attr(&self, name: &str) -> Result<u64> {
        let v = self.required(name)?;
        parse_decimal(v).ok_or_else(|| {
            self.err(format!(
                "<{}> attribute {name}=\"{}\" is not a decimal number from 0 to {}",
                self.name(),
                String::from_utf8_lossy(v),
                u64::MAX
            ))
        })
    }

    /// A number that must not exceed `max`.
    fn bounded_attr(&self, name: &str, max: u64) -> Result<u64> {
        let v = self.u64_attr(name)?;
        if v > max {
            return Err(self.err(format!(
                "<{}> attribute {name}=\"{v}\" is out of range (at most {max})",
                self.name()
            )));
        }
        Ok(v)
    }

    fn u32_attr(&self, name: &str) -> Result<u32> {
        self.bounded_attr(name, u64::from(u32::MAX))
            .map(|v| v as u32)
    }
}

/// Digits only, no sign, no spaces, no overflow.
fn parse_decimal(v: &[u8]) -> Option<u64> {
    if v.is_empty() {
        return None;
    }
    v.iter().try_fold(0u64, |acc, &c| {
        let d = c.checked_sub(b'0').filter(|d| *d < 10)?;
        acc.checked_mul(10)?.checked_add(u64::from(d))
    })
}

/// Bytes to tags.
struct Lexer<'a> {
    input: &'a mut dyn BufRead,
    buf: Vec<u8>,
    pos: usize,
    eof: bool,
    line: u64,
}

fn is_space(c: u8) -> bool {
    matches!(c, b' ' | b'\t' | b'\r' | b'\n')
}

fn is_name_byte(c: u8) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, b'_' | b'-' | b'.' | b':')
}

impl<'a> Lexer<'a> {
    fn new(input: &'a mut dyn BufRead) -> Self {
        Lexer {
            input,
            buf: Vec::with_capacity(CHUNK_BYTES),
            pos: 0,
            eof: false,
            line: 1,
        }
    }

    fn err(&self, reason: impl Into<String>) -> Error {
        Error::Xml {
            line: self.line,
            reason: reason.into(),
        }
    }

    fn peek(&mut self) -> Result<Option<u8>> {
        if self.pos == self.buf.len() && !self.eof {
            self.refill()?;
        }
        Ok(self.buf.get(self.pos).copied())
    }

    fn refill(&mut self) -> Result<()> {
        self.buf.clear();
        self.pos = 0;
        loop {
            match self.input.fill_buf() {
                Ok(avail) => {
                    let n = avail.len().min(CHUNK_BYTES);
                    self.buf.extend_from_slice(avail.get(..n).unwrap_or(&[]));
                    self.input.consume(n);
                    self.eof = n == 0;
                    return Ok(());
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(source) => {
                    return Err(Error::Stream {
                        op: "reading the XML input",
                        source,
                    })
                }
            }
        }
    }

    fn next(&mut self) -> Result<Option<u8>> {
        let c = self.peek()?;
        if let Some(c) = c {
            self.pos += 1;
            if c == b'\n' {
                self.line += 1;
            }
        }
        Ok(c)
    }

    /// The next byte, which must exist.
    fn next_in(&mut self, what: &str) -> Result<u8> {
        self.next()?
            .ok_or_else(|| self.err(format!("the input ends inside {what}")))
    }

    fn skip_space(&mut self) -> Result<()> {
        while let Some(c) = self.peek()? {
            if !is_space(c) {
                break;
            }
            self.next()?;
        }
        Ok(())
    }

    /// Skips past `end` (a comment's `-->`, a processing instruction's `?>`; at most three
    /// bytes).
    fn skip_past(&mut self, end: &[u8], what: &str) -> Result<()> {
        let mut tail = [0u8; 3];
        let mut seen = 0;
        loop {
            let c = self.next_in(what)?;
            tail.rotate_left(1);
            tail[2] = c;
            seen += 1;
            if seen >= end.len() && tail.ends_with(end) {
                return Ok(());
            }
        }
    }

    fn name_into(&mut self, out: &mut Vec<u8>, what: &str) -> Result<()> {
        let start = out.len();
        while let Some(c) = self.peek()? {
            if !is_name_byte(c) {
                break;
            }
            if out.len() - start >= MAX_NAME_BYTES {
                return Err(self.err(format!("{what} is longer than {MAX_NAME_BYTES} bytes")));
            }
            out.push(c);
            self.next()?;
        }
        if out.len() == start {
            let reason = match self.peek()? {
                Some(c) => format!("expected {what}, found {:?}", char::from(c)),
                None => format!("the input ends where {what} was expected"),
            };
            return Err(self.err(reason));
        }
        Ok(())
    }

    /// Reads the next tag into `tag`; false at the end of the input. Text between tags
    /// must be whitespace.
    fn next_tag(&mut self, tag: &mut Tag) -> Result<bool> {
        loop {
            self.skip_space()?;
            let Some(c) = self.next()? else {
                return Ok(false);
            };
            if c != b'<' {
                return Err(self.err(format!(
                    "unexpected text starting with {:?} (only elements and whitespace may \
                     appear here)",
                    char::from(c)
                )));
            }
            let line = self.line;
            match self.peek()? {
                Some(b'?') => self.skip_past(b"?>", "a processing instruction")?,
                Some(b'!') => {
                    self.next()?;
                    if self.next()? == Some(b'-') && self.next()? == Some(b'-') {
                        self.skip_past(b"-->", "a comment")?;
                    } else {
                        return Err(Error::Xml {
                            line,
                            reason: "unsupported markup \"<!\" (only comments may appear; no \
                                     DOCTYPE or CDATA)"
                                .into(),
                        });
                    }
                }
                _ => {
                    self.tag_body(tag, line)?;
                    return Ok(true);
                }
            }
        }
    }

    /// The rest of a tag after its `<`.
    fn tag_body(&mut self, tag: &mut Tag, line: u64) -> Result<()> {
        tag.end = false;
        tag.empty = false;
        tag.line = line;
        tag.name.clear();
        tag.attrs.clear();
        tag.text.clear();
        if self.peek()? == Some(b'/') {
            self.next()?;
            tag.end = true;
            self.name_into(&mut tag.name, "an element name")?;
            self.skip_space()?;
            return match self.next_in("an end tag")? {
                b'>' => Ok(()),
                c => Err(self.err(format!(
                    "expected '>' to end </{}>, found {:?}",
                    tag.name(),
                    char::from(c)
                ))),
            };
        }
        self.name_into(&mut tag.name, "an element name")?;
        loop {
            let spaced = matches!(self.peek()?, Some(c) if is_space(c));
            self.skip_space()?;
            match self.peek()? {
                Some(b'>') => {
                    self.next()?;
                    return Ok(());
                }
                Some(b'/') => {
                    self.next()?;
                    return match self.next_in("a tag")? {
                        b'>' => {
                            tag.empty = true;
                            Ok(())
                        }
                        c => Err(self.err(format!(
                            "expected '>' after '/' in <{}>, found {:?}",
                            tag.name(),
                            char::from(c)
                        ))),
                    };
                }
                None => return Err(self.err(format!("the input ends inside <{}>", tag.name()))),
                Some(_) if !spaced => {
                    return Err(self.err(format!(
                        "attributes of <{}> must be separated by whitespace",
                        tag.name()
                    )))
                }
                Some(_) => self.attribute(tag)?,
            }
        }
    }

    fn attribute(&mut self, tag: &mut Tag) -> Result<()> {
        let n0 = tag.text.len();
        self.name_into(&mut tag.text, "an attribute name")?;
        let name = n0..tag.text.len();
        self.skip_space()?;
        let what = format!("<{}>", tag.name());
        if self.next_in(&what)? != b'=' {
            return Err(self.err(format!(
                "attribute {} of {what} has no '=' and value",
                String::from_utf8_lossy(tag.text.get(name.clone()).unwrap_or(&[]))
            )));
        }
        self.skip_space()?;
        let quote = self.next_in(&what)?;
        if quote != b'"' && quote != b'\'' {
            return Err(self.err(format!("attribute values of {what} must be quoted")));
        }
        let v0 = tag.text.len();
        loop {
            let c = self.next_in("an attribute value")?;
            match c {
                _ if c == quote => break,
                b'<' => return Err(self.err("'<' inside an attribute value")),
                b'&' => self.entity(&mut tag.text)?,
                // XML turns whitespace characters in attribute values into spaces.
                b'\t' | b'\r' | b'\n' => tag.text.push(b' '),
                _ => tag.text.push(c),
            }
            if tag.text.len() - v0 > MAX_VALUE_BYTES {
                return Err(self.err(format!(
                    "an attribute value of {what} is longer than {MAX_VALUE_BYTES} bytes"
                )));
            }
        }
        let value = v0..tag.text.len();
        let dup = tag
            .attrs
            .iter()
            .any(|(n, _)| tag.text.get(n.clone()) == tag.text.get(name.clone()));
        if dup {
            return Err(self.err(format!(
                "attribute {} appears twice in {what}",
                String::from_utf8_lossy(tag.text.get(name).unwrap_or(&[]))
            )));
        }
        tag.attrs.push((name, value));
        Ok(())
    }

    /// Expands an entity reference after its `&`.
    fn entity(&mut self, out: &mut Vec<u8>) -> Result<()> {
        let mut name = Vec::new();
        loop {
            let c = self.next_in("an entity reference")?;
            if c == b';' {
                break;
            }
            if name.len() >= 10 {
                return Err(self.err("malformed entity reference (missing ';')"));
            }
            name.push(c);
        }
        let code = match name.as_slice() {
            b"amp" => u32::from('&'),
            b"lt" => u32::from('<'),
            b"gt" => u32::from('>'),
            b"quot" => u32::from('"'),
            b"apos" => u32::from('\''),
            [b'#', b'x', hex @ ..] => std::str::from_utf8(hex)
                .ok()
                .and_then(|h| u32::from_str_radix(h, 16).ok())
                .ok_or_else(|| self.err("malformed character reference"))?,
            [b'#', dec @ ..] => std::str::from_utf8(dec)
                .ok()
                .and_then(|d| d.parse().ok())
                .ok_or_else(|| self.err("malformed character reference"))?,
            _ => {
                return Err(self.err(format!(
                    "unknown entity &{};",
                    String::from_utf8_lossy(&name)
                )))
            }
        };
        let c = char::from_u32(code)
            .filter(|&c| c != '\0')
            .ok_or_else(|| self.err(format!("character reference {code} is not a character")))?;
        let mut utf8 = [0u8; 4];
        out.extend_from_slice(c.encode_utf8(&mut utf8).as_bytes());
        Ok(())
    }
}

/// Where the parser is in the document.
enum Open {
    Nothing,
    Superblock,
    Device {
        entry: DeviceEntry,
    },
    Mapping {
        name: &'static str,
        line: u64,
        device: DeviceEntry,
    },
    Closed,
}

/// Reads and validates a whole thin_dump XML document.
pub(crate) fn parse(input: &mut dyn BufRead) -> Result<Document> {
    let mut lexer = Lexer::new(input);
    let mut tag = Tag::default();
    let mut sb: Option<SuperblockAttrs> = None;
    let mut devices: Vec<DeviceEntry> = Vec::new();
    let mut device_lines: HashMap<u32, u64> = HashMap::new();
    let mut open = Open::Nothing;
    let mut sb_line = 0;
    while lexer.next_tag(&mut tag)? {
        let name = tag.name.as_slice();
        open = match (open, tag.end, name) {
            (Open::Nothing, false, b"superblock") => {
                let attrs = superblock_attrs(&tag)?;
                sb = Some(attrs);
                sb_line = tag.line;
                if tag.empty {
                    Open::Closed
                } else {
                    Open::Superblock
                }
            }
            (Open::Superblock, true, b"superblock") => Open::Closed,
            (Open::Superblock, false, b"device") => {
                let entry = device_attrs(&tag)?;
                if let Some(first) = device_lines.insert(entry.id, tag.line) {
                    return Err(tag.err(format!(
                        "device {} is listed twice (first at line {first})",
                        entry.id
                    )));
                }
                if tag.empty {
                    devices.push(finish_device(entry)?);
                    Open::Superblock
                } else {
                    Open::Device { entry }
                }
            }
            (Open::Device { entry }, true, b"device") => {
                devices.push(finish_device(entry)?);
                Open::Superblock
            }
            (Open::Device { mut entry }, false, b"single_mapping" | b"range_mapping") => {
                let nr_data_blocks = sb.as_ref().map_or(0, |s| s.nr_data_blocks);
                let run = mapping_attrs(&tag, nr_data_blocks)?;
                if run.len > 0 {
                    entry.nr_mapped += run.len;
                    entry.runs.push(run);
                }
                if tag.empty {
                    Open::Device { entry }
                } else {
                    let name = if name == b"single_mapping" {
                        "single_mapping"
                    } else {
                        "range_mapping"
                    };
                    Open::Mapping {
                        name,
                        line: tag.line,
                        device: entry,
                    }
                }
            }
            (
                Open::Mapping {
                    name: m, device, ..
                },
                true,
                _,
            ) if name == m.as_bytes() => Open::Device { entry: device },
            (open, _, _) => return Err(misplaced(&open, &tag, sb_line)),
        };
    }
    let last = lexer.line;
    let at_end = |reason: String| Error::Xml { line: last, reason };
    match open {
        Open::Closed => {}
        Open::Nothing => {
            return Err(at_end(
                "no <superblock> element: this is not thin_dump XML".into(),
            ))
        }
        Open::Superblock => {
            return Err(at_end(format!(
                "the input ends before the </superblock> of line {sb_line}"
            )))
        }
        Open::Device { entry } => {
            return Err(at_end(format!(
                "the input ends inside <device> {} opened at line {}",
                entry.id, entry.line
            )))
        }
        Open::Mapping { name, line, .. } => {
            return Err(at_end(format!(
                "the input ends inside <{name}> opened at line {line}"
            )))
        }
    }
    let superblock = sb.ok_or_else(|| at_end("no <superblock> element".into()))?;
    devices.sort_unstable_by_key(|d| d.id);
    Ok(Document {
        superblock,
        devices,
    })
}

/// The error for a tag that does not belong where it is.
fn misplaced(open: &Open, tag: &Tag, sb_line: u64) -> Error {
    let name = tag.name();
    let known = matches!(
        name.as_str(),
        "superblock" | "device" | "single_mapping" | "range_mapping"
    );
    let reason = match open {
        _ if !known && !tag.end => format!(
            "unknown element <{name}> (thin_dump XML has superblock, device, single_mapping \
             and range_mapping)"
        ),
        Open::Closed if !tag.end => {
            format!("<{name}> after </superblock> (only one superblock is allowed)")
        }
        Open::Nothing if !tag.end => format!("<{name}> before <superblock>"),
        Open::Mapping { name: m, line, .. } => {
            format!(
                "<{m}> opened at line {line} must be empty, found {}",
                describe(tag)
            )
        }
        Open::Device { entry } if tag.end => format!(
            "{} closes <device> {} opened at line {}",
            describe(tag),
            entry.id,
            entry.line
        ),
        Open::Superblock if tag.end => format!(
            "{} inside <superblock> opened at line {sb_line}",
            describe(tag)
        ),
        Open::Device { .. } => format!("<{name}> inside <device> (only mappings may be there)"),
        Open::Superblock => format!("<{name}> inside <superblock> (only devices may be there)"),
        Open::Nothing | Open::Closed => format!("{} without a matching start tag", describe(tag)),
    };
    tag.err(reason)
}

fn describe(tag: &Tag) -> String {
    if tag.end {
        format!("</{}>", tag.name())
    } else {
        format!("<{}>", tag.name())
    }
}

fn superblock_attrs(tag: &Tag) -> Result<SuperblockAttrs> {
    let uuid_bytes = tag.required("uuid")?;
    if uuid_bytes.len() > ATTR_UUID_BYTES {
        return Err(tag.err(format!(
            "uuid=\"{}\" is longer than the superblock's {ATTR_UUID_BYTES} bytes",
            String::from_utf8_lossy(uuid_bytes)
        )));
    }
    let mut uuid = [0u8; 16];
    if let Some(dst) = uuid.get_mut(..uuid_bytes.len()) {
        dst.copy_from_slice(uuid_bytes);
    }
    // thin_restore 0.9 takes a missing flags as 0 and a missing version as 1.
    let flags = match tag.attr("flags") {
        Some(_) => tag.u32_attr("flags")?,
        None => 0,
    };
    let version = match tag.attr("version") {
        Some(_) => tag.u32_attr("version")?,
        None => 1,
    };
    if !(1..=SUPERBLOCK_VERSION).contains(&version) {
        return Err(tag.err(format!(
            "metadata version {version} is not supported (1 or {SUPERBLOCK_VERSION})"
        )));
    }
    let data_block_size = tag.u32_attr("data_block_size")?;
    if data_block_size == 0 {
        return Err(tag.err("data_block_size=\"0\": the data block size must not be zero"));
    }
    Ok(SuperblockAttrs {
        uuid,
        time: tag.u32_attr("time")?,
        transaction: tag.u64_attr("transaction")?,
        flags,
        version,
        data_block_size,
        nr_data_blocks: tag.bounded_attr("nr_data_blocks", MAX_DATA_BLOCK)?,
    })
}

fn device_attrs(tag: &Tag) -> Result<DeviceEntry> {
    Ok(DeviceEntry {
        id: tag.bounded_attr("dev_id", u64::from(MAX_THIN_ID))? as u32,
        line: tag.line,
        stated_mapped_blocks: tag.u64_attr("mapped_blocks")?,
        transaction: tag.u64_attr("transaction")?,
        creation_time: tag.u32_attr("creation_time")?,
        snap_time: tag.u32_attr("snap_time")?,
        runs: Vec::new(),
        nr_mapped: 0,
    })
}

fn mapping_attrs(tag: &Tag, nr_data_blocks: u64) -> Result<Run> {
    let (origin, data, len) = if tag.name == b"single_mapping" {
        (
            tag.u64_attr("origin_block")?,
            tag.u64_attr("data_block")?,
            1,
        )
    } else {
        (
            tag.u64_attr("origin_begin")?,
            tag.u64_attr("data_begin")?,
            tag.u64_attr("length")?,
        )
    };
    let time = tag.bounded_attr("time", u64::from(MAX_MAPPING_TIME))? as u32;
    if len > 0 && origin.checked_add(len - 1).is_none() {
        return Err(tag.err(format!(
            "virtual blocks {origin} + {len} run past the largest block number"
        )));
    }
    if len > 0 && data.checked_add(len).is_none_or(|end| end > nr_data_blocks) {
        let last = data.saturating_add(len - 1);
        return Err(tag.err(format!(
            "mapping to data block {last} is past the end of the data device \
             (nr_data_blocks=\"{nr_data_blocks}\")"
        )));
    }
    Ok(Run {
        origin,
        data,
        len,
        time,
        line: tag.line,
    })
}

/// Sorts a device's runs and rejects virtual blocks mapped twice.
fn finish_device(mut d: DeviceEntry) -> Result<DeviceEntry> {
    if !d.runs.is_sorted_by_key(|r| r.origin) {
        d.runs.sort_by_key(|r| r.origin);
    }
    for pair in d.runs.windows(2) {
        let [a, b] = pair else { continue };
        // `a.len >= 1` and `a.origin + a.len - 1` was checked not to overflow.
        if b.origin <= a.origin + (a.len - 1) {
            let (first, second) = (a.line.min(b.line), a.line.max(b.line));
            return Err(Error::Xml {
                line: second,
                reason: format!(
                    "virtual block {} of device {} is mapped twice (also at line {first})",
                    b.origin, d.id
                ),
            });
        }
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_str(s: &str) -> Result<Document> {
        parse(&mut s.as_bytes())
    }

    const SB: &str = r#"<superblock uuid="" time="3" transaction="7" flags="0" version="2" data_block_size="128" nr_data_blocks="100">"#;

    fn err_of(s: &str) -> (u64, String) {
        match parse_str(s) {
            Err(Error::Xml { line, reason }) => (line, reason),
            other => panic!("expected an XML error, got {other:?}"),
        }
    }

    #[test]
    fn thin_dump_layout_parses() {
        let xml = format!(
            "{SB}\n  <device dev_id=\"2\" mapped_blocks=\"4\" transaction=\"1\" \
             creation_time=\"2\" snap_time=\"3\">\n    <range_mapping origin_begin=\"0\" \
             data_begin=\"10\" length=\"3\" time=\"1\"/>\n    <single_mapping \
             origin_block=\"9\" data_block=\"10\" time=\"2\"/>\n  </device>\n  <device \
             dev_id=\"1\" mapped_blocks=\"0\" transaction=\"0\" creation_time=\"0\" \
             snap_time=\"0\">\n  </device>\n</superblock>\n"
        );
        let d = parse_str(&xml).expect("parses");
        assert_eq!(d.superblock.time, 3);
        assert_eq!(d.superblock.version, 2);
        assert_eq!(d.devices.iter().map(|d| d.id).collect::<Vec<_>>(), [1, 2]);
        let dev = &d.devices[1];
        assert_eq!((dev.nr_mapped, dev.stated_mapped_blocks), (4, 4));
        assert_eq!(
            dev.runs,
            [
                Run {
                    origin: 0,
                    data: 10,
                    len: 3,
                    time: 1,
                    line: 3
                },
                Run {
                    origin: 9,
                    data: 10,
                    len: 1,
                    time: 2,
                    line: 4
                },
            ]
        );
    }

    #[test]
    fn any_attribute_order_quotes_comments_and_whitespace() {
        let xml = "<?xml version=\"1.0\"?>\n<!-- a - comment --->\n<!---->\n<superblock \
                   nr_data_blocks = '100'\n data_block_size=\"128\" transaction=\"7\" \
                   time=\"3\" uuid=\"a&amp;b&#x21;\" extra=\"ignored\">\r\n<device \
                   snap_time=\"0\" creation_time=\"0\" transaction=\"0\" mapped_blocks=\"9\" \
                   dev_id=\"4\"><single_mapping time=\"0\" data_block=\"5\" \
                   origin_block=\"8\"></single_mapping><range_mapping length=\"0\" \
                   time=\"0\" data_begin=\"0\" origin_begin=\"0\" /></device></superblock>";
        let d = parse_str(xml).expect("parses");
        let sb = &d.superblock;
        assert_eq!(&sb.uuid[..4], b"a&b!");
        assert_eq!((sb.flags, sb.version), (0, 1), "thin_restore's defaults");
        let dev = &d.devices[0];
        assert_eq!((dev.id, dev.nr_mapped, dev.stated_mapped_blocks), (4, 1, 9));
        assert_eq!(dev.runs.len(), 1, "an empty range maps nothing");
    }

    #[test]
    fn unsorted_mappings_are_sorted() {
        let xml = format!(
            "{SB}<device dev_id=\"1\" mapped_blocks=\"2\" transaction=\"0\" creation_time=\"0\" \
             snap_time=\"0\"><single_mapping origin_block=\"9\" data_block=\"1\" time=\"0\"/>\
             <single_mapping origin_block=\"3\" data_block=\"2\" time=\"0\"/></device></superblock>"
        );
        let d = parse_str(&xml).expect("parses");
        let origins: Vec<u64> = d.devices[0].runs.iter().map(|r| r.origin).collect();
        assert_eq!(origins, [3, 9]);
    }

    /// A device line, then `body`, on lines 2.. of a document.
    fn doc(body: &str) -> String {
        format!(
            "{SB}\n<device dev_id=\"1\" mapped_blocks=\"0\" transaction=\"0\" \
             creation_time=\"0\" snap_time=\"0\">\n{body}\n</device>\n</superblock>\n"
        )
    }

    #[test]
    fn errors_name_the_line() {
        let cases: &[(String, u64, &str)] = &[
            (
                doc("<single_mapping origin_block=\"1\" data_block=\"100\" time=\"0\"/>"),
                3,
                "past the end of the data device",
            ),
            (
                doc("<range_mapping origin_begin=\"1\" data_begin=\"98\" length=\"3\" time=\"0\"/>"),
                3,
                "data block 100 is past the end",
            ),
            (
                doc("<range_mapping origin_begin=\"0\" data_begin=\"0\" length=\"5\" time=\"0\"/>\n\
                     <single_mapping origin_block=\"4\" data_block=\"50\" time=\"0\"/>"),
                4,
                "virtual block 4 of device 1 is mapped twice (also at line 3)",
            ),
            (
                doc("<single_mapping origin_block=\"x1\" data_block=\"1\" time=\"0\"/>"),
                3,
                "origin_block=\"x1\" is not a decimal number",
            ),
            (
                doc("<single_mapping origin_block=\"-1\" data_block=\"1\" time=\"0\"/>"),
                3,
                "is not a decimal number",
            ),
            (
                doc("<single_mapping origin_block=\"18446744073709551616\" data_block=\"1\" time=\"0\"/>"),
                3,
                "is not a decimal number",
            ),
            (
                doc("<single_mapping origin_block=\"1\" data_block=\"1\" time=\"16777216\"/>"),
                3,
                "time=\"16777216\" is out of range",
            ),
            (
                doc("<single_mapping origin_block=\"1\" data_block=\"1\"/>"),
                3,
                "has no time attribute",
            ),
            (doc("<foo/>"), 3, "unknown element <foo>"),
            (doc("hello"), 3, "unexpected text"),
            (doc("<single_mapping origin_block=\"1\" data_block=\"1\" time=\"0\" time=\"1\"/>"), 3, "appears twice"),
            (doc("<device dev_id=\"2\" mapped_blocks=\"0\" transaction=\"0\" creation_time=\"0\" snap_time=\"0\"/>"), 3, "<device> inside <device>"),
            (
                format!("{SB}\n<device dev_id=\"1\" mapped_blocks=\"0\" transaction=\"0\" creation_time=\"0\" snap_time=\"0\"/>\n\
                         <device dev_id=\"1\" mapped_blocks=\"0\" transaction=\"0\" creation_time=\"0\" snap_time=\"0\"/>\n</superblock>"),
                3,
                "device 1 is listed twice (first at line 2)",
            ),
            (
                format!("{SB}\n<device dev_id=\"16777216\" mapped_blocks=\"0\" transaction=\"0\" creation_time=\"0\" snap_time=\"0\"/>\n</superblock>"),
                2,
                "dev_id=\"16777216\" is out of range",
            ),
            (format!("{SB}\n</device>\n</superblock>"), 2, "</device> inside <superblock>"),
            (format!("{SB}\n</superblock>\n<superblock/>"), 3, "after </superblock>"),
            (format!("{SB}\n<device dev_id=\"1\""), 2, "the input ends inside <device>"),
            (format!("{SB}\n\n"), 3, "ends before the </superblock> of line 1"),
            ("\n\n".to_string(), 3, "no <superblock> element"),
            (
                "<superblock uuid=\"\" time=\"1\" transaction=\"1\" version=\"3\" data_block_size=\"128\" nr_data_blocks=\"1\"/>".to_string(),
                1,
                "version 3 is not supported",
            ),
            (
                "<superblock uuid=\"\" time=\"1\" transaction=\"1\" data_block_size=\"0\" nr_data_blocks=\"1\"/>".to_string(),
                1,
                "data block size must not be zero",
            ),
            (
                "<superblock uuid=\"01234567890123456\" time=\"1\" transaction=\"1\" data_block_size=\"8\" nr_data_blocks=\"1\"/>".to_string(),
                1,
                "longer than the superblock's 16 bytes",
            ),
            (format!("{SB}\n<!DOCTYPE x>"), 2, "unsupported markup"),
            (format!("{SB}\n<device a=\"&bogus;\"/>"), 2, "unknown entity &bogus;"),
            (format!("{SB}\n<device a=\"1\"b=\"2\"/>"), 2, "separated by whitespace"),
        ];
        for (xml, line, what) in cases {
            let (got_line, reason) = err_of(xml);
            assert!(
                reason.contains(what),
                "{xml}\nexpected {what:?} in the error, got {reason:?}"
            );
            assert_eq!(got_line, *line, "{xml}\nreason: {reason}");
        }
    }

    #[test]
    fn read_errors_are_stream_errors() {
        struct Failing;
        impl std::io::Read for Failing {
            fn read(&mut self, _: &mut [u8]) -> std::io::Result<usize> {
                Err(std::io::Error::other("disk on fire"))
            }
        }
        let mut input = std::io::BufReader::new(Failing);
        match parse(&mut input) {
            Err(Error::Stream { op, source }) => {
                assert_eq!(op, "reading the XML input");
                assert!(source.to_string().contains("disk on fire"));
            }
            other => panic!("expected a stream error, got {other:?}"),
        }
    }

    #[test]
    fn decimal_numbers_only() {
        assert_eq!(parse_decimal(b"0"), Some(0));
        assert_eq!(parse_decimal(b"18446744073709551615"), Some(u64::MAX));
        for bad in [
            &b""[..],
            b"18446744073709551616",
            b" 1",
            b"1 ",
            b"+1",
            b"0x10",
            b"1e3",
        ] {
            assert_eq!(
                parse_decimal(bad),
                None,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
