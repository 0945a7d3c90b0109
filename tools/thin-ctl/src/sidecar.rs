//! The sidecar: what thin-ctl knows about a pool that dm-thin's metadata does not hold (its
//! paths and options, thin names and sizes, exposed devices), in `STATE_DIR/NAME.json`.
//!
//! It is replaced atomically (write a temporary file, fsync, rename, fsync the directory), so
//! a crash leaves the old or the new one. Only the holder of the pool's lock writes it. Losing
//! it loses no data: `pool import` rebuilds it from the metadata.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

/// The sidecar's format version.
const VERSION: u32 = 1;

/// Options the pool runs with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolOptions {
    pub low_water_mark_blocks: u64,
    pub reserve_blocks: u64,
    pub error_if_no_space: bool,
    pub no_space_timeout_secs: u64,
    pub discard_passdown: bool,
    /// `write` or `primitive`.
    pub zeroing: String,
}

impl Default for PoolOptions {
    fn default() -> Self {
        Self {
            low_water_mark_blocks: 0,
            reserve_blocks: 64,
            error_if_no_space: false,
            no_space_timeout_secs: 60,
            discard_passdown: true,
            zeroing: "write".into(),
        }
    }
}

/// A device serving a thin.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Exposure {
    pub dev_id: u32,
    pub queues: u16,
    pub depth: u16,
    pub io_buf_bytes: u32,
}

/// One thin.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ThinEntry {
    pub id: u32,
    /// Bytes; 0 for a thin imported without a size (it cannot be exposed until resized).
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exposed: Option<Exposure>,
}

/// A pool's sidecar.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sidecar {
    pub version: u32,
    pub name: String,
    pub metadata: PathBuf,
    pub data: PathBuf,
    pub block_size: u64,
    #[serde(default)]
    pub options: PoolOptions,
    /// By name.
    #[serde(default)]
    pub thins: BTreeMap<String, ThinEntry>,
}

/// Pool and thin names: what can safely be a file name and a JSON key.
pub fn check_name(kind: &str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.+".contains(&b))
        && !name.starts_with('.');
    if !ok {
        bail!(
            "{kind} name {name:?}: use 1 to 64 letters, digits and - _ . + (not starting with .)"
        );
    }
    Ok(())
}

impl Sidecar {
    pub fn new(name: &str, metadata: PathBuf, data: PathBuf, block_size: u64) -> Sidecar {
        Sidecar {
            version: VERSION,
            name: name.to_string(),
            metadata,
            data,
            block_size,
            options: PoolOptions::default(),
            thins: BTreeMap::new(),
        }
    }

    /// Where pool `name`'s sidecar lives.
    pub fn path(state_dir: &Path, name: &str) -> PathBuf {
        state_dir.join(format!("{name}.json"))
    }

    pub fn load(state_dir: &Path, name: &str) -> Result<Sidecar> {
        check_name("pool", name)?;
        let path = Self::path(state_dir, name);
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
                "no pool named {name:?} (no {}); create one with `thin-ctl pool create` or adopt \
                 existing metadata with `thin-ctl pool import`",
                path.display()
            ),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        let s: Sidecar = serde_json::from_str(&text).with_context(|| {
            format!(
                "{} is damaged; `thin-ctl pool import` rebuilds it from the metadata",
                path.display()
            )
        })?;
        if s.version != VERSION {
            bail!(
                "{}: sidecar version {} (this thin-ctl reads {VERSION})",
                path.display(),
                s.version
            );
        }
        if s.name != name {
            bail!("{} names pool {:?}", path.display(), s.name);
        }
        Ok(s)
    }

    /// Writes the sidecar atomically.
    pub fn save(&self, state_dir: &Path) -> Result<()> {
        fs::create_dir_all(state_dir)
            .with_context(|| format!("creating {}", state_dir.display()))?;
        let path = Self::path(state_dir, &self.name);
        let tmp = state_dir.join(format!(".{}.json.tmp", self.name));
        let text = serde_json::to_string_pretty(self)? + "\n";
        let write = || -> std::io::Result<()> {
            let mut f = File::create(&tmp)?;
            f.write_all(text.as_bytes())?;
            f.sync_all()?;
            fs::rename(&tmp, &path)?;
            File::open(state_dir)?.sync_all()
        };
        write().with_context(|| format!("writing {}", path.display()))
    }

    /// Every pool in `state_dir`.
    pub fn list(state_dir: &Path) -> Result<Vec<String>> {
        let mut names = Vec::new();
        let entries = match fs::read_dir(state_dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(names),
            Err(e) => return Err(e).with_context(|| format!("reading {}", state_dir.display())),
        };
        for e in entries {
            let name = e?.file_name().to_string_lossy().into_owned();
            if let Some(stem) = name.strip_suffix(".json") {
                if !stem.starts_with('.') {
                    names.push(stem.to_string());
                }
            }
        }
        names.sort();
        Ok(names)
    }

    pub fn thin(&self, name: &str) -> Result<&ThinEntry> {
        self.thins
            .get(name)
            .with_context(|| format!("pool {:?} has no thin named {name:?}", self.name))
    }

    pub fn thin_mut(&mut self, name: &str) -> Result<&mut ThinEntry> {
        let pool = self.name.clone();
        self.thins
            .get_mut(name)
            .with_context(|| format!("pool {pool:?} has no thin named {name:?}"))
    }

    /// The name of thin `id`, if the sidecar knows it.
    pub fn name_of(&self, id: u32) -> Option<&str> {
        self.thins
            .iter()
            .find(|(_, t)| t.id == id)
            .map(|(n, _)| n.as_str())
    }

    /// Adds thins the metadata has and the sidecar does not, as `thin<ID>` of size 0, and
    /// drops entries whose thin the metadata lacks. Returns what changed, for the log.
    pub fn reconcile(&mut self, ids_in_metadata: &[u32]) -> Vec<String> {
        let mut changes = Vec::new();
        let before: Vec<String> = self.thins.keys().cloned().collect();
        for name in before {
            let id = self.thins[&name].id;
            if !ids_in_metadata.contains(&id) {
                self.thins.remove(&name);
                changes.push(format!(
                    "dropped {name:?} (thin {id} is not in the metadata)"
                ));
            }
        }
        for &id in ids_in_metadata {
            if self.name_of(id).is_none() {
                let mut name = format!("thin{id}");
                while self.thins.contains_key(&name) {
                    name.push('_');
                }
                self.thins.insert(
                    name.clone(),
                    ThinEntry {
                        id,
                        size: 0,
                        exposed: None,
                    },
                );
                changes.push(format!(
                    "added thin {id} as {name:?} (size unknown: resize it)"
                ));
            }
        }
        changes
    }

    /// The smallest thin id not in `taken`, from 1 (dm-thin ids are 24-bit; the pool keeps
    /// the top ones for itself).
    pub fn free_id(taken: &[u32]) -> Result<u32> {
        (1..thin_pool::FIRST_RESERVED_ID)
            .find(|id| !taken.contains(id))
            .context("every thin id is in use")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saves_and_loads_atomically() {
        let dir = std::env::temp_dir().join(format!("thin-ctl-sidecar-{}", std::process::id()));
        let mut s = Sidecar::new("p1", "/m".into(), "/d".into(), 65536);
        s.thins.insert(
            "a".into(),
            ThinEntry {
                id: 1,
                size: 1 << 30,
                exposed: Some(Exposure {
                    dev_id: 3,
                    queues: 1,
                    depth: 64,
                    io_buf_bytes: 1 << 19,
                }),
            },
        );
        s.save(&dir).unwrap();
        assert_eq!(Sidecar::load(&dir, "p1").unwrap(), s);
        assert_eq!(Sidecar::list(&dir).unwrap(), vec!["p1".to_string()]);
        assert!(Sidecar::load(&dir, "p2").is_err());
        fs::write(Sidecar::path(&dir, "p3"), "{ not json").unwrap();
        let e = Sidecar::load(&dir, "p3").unwrap_err();
        assert!(format!("{e:#}").contains("pool import"), "{e:#}");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn reconcile_adds_and_drops() {
        let mut s = Sidecar::new("p", "/m".into(), "/d".into(), 65536);
        s.thins.insert(
            "gone".into(),
            ThinEntry {
                id: 9,
                size: 1,
                exposed: None,
            },
        );
        let changes = s.reconcile(&[1, 2]);
        assert_eq!(changes.len(), 3);
        assert_eq!(s.thin("thin1").unwrap().id, 1);
        assert_eq!(s.thin("thin2").unwrap().size, 0);
        assert!(s.thin("gone").is_err());
        assert_eq!(Sidecar::free_id(&[1, 2, 4]).unwrap(), 3);
    }

    #[test]
    fn names_are_checked() {
        assert!(check_name("pool", "pool-1.a_b+c").is_ok());
        for bad in ["", ".x", "a/b", "a b", &"x".repeat(65)] {
            assert!(check_name("pool", bad).is_err(), "{bad:?}");
        }
    }
}
