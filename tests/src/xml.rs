//! thin_dump's XML as thin-provisioning-tools 0.9 writes and thin_restore reads it: a
//! line-based reader (thin_dump writes one element a line) and a writer.
//!
//! Only what the metadata holds is modelled: the superblock's attributes, each device's
//! details, and its mappings with range mappings expanded.

use crate::model::{Mapping, State, Thin};
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::sync::Arc;
use thin_metadata::DeviceDetails;

/// The `<superblock>` element's attributes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Superblock {
    pub uuid: String,
    pub time: u32,
    pub transaction: u64,
    pub flags: u32,
    pub version: u32,
    pub data_block_size: u32,
    pub nr_data_blocks: u64,
}

/// One `<device>` with its mappings: virtual block -> (data block, time).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Device {
    pub mapped_blocks: u64,
    pub transaction: u64,
    pub creation_time: u32,
    pub snap_time: u32,
    pub mappings: BTreeMap<u64, (u64, u32)>,
}

/// A whole dump.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dump {
    pub superblock: Superblock,
    pub devices: BTreeMap<u32, Device>,
}

/// The `name="value"` attributes of one element.
fn attrs(line: &str) -> Result<HashMap<&str, &str>, String> {
    let mut out = HashMap::new();
    let mut rest = line;
    while let Some(eq) = rest.find("=\"") {
        let name = rest[..eq].rsplit(' ').next().unwrap_or("").trim();
        let after = &rest[eq + 2..];
        let end = after
            .find('"')
            .ok_or_else(|| format!("unterminated attribute in {line:?}"))?;
        out.insert(name, &after[..end]);
        rest = &after[end + 1..];
    }
    Ok(out)
}

fn get<T: std::str::FromStr>(a: &HashMap<&str, &str>, name: &str, line: &str) -> Result<T, String> {
    let v = a
        .get(name)
        .ok_or_else(|| format!("no attribute {name} in {line:?}"))?;
    v.parse()
        .map_err(|_| format!("attribute {name}={v:?} is not a number in {line:?}"))
}

/// Parses thin_dump's output.
pub fn parse(xml: &str) -> Result<Dump, String> {
    let mut sb = None;
    let mut devices = BTreeMap::new();
    let mut cur: Option<(u32, Device)> = None;
    for line in xml.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let a = attrs(line)?;
        if line.starts_with("<superblock") {
            sb = Some(Superblock {
                uuid: a.get("uuid").unwrap_or(&"").to_string(),
                time: get(&a, "time", line)?,
                transaction: get(&a, "transaction", line)?,
                flags: get(&a, "flags", line)?,
                version: get(&a, "version", line)?,
                data_block_size: get(&a, "data_block_size", line)?,
                nr_data_blocks: get(&a, "nr_data_blocks", line)?,
            });
        } else if line.starts_with("<device") {
            let dev = Device {
                mapped_blocks: get(&a, "mapped_blocks", line)?,
                transaction: get(&a, "transaction", line)?,
                creation_time: get(&a, "creation_time", line)?,
                snap_time: get(&a, "snap_time", line)?,
                mappings: BTreeMap::new(),
            };
            cur = Some((get(&a, "dev_id", line)?, dev));
        } else if line.starts_with("<single_mapping") || line.starts_with("<range_mapping") {
            let (_, dev) = cur
                .as_mut()
                .ok_or_else(|| format!("mapping outside a device: {line:?}"))?;
            let time: u32 = get(&a, "time", line)?;
            let (v, d, len): (u64, u64, u64) = if line.starts_with("<single") {
                (
                    get(&a, "origin_block", line)?,
                    get(&a, "data_block", line)?,
                    1,
                )
            } else {
                (
                    get(&a, "origin_begin", line)?,
                    get(&a, "data_begin", line)?,
                    get::<u64>(&a, "length", line)?,
                )
            };
            for i in 0..len {
                if dev.mappings.insert(v + i, (d + i, time)).is_some() {
                    return Err(format!("virtual block {} mapped twice", v + i));
                }
            }
        } else if line.starts_with("</device") {
            let (id, dev) = cur
                .take()
                .ok_or_else(|| "</device> without <device>".to_string())?;
            if devices.insert(id, dev).is_some() {
                return Err(format!("device {id} listed twice"));
            }
        } else if !line.starts_with("</superblock") {
            return Err(format!("unexpected line {line:?}"));
        }
    }
    let superblock = sb.ok_or("no <superblock> element")?;
    if cur.is_some() {
        return Err("unterminated <device>".into());
    }
    Ok(Dump {
        superblock,
        devices,
    })
}

/// Writes XML thin_restore reads, with runs of consecutive blocks as range mappings.
pub fn write(d: &Dump) -> String {
    let s = &d.superblock;
    let mut out = format!(
        "<superblock uuid=\"{}\" time=\"{}\" transaction=\"{}\" flags=\"{}\" version=\"{}\" \
         data_block_size=\"{}\" nr_data_blocks=\"{}\">\n",
        s.uuid, s.time, s.transaction, s.flags, s.version, s.data_block_size, s.nr_data_blocks
    );
    for (id, dev) in &d.devices {
        let _ = writeln!(
            out,
            "  <device dev_id=\"{id}\" mapped_blocks=\"{}\" transaction=\"{}\" \
             creation_time=\"{}\" snap_time=\"{}\">",
            dev.mapped_blocks, dev.transaction, dev.creation_time, dev.snap_time
        );
        let mut runs: Vec<(u64, u64, u32, u64)> = Vec::new();
        for (&v, &(b, t)) in &dev.mappings {
            match runs.last_mut() {
                Some((v0, b0, t0, len)) if *v0 + *len == v && *b0 + *len == b && *t0 == t => {
                    *len += 1
                }
                _ => runs.push((v, b, t, 1)),
            }
        }
        for (v, b, t, len) in runs {
            let _ = if len == 1 {
                writeln!(
                    out,
                    "    <single_mapping origin_block=\"{v}\" data_block=\"{b}\" time=\"{t}\"/>"
                )
            } else {
                writeln!(
                    out,
                    "    <range_mapping origin_begin=\"{v}\" data_begin=\"{b}\" length=\"{len}\" \
                     time=\"{t}\"/>"
                )
            };
        }
        out.push_str("  </device>\n");
    }
    out.push_str("</superblock>\n");
    out
}

impl Dump {
    /// The model state this dump describes (no held snapshot).
    pub fn to_state(&self) -> State {
        let thins = self
            .devices
            .iter()
            .map(|(&id, d)| {
                let map = d
                    .mappings
                    .iter()
                    .map(|(&v, &(b, t))| {
                        (
                            v,
                            Mapping {
                                data_block: b,
                                time: t,
                            },
                        )
                    })
                    .collect();
                let details = DeviceDetails {
                    mapped_blocks: d.mapped_blocks,
                    transaction_id: d.transaction,
                    creation_time: d.creation_time,
                    snapshotted_time: d.snap_time,
                };
                (
                    id,
                    Thin {
                        map: Arc::new(map),
                        details,
                    },
                )
            })
            .collect();
        State {
            thins,
            transaction_id: self.superblock.transaction,
            time: self.superblock.time,
            nr_data_blocks: self.superblock.nr_data_blocks,
            data_block_size_sectors: self.superblock.data_block_size,
            held: None,
        }
    }

    /// Compares the superblock figures and every device with the model's state.
    pub fn compare(&self, st: &State) -> Result<(), String> {
        let s = &self.superblock;
        let got = (
            s.time,
            s.transaction,
            s.data_block_size,
            s.nr_data_blocks,
            s.version,
        );
        let want = (
            st.time,
            st.transaction_id,
            st.data_block_size_sectors,
            st.nr_data_blocks,
            2,
        );
        if got != want {
            return Err(format!(
                "thin_dump superblock (time, transaction, data_block_size, nr_data_blocks, \
                 version) is {got:?}, model has {want:?}"
            ));
        }
        self.compare_devices(&st.thins)
    }

    /// Compares the devices (details and every mapping) with the model's thins.
    pub fn compare_devices(&self, thins: &BTreeMap<u32, Thin>) -> Result<(), String> {
        let ids: Vec<u32> = self.devices.keys().copied().collect();
        let want: Vec<u32> = thins.keys().copied().collect();
        if ids != want {
            return Err(format!(
                "thin_dump lists devices {ids:?}, model has {want:?}"
            ));
        }
        for (id, thin) in thins {
            let d = &self.devices[id];
            let details = DeviceDetails {
                mapped_blocks: d.mapped_blocks,
                transaction_id: d.transaction,
                creation_time: d.creation_time,
                snapshotted_time: d.snap_time,
            };
            if details != thin.details {
                return Err(format!(
                    "thin_dump device {id} details {details:?}, model has {:?}",
                    thin.details
                ));
            }
            let want = thin.map.iter().map(|(&v, m)| (v, (m.data_block, m.time)));
            if let Some((got, want)) = d
                .mappings
                .iter()
                .map(|(&v, &m)| Some((v, m)))
                .chain(std::iter::repeat(None))
                .zip(want.map(Some).chain(std::iter::repeat(None)))
                .take(d.mappings.len().max(thin.map.len()))
                .find(|(g, w)| g != w)
            {
                return Err(format!(
                    "thin_dump device {id}: mapping {got:?}, model has {want:?}"
                ));
            }
        }
        Ok(())
    }
}
