//! `kleidi check`: the preflight a user runs before pointing kube-apiserver at kleidi. With serve's
//! flags it looks at the socket's directory and path, builds the backend as `serve` would, reads
//! the current key_id, wraps and unwraps a random seed, and reports each finding with one line of
//! reason, plus the backend's non-secret details, as text or JSON. It serves nothing and changes
//! nothing: the socket is looked at, never created or removed.
//!
//! Every reason is an [`Error`]'s text (which never carries PINs, tokens or key material) behind
//! a short name for the problem; the [`Problem`] comes from the error's class, decided once in
//! each backend.

use std::fmt::Write as _;
use std::io::{self, Write as _};
use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use nix::unistd::{AccessFlags, Uid, access};
use secrecy::{ExposeSecret, SecretSlice};
use serde::Serialize;

use crate::Error;
use crate::config::{BackendKind, CheckArgs, OutputFormat, ServeArgs};
use crate::guard::Guarded;
use crate::server::Endpoint;
use crate::service::KeyService;

/// How long building the backend may take beyond `--call-timeout`: Vault's connect waits up to
/// 5 s for a first answer before serving anyway, a PKCS#11 module loads and finds its token.
const BUILD_SLACK: Duration = Duration::from_secs(10);
/// The uid the probe's calls carry, so the backend's logs tell them from the apiserver's.
const UID: &str = "kleidi-check";

/// Why a check failed: a stable name for automation (`problem` in the JSON report).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Problem {
    /// The socket's directory or path is unusable or unsafe.
    Socket,
    /// A flag or file that cannot work (a missing flag, an unreadable file, a wrong key type).
    Config,
    /// The PKCS#11 token refused the PIN.
    WrongPin,
    /// The token's user PIN (or the TPM's dictionary-attack protection) is locked.
    Locked,
    /// The key does not exist: no PKCS#11 key with the label, no transit key, no TPM key.
    KeyMissing,
    /// The key exists but cannot be used: an AWS KMS key disabled, pending deletion or unavailable.
    KeyDisabled,
    /// The backend refused kleidi's credentials (a Vault login, a revoked token, TPM auth).
    AuthFailed,
    /// Logged in, but the policy does not allow the operation.
    PermissionDenied,
    /// Vault / OpenBao is sealed.
    Sealed,
    /// Nothing answers at the address.
    Unreachable,
    /// The TLS handshake failed: an untrusted certificate, a wrong name, http:// to an HTTPS port.
    Tls,
    /// No answer within `--call-timeout`.
    Timeout,
    /// Reached, but not serving (token lost, standby, rate limited, server error, TPM busy).
    Unavailable,
    /// The backend answered something wrong (a round trip that does not come back, a key_id
    /// Encrypt and Status disagree on).
    Backend,
}

impl Problem {
    /// The few words a reason starts with.
    fn title(self) -> &'static str {
        match self {
            Problem::Socket => "socket",
            Problem::Config => "configuration",
            Problem::WrongPin => "wrong PIN",
            Problem::Locked => "locked",
            Problem::KeyMissing => "missing key",
            Problem::KeyDisabled => "key not usable",
            Problem::AuthFailed => "authentication failed",
            Problem::PermissionDenied => "no permission",
            Problem::Sealed => "sealed",
            Problem::Unreachable => "unreachable",
            Problem::Tls => "TLS failure",
            Problem::Timeout => "timeout",
            Problem::Unavailable => "unavailable",
            Problem::Backend => "backend misbehaved",
        }
    }
}

/// One check's outcome.
#[derive(Debug, Serialize)]
pub struct Finding {
    /// What was checked: `socket_directory`, `socket_path`, `socket_mode`, `backend`, `key_id`,
    /// `encrypt`, `decrypt`.
    pub name: &'static str,
    /// Whether it passed.
    pub ok: bool,
    /// Why not, when it did not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub problem: Option<Problem>,
    /// One line: what was found.
    pub reason: String,
}

impl Finding {
    fn ok(name: &'static str, reason: String) -> Self {
        Self {
            name,
            ok: true,
            problem: None,
            reason: one_line(&reason),
        }
    }

    fn problem(name: &'static str, problem: Problem, reason: &str) -> Self {
        Self {
            name,
            ok: false,
            problem: Some(problem),
            reason: one_line(&format!("{}: {reason}", problem.title())),
        }
    }
}

/// Everything `kleidi check` found.
#[derive(Debug, Serialize)]
pub struct Report {
    /// Every check passed.
    pub ok: bool,
    /// `pkcs11`, `vault` or `tpm`.
    pub backend: &'static str,
    /// The socket checked, as `--listen` names it.
    pub listen: String,
    /// The current key_id, when the backend answered with one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_id: Option<String>,
    /// The checks, in the order they ran; a backend check that failed ends the backend's part.
    pub findings: Vec<Finding>,
    /// Non-secret facts about the backend (see [`KeyService::describe`]), in its order.
    #[serde(serialize_with = "as_map")]
    pub details: Vec<(&'static str, String)>,
}

/// Runs every check and prints the report on stdout; exit 0 only when all passed.
pub async fn run(args: CheckArgs) -> ExitCode {
    let report = check(&args.serve).await;
    let printed = match args.output {
        OutputFormat::Text => report.text(),
        OutputFormat::Json => serde_json::to_string_pretty(&report)
            .unwrap_or_else(|e| format!("{{\"ok\": false, \"error\": \"report: {e}\"}}")),
    };
    // A closed stdout (`kleidi check | head -0`) must not panic as println! would; the exit code
    // still tells.
    let _ = writeln!(io::stdout().lock(), "{printed}");
    if report.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Checks the socket and the backend `args` name.
pub async fn check(args: &ServeArgs) -> Report {
    let mut report = Report {
        ok: false,
        backend: match args.backend {
            BackendKind::Pkcs11 => "pkcs11",
            BackendKind::Vault => "vault",
            BackendKind::Tpm => "tpm",
            BackendKind::AwsKms => "aws-kms",
        },
        listen: args.listen.to_string(),
        key_id: None,
        findings: socket(&args.listen, args.socket_mode),
        details: Vec::new(),
    };
    probe(args, &mut report).await;
    report.ok = report.findings.iter().all(|f| f.ok);
    report
}

/// Builds the backend, reads the key_id, and encrypts and decrypts a random seed: the first
/// failure ends it, as every later step would fail for the same reason.
async fn probe(args: &ServeArgs, report: &mut Report) {
    let bound = args.call_timeout + BUILD_SLACK;
    let built = tokio::time::timeout(bound, crate::backend::build(args))
        .await
        .unwrap_or(Err(Error::Timeout(bound)));
    let backend = match built {
        Ok(backend) => backend,
        Err(err) => return report.findings.push(diagnose("backend", &err, args)),
    };
    report.findings.push(Finding::ok(
        "backend",
        format!("{} backend built", report.backend),
    ));
    let svc = Guarded::new(backend, args.call_timeout);
    roundtrip(&svc, args, report).await;
    // After the probe: what it logged in with and read (a Vault token's lease, the key's version).
    report.details = tokio::time::timeout(args.call_timeout, svc.describe())
        .await
        .unwrap_or_default();
}

async fn roundtrip(svc: &impl KeyService, args: &ServeArgs, report: &mut Report) {
    let findings = &mut report.findings;
    let key_id = match svc.current_key_id().await {
        Ok(key_id) => key_id,
        Err(err) => return findings.push(diagnose("key_id", &err, args)),
    };
    findings.push(Finding::ok("key_id", key_id.clone()));
    report.key_id = Some(key_id.clone());
    let seed = SecretSlice::from(rand::random::<[u8; 32]>().to_vec());
    let wrapped = match svc.encrypt(UID, &seed).await {
        Ok(wrapped) if wrapped.key_id == key_id => wrapped,
        Ok(wrapped) => {
            let why = format!(
                "encrypt used key_id {} while Status says {key_id}",
                crate::logging::Client(&wrapped.key_id)
            );
            return findings.push(Finding::problem("encrypt", Problem::Backend, &why));
        }
        Err(err) => return findings.push(diagnose("encrypt", &err, args)),
    };
    findings.push(Finding::ok(
        "encrypt",
        format!(
            "wrapped a random 32-byte seed into {} bytes",
            wrapped.ciphertext.len()
        ),
    ));
    match svc.decrypt(UID, &wrapped).await {
        Ok(plain) if plain.expose_secret() == seed.expose_secret() => {
            findings.push(Finding::ok("decrypt", "unwrapped the same seed".into()));
        }
        Ok(_) => findings.push(Finding::problem(
            "decrypt",
            Problem::Backend,
            "decrypt returned other bytes than were encrypted",
        )),
        Err(err) => findings.push(diagnose("decrypt", &err, args)),
    }
}

/// The finding for a failed step: the problem its class names, a hint where the class alone
/// does not say what to fix, and the error's own text.
fn diagnose(step: &'static str, err: &Error, args: &ServeArgs) -> Finding {
    let text = err.to_string();
    let addresses = || match args.backend {
        BackendKind::AwsKms => args
            .aws
            .aws_endpoint_url
            .clone()
            .unwrap_or_else(|| "the region's KMS endpoint".into()),
        _ => args.vault.vault_addr.join(", "),
    };
    let (problem, hint) = match err {
        Error::Denied { class, .. } => match *class {
            "pin_incorrect" => (
                Problem::WrongPin,
                format!("the token refused the PIN in {}", pin_file(args)),
            ),
            "pin_locked" | "lockout" => (Problem::Locked, String::new()),
            "permission_denied" => (Problem::PermissionDenied, policy_hint(step, args)),
            _ => (Problem::AuthFailed, String::new()),
        },
        Error::Unavailable { class, detail, .. } => match *class {
            "key_missing" | "key_lost" => (Problem::KeyMissing, String::new()),
            "key_disabled" | "key_pending_deletion" | "key_unavailable" => (
                Problem::KeyDisabled,
                "enable the key (or cancel its deletion) in KMS".to_owned(),
            ),
            "sealed" => (
                Problem::Sealed,
                "unseal it (`vault operator unseal`, `bao operator unseal`)".to_owned(),
            ),
            "network" if detail.starts_with("tls:") => {
                (Problem::Tls, format!("no TLS session with {}", addresses()))
            }
            "network" => (
                Problem::Unreachable,
                format!("nothing answers at {}", addresses()),
            ),
            "tpm_unreachable" => (Problem::Unreachable, String::new()),
            _ => (Problem::Unavailable, String::new()),
        },
        Error::Timeout(bound) => (
            Problem::Timeout,
            format!("no answer within {}", humantime::format_duration(*bound)),
        ),
        // Backends refuse to start without their key, as a configuration error; its text names it.
        Error::Config(detail) if names_missing_key(detail) => (Problem::KeyMissing, String::new()),
        Error::Config(_) => (Problem::Config, String::new()),
        _ => (Problem::Backend, String::new()),
    };
    let reason = if hint.is_empty() {
        text
    } else {
        format!("{hint}: {text}")
    };
    Finding::problem(step, problem, &reason)
}

/// Whether a backend's start-up refusal is about its key being absent (the texts of
/// `Pkcs11Backend::connect`, `VaultBackend::connect` and `TpmBackend::connect`).
fn names_missing_key(detail: &str) -> bool {
    [
        "no secret key labelled",
        "(key_missing)",
        "holds no TPM key",
        "/current is gone",
    ]
    .iter()
    .any(|needle| detail.contains(needle))
}

fn pin_file(args: &ServeArgs) -> String {
    args.pkcs11
        .pkcs11_pin_file
        .as_deref()
        .map_or_else(|| "--pkcs11-pin-file".into(), |p| p.display().to_string())
}

/// The transit path (or KMS action) whose permission a refused step needed.
fn policy_hint(step: &str, args: &ServeArgs) -> String {
    if args.backend == BackendKind::AwsKms {
        let key = args.aws.aws_kms_key_id.as_deref().unwrap_or_default();
        let action = match step {
            "encrypt" => "kms:Encrypt",
            "decrypt" => "kms:Decrypt",
            _ => "kms:DescribeKey and kms:ListKeyRotations",
        };
        return format!(
            "the key policy or IAM policy does not allow {action} on {key} with this encryption context (fixtures/aws/iam-policy.json)"
        );
    }
    let mount = args.vault.vault_transit_mount.trim_matches('/');
    let key = args.vault.vault_key.as_deref().unwrap_or_default();
    let (path, capability) = match step {
        "encrypt" => (format!("{mount}/encrypt/{key}"), "update"),
        "decrypt" => (format!("{mount}/decrypt/{key}"), "update"),
        _ => (format!("{mount}/keys/{key}"), "read"),
    };
    format!("the token's policy does not grant \"{capability}\" on {path}")
}

/// The socket's directory, path and mode, as `serve` would find them (server.rs binds there).
fn socket(listen: &Endpoint, mode: u32) -> Vec<Finding> {
    let path = match listen {
        Endpoint::Abstract(name) => {
            return vec![Finding::ok(
                "socket_path",
                format!(
                    "abstract socket @{name}: no file, so no directory or mode to check; any \
                     process in this network namespace can connect"
                ),
            )];
        }
        Endpoint::Path(path) => path,
    };
    let dir = path.parent().unwrap_or(Path::new("/"));
    vec![socket_directory(dir), socket_path(path), socket_mode(dir, mode)]
}

fn socket_directory(dir: &Path) -> Finding {
    const NAME: &str = "socket_directory";
    let shown = dir.display();
    let meta = match std::fs::metadata(dir) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            // serve creates it, and any missing parent, mode 0750.
            let existing = dir.ancestors().find(|a| a.exists()).unwrap_or(Path::new("/"));
            return match access(existing, AccessFlags::W_OK | AccessFlags::X_OK) {
                Ok(()) => Finding::ok(
                    NAME,
                    format!("{shown} does not exist yet; serve creates it (0750)"),
                ),
                Err(errno) => Finding::problem(
                    NAME,
                    Problem::Socket,
                    &format!(
                        "{shown} does not exist and cannot be created: {}: {}",
                        existing.display(),
                        errno.desc()
                    ),
                ),
            };
        }
        Err(e) => return Finding::problem(NAME, Problem::Socket, &format!("{shown}: {e}")),
    };
    let mode = meta.mode() & 0o7777;
    let euid = Uid::effective().as_raw();
    if !meta.is_dir() {
        return Finding::problem(NAME, Problem::Socket, &format!("{shown} is not a directory"));
    }
    if meta.uid() != 0 && meta.uid() != euid {
        return Finding::problem(
            NAME,
            Problem::Socket,
            &format!(
                "{shown} is owned by uid {}, neither root nor kleidi's user (uid {euid}): its owner could replace the socket",
                meta.uid()
            ),
        );
    }
    if mode & 0o022 != 0 {
        return Finding::problem(
            NAME,
            Problem::Socket,
            &format!(
                "{shown} is mode {mode:04o}: other users can create and rename files in it, so they \
                 could put their own socket in kleidi's place (chmod go-w {shown})"
            ),
        );
    }
    if let Err(errno) = access(dir, AccessFlags::W_OK | AccessFlags::X_OK) {
        return Finding::problem(
            NAME,
            Problem::Socket,
            &format!(
                "kleidi's user (uid {euid}) cannot create its socket in {shown}: {}",
                errno.desc()
            ),
        );
    }
    let owner = if meta.uid() == 0 {
        "root".to_owned()
    } else {
        format!("uid {}", meta.uid())
    };
    Finding::ok(NAME, format!("{shown}: owned by {owner}, mode {mode:04o}"))
}

fn socket_path(path: &Path) -> Finding {
    const NAME: &str = "socket_path";
    let shown = path.display();
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Finding::ok(NAME, format!("{shown}: free")),
        Err(e) => return Finding::problem(NAME, Problem::Socket, &format!("{shown}: {e}")),
    };
    if !meta.file_type().is_socket() {
        return Finding::problem(
            NAME,
            Problem::Socket,
            &format!("{shown} exists and is not a socket; serve refuses to replace it"),
        );
    }
    match UnixStream::connect(path) {
        Ok(_) => Finding::problem(
            NAME,
            Problem::Socket,
            &format!(
                "another process is serving {shown} (a kleidi already running?); serve refuses to take it"
            ),
        ),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => Finding::ok(
            NAME,
            format!("{shown}: a stale socket from an earlier run; serve removes it"),
        ),
        Err(e) => Finding::problem(
            NAME,
            Problem::Socket,
            &format!("cannot tell whether {shown} is in use: {e}"),
        ),
    }
}

/// serve sets the mode itself (bound privately, chmod-ed, renamed into place), so it is always
/// what `--socket-mode` says; what can still be wrong is a group that cannot reach it.
fn socket_mode(dir: &Path, mode: u32) -> Finding {
    const NAME: &str = "socket_mode";
    if mode & 0o060 == 0 {
        return Finding::ok(NAME, format!("{mode:04o}: only kleidi's user can connect"));
    }
    match std::fs::metadata(dir) {
        Ok(meta) if meta.mode() & 0o010 == 0 => Finding::problem(
            NAME,
            Problem::Socket,
            &format!(
                "{mode:04o} lets group {} connect, but {} (mode {:04o}) does not let the group in (chmod g+x)",
                meta.gid(),
                dir.display(),
                meta.mode() & 0o7777
            ),
        ),
        _ => Finding::ok(
            NAME,
            format!("{mode:04o}: kleidi's user and its group can connect"),
        ),
    }
}

impl Report {
    /// The report for a person: one line per check, the details, a verdict.
    pub fn text(&self) -> String {
        let mut out = format!("kleidi check: backend {}, socket {}\n", self.backend, self.listen);
        let width = self.findings.iter().map(|f| f.name.len()).max().unwrap_or(0);
        for f in &self.findings {
            let mark = if f.ok { "ok     " } else { "PROBLEM" };
            let _ = writeln!(out, "  {mark}  {:width$}  {}", f.name, f.reason);
        }
        if !self.details.is_empty() {
            out.push_str("details:\n");
            let width = self.details.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
            for (name, value) in &self.details {
                let _ = writeln!(out, "  {name:width$}  {}", one_line(value));
            }
        }
        let failed = self.findings.iter().filter(|f| !f.ok).count();
        if failed == 0 {
            let _ = write!(out, "ok: all {} checks passed", self.findings.len());
        } else {
            let _ = write!(out, "{failed} of {} checks found a problem", self.findings.len());
        }
        out
    }
}

/// A reason on one line: Vault's error lists and backends' multi-line texts flattened.
fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn as_map<S: serde::Serializer>(pairs: &[(&'static str, String)], s: S) -> Result<S::Ok, S::Error> {
    s.collect_map(pairs.iter().map(|(k, v)| (*k, v)))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    fn mode(path: &Path, mode: u32) {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn a_private_directory_and_a_free_path_pass() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("kms.sock");
        let found = socket(&Endpoint::Path(sock), 0o600);
        assert!(found.iter().all(|f| f.ok), "{found:?}");
        assert_eq!(
            found.iter().map(|f| f.name).collect::<Vec<_>>(),
            ["socket_directory", "socket_path", "socket_mode"]
        );
    }

    #[test]
    fn a_directory_others_can_write_is_a_problem() {
        let dir = tempfile::tempdir().unwrap();
        for bits in [0o777, 0o1777, 0o720] {
            mode(dir.path(), bits);
            let f = socket_directory(dir.path());
            assert_eq!(f.problem, Some(Problem::Socket), "{bits:o}: {f:?}");
            assert!(f.reason.contains("chmod go-w"), "{}", f.reason);
        }
    }

    #[test]
    fn a_missing_directory_passes_when_it_can_be_created() {
        let dir = tempfile::tempdir().unwrap();
        let f = socket_directory(&dir.path().join("a/b"));
        assert!(f.ok && f.reason.contains("serve creates it"), "{f:?}");
    }

    #[test]
    fn a_file_where_the_socket_goes_and_a_live_socket_are_problems_a_stale_one_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kms.sock");
        std::fs::write(&path, "x").unwrap();
        assert!(socket_path(&path).reason.contains("is not a socket"));
        std::fs::remove_file(&path).unwrap();
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let f = socket_path(&path);
        assert!(!f.ok && f.reason.contains("another process is serving"), "{f:?}");
        drop(listener);
        let f = socket_path(&path);
        assert!(f.ok && f.reason.contains("stale socket"), "{f:?}");
    }

    #[test]
    fn a_group_mode_needs_a_directory_the_group_can_enter() {
        let dir = tempfile::tempdir().unwrap();
        mode(dir.path(), 0o700);
        assert_eq!(socket_mode(dir.path(), 0o660).problem, Some(Problem::Socket));
        mode(dir.path(), 0o750);
        assert!(socket_mode(dir.path(), 0o660).ok);
        assert!(socket_mode(dir.path(), 0o600).ok);
    }

    #[test]
    fn backend_errors_become_the_problem_their_class_names() {
        let args = |extra: &[&str]| {
            let mut argv = vec![
                "kleidi",
                "check",
                "--backend",
                "vault",
                "--vault-addr",
                "https://v:8200",
                "--vault-key",
                "kek",
            ];
            argv.extend_from_slice(extra);
            match <crate::config::Cli as clap::Parser>::try_parse_from(argv)
                .unwrap()
                .command
            {
                crate::config::Command::Check(c) => c.serve,
                _ => panic!("not check"),
            }
        };
        let args = args(&[]);
        let vault = |class, detail: &str| Error::Unavailable {
            backend: "vault",
            class,
            detail: detail.into(),
        };
        let cases = [
            (
                "key_id",
                vault("sealed", "HTTP 503: Vault is sealed"),
                Problem::Sealed,
            ),
            (
                "key_id",
                vault("network", "connect: Connection refused"),
                Problem::Unreachable,
            ),
            (
                "key_id",
                vault("network", "tls: invalid peer certificate"),
                Problem::Tls,
            ),
            ("key_id", vault("key_missing", "HTTP 404"), Problem::KeyMissing),
            ("key_id", vault("standby", "HTTP 429"), Problem::Unavailable),
            (
                "backend",
                Error::Config(
                    "transit key transit/kek cannot be used: backend vault unavailable (key_missing): x"
                        .into(),
                ),
                Problem::KeyMissing,
            ),
            (
                "backend",
                Error::Config("--vault-auth needs --vault-role".into()),
                Problem::Config,
            ),
            ("key_id", Error::Timeout(Duration::from_secs(2)), Problem::Timeout),
        ];
        for (step, err, want) in cases {
            let f = diagnose(step, &err, &args);
            assert_eq!(f.problem, Some(want), "{err}: {f:?}");
            assert!(f.reason.starts_with(want.title()), "{f:?}");
        }
        let denied = Error::Denied {
            backend: "vault",
            class: "permission_denied",
            detail: "HTTP 403: 1 error occurred:\n\t* permission denied\n\n".into(),
        };
        let f = diagnose("encrypt", &denied, &args);
        assert_eq!(f.problem, Some(Problem::PermissionDenied));
        assert!(
            f.reason.contains("\"update\" on transit/encrypt/kek"),
            "{}",
            f.reason
        );
        assert!(!f.reason.contains('\n'), "one line: {:?}", f.reason);
    }

    #[test]
    fn the_json_report_keeps_details_as_an_object_in_order() {
        let report = Report {
            ok: true,
            backend: "tpm",
            listen: "unix:///x".into(),
            key_id: Some("tpm:00".into()),
            findings: vec![Finding::ok("key_id", "tpm:00".into())],
            details: vec![("tcti", "swtpm:".into()), ("state_dir", "/s".into())],
        };
        let json: serde_json::Value = serde_json::to_value(&report).unwrap();
        assert_eq!(json["details"]["tcti"], "swtpm:");
        assert_eq!(json["findings"][0]["ok"], true);
        assert!(json["findings"][0].get("problem").is_none());
        let text = report.text();
        assert!(
            text.find("tcti").unwrap() < text.find("state_dir").unwrap(),
            "{text}"
        );
    }
}
