//! Writing credential files as kleidi requires them: mode 0600, since kleidi refuses a PIN, token or
//! auth file other users can read or change (`kleidi::credfile`).
#![allow(dead_code, clippy::unwrap_used)]

use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::Path;

/// Writes `content` to `path`, mode 0600 (also for a file that existed: truncating keeps its mode).
pub fn write_private(path: &Path, content: impl AsRef<[u8]>) {
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .unwrap();
    file.set_permissions(std::fs::Permissions::from_mode(0o600))
        .unwrap();
    file.write_all(content.as_ref()).unwrap();
}
