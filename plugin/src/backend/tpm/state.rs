//! The state directory: TPM-wrapped KEK blobs (`<hex Name>.kek`, public + private as TPM2_Create
//! returned them, useless without the TPM that made them) and `current`, the key_id Encrypt uses.
//! Files are written to a temporary name and renamed, so a reader never sees half a key.

use std::collections::HashMap;
use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
use std::path::Path;

use super::format::{self, Blob};
use crate::{Error, Result};

const CURRENT: &str = "current";
const KEK_SUFFIX: &str = ".kek";

/// Every KEK in the state directory, by key_id, and which one is current.
#[derive(Default)]
pub struct Keyring {
    pub current: Option<String>,
    pub keys: HashMap<String, Blob>,
}

/// Reads the whole directory. A file whose Name does not match its file name, or that does not
/// parse, is a configuration error naming it (a KEK silently skipped would turn into "unknown key").
pub fn read(dir: &Path) -> Result<Keyring> {
    let entries = std::fs::read_dir(dir).map_err(|e| {
        Error::Config(format!(
            "--tpm-state-dir {}: {e}; create it with `kleidi tpm init`",
            dir.display()
        ))
    })?;
    let mut ring = Keyring::default();
    for entry in entries {
        let path = entry
            .map_err(|e| Error::Config(format!("{}: {e}", dir.display())))?
            .path();
        let Some(hex) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(KEK_SUFFIX))
        else {
            continue;
        };
        let bytes = std::fs::read(&path).map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
        let blob = Blob::decode(&bytes)
            .ok_or_else(|| Error::Config(format!("{} is not a kleidi TPM key file", path.display())))?;
        let key_id = format::key_id(&blob.name()?);
        if format::parse_key_id(&key_id) != Some(hex) {
            return Err(Error::Config(format!(
                "{} holds key {key_id}, not the key its file name says",
                path.display()
            )));
        }
        ring.keys.insert(key_id, blob);
    }
    ring.current = read_current(dir)?;
    if let Some(current) = &ring.current {
        if !ring.keys.contains_key(current) {
            return Err(Error::Config(format!(
                "{}/{CURRENT} names {current}, which has no {KEK_SUFFIX} file there",
                dir.display()
            )));
        }
    }
    Ok(ring)
}

/// The current key_id, if `kleidi tpm init` ever ran here.
pub fn read_current(dir: &Path) -> Result<Option<String>> {
    let path = dir.join(CURRENT);
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let key_id = text.trim();
            format::parse_key_id(key_id)
                .map(|_| Some(key_id.to_owned()))
                .ok_or_else(|| Error::Config(format!("{} does not hold a tpm key_id", path.display())))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::Config(format!("{}: {e}", path.display()))),
    }
}

/// Stores `kek` and makes it current. Returns its key_id.
pub fn add_current(dir: &Path, kek: &Blob) -> Result<String> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| Error::Config(format!("cannot create {}: {e}", dir.display())))?;
    let name = kek.name()?;
    let key_id = format::key_id(&name);
    write_atomically(
        dir,
        &format!("{}{KEK_SUFFIX}", hex::encode(&name)),
        &kek.encode()?,
    )?;
    write_atomically(dir, CURRENT, format!("{key_id}\n").as_bytes())?;
    Ok(key_id)
}

fn write_atomically(dir: &Path, name: &str, bytes: &[u8]) -> Result<()> {
    let path = dir.join(name);
    let tmp = dir.join(format!(".{name}.tmp"));
    let failed = |e: std::io::Error| Error::Config(format!("cannot write {}: {e}", path.display()));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(failed)?;
    file.write_all(bytes).map_err(failed)?;
    file.sync_all().map_err(failed)?;
    std::fs::rename(&tmp, &path).map_err(failed)
}
