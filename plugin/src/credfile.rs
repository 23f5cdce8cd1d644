//! Credential files (the PKCS#11 PINs, Vault token, AppRole secret_id, JWT and client key, the TPM
//! owner auth): read only when no other user can read or change them, as ssh treats a private key.
//! A file is refused when its mode has any group or other bit, or when it is owned by neither the
//! user kleidi runs as (effective uid) nor root: that owner could read it, or swap in a credential
//! of its own. Symlinks are followed (a Kubernetes Secret volume's files are symlinks into
//! `..data/`; their mode is the volume's `defaultMode`). `--allow-insecure-credential-files` turns
//! the refusal into a warning, logged once per file.
//!
//! Every reader of such a file goes through [`read`]; the check is nowhere else.

use std::collections::BTreeSet;
use std::io::Read as _;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use zeroize::Zeroizing;

use crate::{Error, Result};

/// The flag that turns a refusal into a warning.
pub const ALLOW_FLAG: &str = "--allow-insecure-credential-files";
/// The largest credential file read: a JWT or a PEM key is a few KiB; a larger file is not one.
const MAX_LEN: u64 = 64 * 1024;

/// Set once by `main` from [`ALLOW_FLAG`], before any backend reads a file. One value for the
/// process: every reader (serve, `pkcs11 init`, `tpm …`) follows the same flag. Library callers
/// (tests, benches) keep the default: refuse.
static ALLOW_INSECURE: AtomicBool = AtomicBool::new(false);
/// Files already warned about, so a file re-read every second (the Vault token) warns once.
static WARNED: Mutex<BTreeSet<PathBuf>> = Mutex::new(BTreeSet::new());

/// Whether an insecure credential file is refused or read with a warning.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Policy {
    /// Refuse it (the default).
    Refuse,
    /// Read it and log a warning ([`ALLOW_FLAG`]).
    Warn,
}

/// Sets the process's policy from [`ALLOW_FLAG`].
pub fn allow_insecure(allow: bool) {
    ALLOW_INSECURE.store(allow, Ordering::Relaxed);
}

fn policy() -> Policy {
    match ALLOW_INSECURE.load(Ordering::Relaxed) {
        true => Policy::Warn,
        false => Policy::Refuse,
    }
}

/// Reads the credential file `path` (named by `flag` in errors) whole, into a zeroizing buffer,
/// after checking its mode and owner. Errors name the file and its mode, never its content.
pub fn read(path: &Path, flag: &str) -> Result<Zeroizing<Vec<u8>>> {
    read_with(path, flag, policy())
}

/// [`read`] with an explicit policy.
pub(crate) fn read_with(path: &Path, flag: &str, policy: Policy) -> Result<Zeroizing<Vec<u8>>> {
    let failed = |e: std::io::Error| Error::Config(format!("{flag} {}: {e}", path.display()));
    let mut file = std::fs::File::open(path).map_err(failed)?;
    // The opened file's metadata: what is checked is what is read, even if the path changes.
    let meta = file.metadata().map_err(failed)?;
    let euid = nix::unistd::geteuid().as_raw();
    if let Some(problem) = problem(meta.mode(), meta.uid(), euid) {
        let shown = path.display();
        match policy {
            Policy::Refuse => {
                return Err(Error::Config(format!(
                    "{flag} {shown}: {problem}; {fix}, or pass {ALLOW_FLAG} to read it anyway",
                    fix = problem.fix(path, euid)
                )));
            }
            Policy::Warn => {
                let first = WARNED
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .insert(path.to_path_buf());
                if first {
                    tracing::warn!(
                        file = %shown,
                        "{flag} {shown}: {problem}; reading it anyway ({ALLOW_FLAG})"
                    );
                }
            }
        }
    }
    if meta.len() > MAX_LEN {
        return Err(too_large(path, flag));
    }
    // Sized up front so the buffer is not reallocated while reading (which would leave an
    // unzeroized copy behind); one byte more to see the end.
    let capacity = usize::try_from(meta.len()).unwrap_or(0).saturating_add(1);
    let mut bytes = Zeroizing::new(Vec::with_capacity(capacity));
    (&mut file)
        .take(MAX_LEN + 1)
        .read_to_end(&mut bytes)
        .map_err(failed)?;
    if bytes.len() as u64 > MAX_LEN {
        return Err(too_large(path, flag));
    }
    Ok(bytes)
}

fn too_large(path: &Path, flag: &str) -> Error {
    Error::Config(format!(
        "{flag} {}: larger than {MAX_LEN} bytes; not a credential file",
        path.display()
    ))
}

/// Why a file with this mode and owner must not hold a credential.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Problem {
    /// Group or other users have some access.
    Mode(u32),
    /// Owned by another user than kleidi's and not root.
    Owner(u32),
}

fn problem(mode: u32, owner: u32, euid: u32) -> Option<Problem> {
    if mode & 0o077 != 0 {
        Some(Problem::Mode(mode & 0o7777))
    } else if owner != euid && owner != 0 {
        Some(Problem::Owner(owner))
    } else {
        None
    }
}

impl Problem {
    fn fix(self, path: &Path, euid: u32) -> String {
        match self {
            Problem::Mode(_) => format!(
                "run `chmod 600 {}` (a Kubernetes Secret or projected volume: defaultMode: 0400)",
                path.display()
            ),
            Problem::Owner(owner) => format!(
                "run `chown {euid} {}` or run kleidi as uid {owner}",
                path.display()
            ),
        }
    }
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Problem::Mode(mode) => write!(
                f,
                "mode {mode:04o} gives users other than its owner access to a secret (group or other bits set)"
            ),
            Problem::Owner(owner) => write!(
                f,
                "owned by uid {owner}, which is neither the user kleidi runs as nor root, and could replace it"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    fn file(dir: &Path, name: &str, mode: u32) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, "s3cret-value\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        path
    }

    #[test]
    fn group_or_world_access_is_refused_owner_only_is_read() {
        let dir = tempfile::tempdir().unwrap();
        for mode in [0o644, 0o640, 0o604, 0o660, 0o606, 0o610, 0o444] {
            let path = file(dir.path(), &format!("m{mode:o}"), mode);
            let err = read_with(&path, "--some-file", Policy::Refuse).unwrap_err();
            let text = err.to_string();
            assert!(matches!(err, Error::Config(_)), "{text}");
            for part in [
                "--some-file",
                path.to_str().unwrap(),
                &format!("mode 0{mode:o}"),
                "chmod 600",
                ALLOW_FLAG,
            ] {
                assert!(text.contains(part), "{part:?} missing from {text}");
            }
            assert!(!text.contains("s3cret"), "the content leaked: {text}");
        }
        for mode in [0o600, 0o400, 0o700] {
            let path = file(dir.path(), &format!("ok{mode:o}"), mode);
            let bytes = read_with(&path, "--some-file", Policy::Refuse).unwrap();
            assert_eq!(&bytes[..], b"s3cret-value\n");
        }
    }

    #[test]
    fn the_allow_policy_reads_an_insecure_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = file(dir.path(), "pin", 0o644);
        let bytes = read_with(&path, "--some-file", Policy::Warn).unwrap();
        assert_eq!(&bytes[..], b"s3cret-value\n");
    }

    /// Log lines written through a `tracing` subscriber, for assertions.
    #[derive(Clone, Default)]
    struct Captured(std::sync::Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn the_warning_is_logged_once_per_file_however_often_it_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = file(dir.path(), "token", 0o640);
        let logs = Captured::default();
        let writer = logs.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            // A Vault token file is re-read every second.
            for _ in 0..3 {
                read_with(&path, "--vault-token-file", Policy::Warn).unwrap();
            }
        });
        let text = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
        assert_eq!(text.matches("reading it anyway").count(), 1, "{text}");
        assert!(
            text.contains("WARN") && text.contains("--vault-token-file") && text.contains("mode 0640"),
            "{text}"
        );
        assert!(!text.contains("s3cret"), "{text}");
    }

    #[test]
    fn symlinks_are_followed_to_the_file_they_name() {
        // A Kubernetes Secret volume: `pin -> ..data/pin`, `..data -> ..2024_01_01…`.
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("..2024_01_01");
        std::fs::create_dir(&real).unwrap();
        std::os::unix::fs::symlink(&real, dir.path().join("..data")).unwrap();
        let link = dir.path().join("pin");
        std::os::unix::fs::symlink(dir.path().join("..data/pin"), &link).unwrap();
        let target = file(&real, "pin", 0o644);
        // The link itself is 0777; the file's own mode decides.
        assert!(read_with(&link, "--f", Policy::Refuse).is_err());
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o400)).unwrap();
        assert_eq!(
            &read_with(&link, "--f", Policy::Refuse).unwrap()[..],
            b"s3cret-value\n"
        );
    }

    #[test]
    fn owners_other_than_kleidis_user_or_root_are_refused() {
        assert_eq!(problem(0o100600, 1000, 1000), None);
        assert_eq!(problem(0o100400, 0, 1000), None, "root-owned");
        assert_eq!(problem(0o100600, 0, 0), None);
        assert_eq!(problem(0o100600, 1001, 1000), Some(Problem::Owner(1001)));
        assert_eq!(problem(0o100600, 1000, 0), Some(Problem::Owner(1000)));
        assert_eq!(problem(0o100644, 1000, 1000), Some(Problem::Mode(0o644)));
        let text = format!("{}", Problem::Owner(1001));
        assert!(text.contains("uid 1001"), "{text}");
        // On a real file too, where this test can make one (as root).
        if nix::unistd::geteuid().is_root() {
            let dir = tempfile::tempdir().unwrap();
            let path = file(dir.path(), "theirs", 0o600);
            std::os::unix::fs::chown(&path, Some(65534), None).unwrap();
            let err = read_with(&path, "--f", Policy::Refuse).unwrap_err();
            assert!(err.to_string().contains("uid 65534"), "{err}");
        }
    }

    #[test]
    fn unreadable_and_oversized_files_are_config_errors() {
        let dir = tempfile::tempdir().unwrap();
        let err = read_with(&dir.path().join("missing"), "--f", Policy::Refuse).unwrap_err();
        assert!(
            matches!(err, Error::Config(_)) && err.to_string().contains("--f"),
            "{err}"
        );
        let big = dir.path().join("big");
        std::fs::write(&big, vec![b'a'; MAX_LEN as usize + 1]).unwrap();
        std::fs::set_permissions(&big, std::fs::Permissions::from_mode(0o600)).unwrap();
        let err = read_with(&big, "--f", Policy::Refuse).unwrap_err();
        assert!(err.to_string().contains("larger than"), "{err}");
    }
}
