//! Logs an operator can alert on: one line per event in both formats, no line a client can forge,
//! and the Vault client crates kept quiet (kleidi logs each failed call itself, once, classified).
//!
//! Two guards make "one line per event" hold whatever a message contains. [`Client`] escapes and
//! cuts every client-supplied field (uid, key_id) where it is logged; [`OneLine`] escapes any line
//! break left inside a formatted event (an error text from a dependency, a path) before it reaches
//! stderr, so kubelet, journald and log shippers see exactly one record per event.
//!
//! Every line logged while serving a call carries the call's `rpc` span (uid, method, service
//! version; opened in `grpc`): text lines start `rpc{uid=… method=… service=…}:`, JSON lines hold
//! it in `"spans"` (and in `"span"` when it is the innermost). The health probe logs under its own
//! `health_probe` span, a Vault decrypt batch under `vault_batch` with every caller's uid. At start,
//! [`log_effective_config`] writes the settings `kleidi serve` runs with, never a secret.

use std::fmt;
use std::io::{self, Write};
use std::time::Duration;

use clap::ValueEnum;
use tracing::field::display;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;

use crate::config::{BackendKind, LogFormat, ServeArgs, VaultAuth};

/// What `kleidi serve` logs when `KLEIDI_LOG` is unset: kleidi's own events at info (no line per
/// successful call), nothing from vaultrs, rustify and tss_esapi, whose ERROR lines repeat what
/// kleidi reports once per call with its class.
pub const DEFAULT_FILTER: &str = "info,vaultrs=off,rustify=off,tss_esapi=off";

/// Longest client-supplied field logged, in characters (before escaping).
pub const MAX_CLIENT_FIELD: usize = 128;

/// Installs the global subscriber on stderr: `KLEIDI_LOG` (an `EnvFilter`) or [`DEFAULT_FILTER`],
/// text or JSON.
pub fn init(format: LogFormat) {
    let filter = match std::env::var("KLEIDI_LOG") {
        Ok(directives) if !directives.trim().is_empty() => {
            EnvFilter::try_new(&directives).unwrap_or_else(|e| {
                eprintln!("KLEIDI_LOG={directives:?} is not a valid filter ({e}); using {DEFAULT_FILTER}");
                EnvFilter::new(DEFAULT_FILTER)
            })
        }
        _ => EnvFilter::new(DEFAULT_FILTER),
    };
    // Colour only on a terminal: kubelet and journald store escape codes verbatim.
    let ansi = io::IsTerminal::is_terminal(&io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(OneLine { ansi });
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    match format {
        LogFormat::Text => builder.finish().with(no_wire_dumps()).init(),
        // Both span fields, as tracing-subscriber defaults to, said explicitly because operators
        // rely on them: `"spans"` always holds the call's `rpc` span with its uid, while `"span"`
        // is only the innermost (a dependency's own span, such as rustify's, when one is open).
        // Event fields stay under `"fields"` (not flattened), the shape shippers already parse.
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .finish()
            .with(no_wire_dumps())
            .init(),
    }
}

/// Whatever `KLEIDI_LOG` asks for, never the AWS SDK's TRACE events: they print whole requests
/// and responses (Debug of the body: a seed in base64; the session token header).
fn no_wire_dumps() -> tracing_subscriber::filter::FilterFn {
    fn allowed(meta: &tracing::Metadata<'_>) -> bool {
        let aws = ["aws_smithy", "aws_sdk", "aws_config", "aws_runtime", "aws_sigv4"];
        *meta.level() != tracing::Level::TRACE || !aws.iter().any(|t| meta.target().starts_with(t))
    }
    tracing_subscriber::filter::filter_fn(allowed)
}

/// Logs, once, the configuration `kleidi serve` runs with: every setting that shapes how it serves
/// and, for the chosen backend only, its non-secret settings. Credentials appear as the paths of
/// the files that hold them (only those the chosen Vault auth method reads), never their content;
/// Vault addresses without any `user:password@`.
pub fn log_effective_config(args: &ServeArgs) {
    let duration = |d: Duration| display(humantime::format_duration(d));
    let path = |p: &Option<std::path::PathBuf>| p.as_ref().map(|p| display(p.display().to_string()));
    // Every backend's line has the same common fields; a macro keeps them in one place while each
    // backend adds its own (tracing needs the field names at compile time).
    macro_rules! effective {
        ($($backend:tt)*) => {
            tracing::info!(
                version = %env!("CARGO_PKG_VERSION"),
                backend = %flag_value(args.backend),
                listen = %args.listen,
                socket_mode = %format_args!("{:04o}", args.socket_mode),
                status_version = %flag_value(args.status_version),
                call_timeout = duration(args.call_timeout),
                health_ok_ttl = duration(args.health_ok_ttl),
                health_roundtrip_interval = duration(args.health_roundtrip_interval),
                health_err_ttl = duration(args.health_err_ttl),
                shutdown_grace = duration(args.shutdown_grace),
                max_connections = args.max_connections,
                idle_timeout = duration(args.idle_timeout),
                runtime = %flag_value(args.runtime),
                worker_threads = args.worker_threads,
                metrics_addr = args.metrics_addr.map(display),
                metrics_allow_non_loopback = args.metrics_allow_non_loopback,
                $($backend)*
                "effective configuration"
            )
        };
    }
    match args.backend {
        BackendKind::Pkcs11 => {
            let p = &args.pkcs11;
            effective!(
                pkcs11_module = %p.pkcs11_module.display(),
                pkcs11_token_label = %p.pkcs11_token_label,
                pkcs11_key_label = %p.pkcs11_key_label,
                pkcs11_pin_file = path(&p.pkcs11_pin_file),
            );
        }
        BackendKind::Vault => {
            let v = &args.vault;
            let reads = |methods: &[VaultAuth]| methods.contains(&v.vault_auth);
            let addrs: Vec<String> = v.vault_addr.iter().map(|a| without_userinfo(a)).collect();
            effective!(
                vault_addr = %addrs.join(","),
                vault_transit_mount = %v.vault_transit_mount,
                vault_key = v.vault_key.as_deref().map(display),
                vault_auth = %flag_value(v.vault_auth),
                vault_auth_mount = v.vault_auth_mount.as_deref().map(display),
                vault_role = v.vault_role.as_deref().map(display),
                vault_namespace = v.vault_namespace.as_deref().map(display),
                vault_token_file = path(&v.vault_token_file).filter(|_| reads(&[VaultAuth::Token])),
                vault_role_id_file = path(&v.vault_role_id_file).filter(|_| reads(&[VaultAuth::Approle])),
                vault_secret_id_file = path(&v.vault_secret_id_file).filter(|_| reads(&[VaultAuth::Approle])),
                vault_jwt_file = path(&v.vault_jwt_file).filter(|_| reads(&[VaultAuth::Jwt, VaultAuth::Kubernetes])),
                vault_client_cert = path(&v.vault_client_cert),
                vault_client_key = path(&v.vault_client_key),
                vault_ca_file = path(&v.vault_ca_file),
                vault_server_name = v.vault_server_name.as_deref().map(display),
                vault_allow_plain_http = v.vault_allow_plain_http,
            );
        }
        BackendKind::Tpm => {
            let t = &args.tpm;
            effective!(
                tpm_tcti = t.tpm_tcti.as_deref().map(display),
                tpm_state_dir = %t.tpm_state_dir.display(),
                tpm_owner_auth_file = path(&t.tpm_owner_auth_file),
            );
        }
        BackendKind::AwsKms => {
            let a = &args.aws;
            effective!(
                aws_kms_key_id = a.aws_kms_key_id.as_deref().map(display),
                aws_region = a.aws_region.as_deref().map(display),
                aws_endpoint_url = a.aws_endpoint_url.as_deref().map(|u| display(without_userinfo(u))),
                aws_encryption_context_cluster = a.aws_encryption_context_cluster.as_deref().map(display),
                aws_encryption_context_provider = %a.aws_encryption_context_provider,
            );
        }
    }
}

/// A value as its flag spells it (`pkcs11`, `multi-thread`, `approle`).
fn flag_value<T: ValueEnum>(value: T) -> String {
    value
        .to_possible_value()
        .map(|v| v.get_name().to_owned())
        .unwrap_or_default()
}

/// A Vault address as it may be logged: any `user:password@` dropped (a URL may carry credentials),
/// and one that does not parse as a URL not shown at all (the backend refuses it, naming the flag).
fn without_userinfo(addr: &str) -> String {
    let Ok(uri) = addr.trim().parse::<hyper::Uri>() else {
        return "(not a URL)".into();
    };
    match uri.authority() {
        Some(authority) if authority.as_str().contains('@') => {
            let scheme = uri.scheme_str().map(|s| format!("{s}://")).unwrap_or_default();
            let port = uri.port_u16().map(|p| format!(":{p}")).unwrap_or_default();
            let path = uri.path_and_query().map_or("", |p| p.as_str());
            format!("{scheme}{}{port}{path}", authority.host())
        }
        _ => addr.trim().to_owned(),
    }
}

/// A client-supplied string as a log field or in an error text: control characters and quotes
/// escaped (`escape_debug`), at most [`MAX_CLIENT_FIELD`] characters, and the full length noted
/// when cut.
#[derive(Clone, Copy)]
pub struct Client<'a>(pub &'a str);

impl fmt::Display for Client<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut chars = self.0.char_indices();
        for (_, c) in chars.by_ref().take(MAX_CLIENT_FIELD) {
            write!(f, "{}", c.escape_debug())?;
        }
        if let Some((at, _)) = chars.next() {
            write!(f, "…({} more bytes)", self.0.len() - at)?;
        }
        Ok(())
    }
}

impl fmt::Debug for Client<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "\"{self}\"")
    }
}

/// Writes each formatted event to stderr with inner line breaks (and, off a terminal, escape
/// codes) escaped, keeping only the final newline. tracing-subscriber hands over one whole event per
/// `write`, so each call is escaped as a unit.
#[derive(Clone, Copy)]
pub struct OneLine {
    /// Whether ANSI colour is on (then ESC is the formatter's own and passes through).
    pub ansi: bool,
}

impl<'a> MakeWriter<'a> for OneLine {
    type Writer = OneLineWriter<io::Stderr>;

    fn make_writer(&'a self) -> Self::Writer {
        OneLineWriter {
            inner: io::stderr(),
            ansi: self.ansi,
        }
    }
}

/// The writer [`OneLine`] makes; generic so tests can write to a buffer.
pub struct OneLineWriter<W> {
    /// Where escaped events go.
    pub inner: W,
    /// See [`OneLine::ansi`].
    pub ansi: bool,
}

impl<W: Write> Write for OneLineWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let (body, end) = match buf.strip_suffix(b"\n") {
            Some(body) => (body, &b"\n"[..]),
            None => (buf, &b""[..]),
        };
        let clean = |b: &u8| *b != b'\n' && *b != b'\r' && (self.ansi || *b != 0x1b);
        if body.iter().all(clean) {
            self.inner.write_all(buf)?;
            return Ok(buf.len());
        }
        let mut out = Vec::with_capacity(buf.len() + 16);
        for &b in body {
            match b {
                b'\n' => out.extend_from_slice(b"\\n"),
                b'\r' => out.extend_from_slice(b"\\r"),
                0x1b if !self.ansi => out.extend_from_slice(b"\\x1b"),
                b => out.push(b),
            }
        }
        out.extend_from_slice(end);
        self.inner.write_all(&out)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use clap::Parser as _;

    use super::*;
    use crate::config::{Cli, Command};

    /// A log sink for a test subscriber.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// The JSON line [`log_effective_config`] writes for `kleidi serve <flags>`.
    fn effective_config(flags: &[&str]) -> serde_json::Value {
        let cli = Cli::try_parse_from(["kleidi", "serve"].iter().chain(flags)).unwrap();
        let Command::Serve(args) = cli.command else {
            panic!("not serve")
        };
        let logs = Captured::default();
        let writer = logs.clone();
        let subscriber = tracing_subscriber::fmt()
            .json()
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, || log_effective_config(&args));
        let text = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
        assert_eq!(text.lines().count(), 1, "one line: {text}");
        serde_json::from_str(&text).unwrap()
    }

    #[test]
    fn the_effective_config_names_each_setting_and_credential_files_by_path_only() {
        let line = effective_config(&[
            "--backend",
            "vault",
            "--vault-addr",
            "https://kleidi:s3cret-pw@vault.example:8200,http://127.0.0.1:8200",
            "--vault-key",
            "kek",
            "--vault-auth",
            "approle",
            "--vault-role-id-file",
            "/run/kleidi/role-id",
            "--vault-secret-id-file",
            "/run/kleidi/secret-id",
            "--vault-token-file",
            "/run/kleidi/unused-token",
            "--call-timeout",
            "750ms",
        ]);
        let fields = &line["fields"];
        assert_eq!(fields["message"], "effective configuration");
        assert_eq!(fields["backend"], "vault");
        assert_eq!(fields["listen"], "unix:///run/kleidi/kms.sock");
        assert_eq!(fields["socket_mode"], "0600");
        assert_eq!(fields["call_timeout"], "750ms");
        assert_eq!(fields["health_ok_ttl"], "45s");
        assert_eq!(fields["max_connections"], 64);
        assert_eq!(fields["runtime"], "multi-thread");
        assert_eq!(
            fields["vault_addr"],
            "https://vault.example:8200/,http://127.0.0.1:8200"
        );
        assert_eq!(fields["vault_auth"], "approle");
        assert_eq!(fields["vault_secret_id_file"], "/run/kleidi/secret-id");
        // Not read by approle: not part of the effective configuration.
        assert!(fields.get("vault_token_file").is_none(), "{line}");
        assert!(fields.get("pkcs11_pin_file").is_none(), "{line}");
        assert!(!line.to_string().contains("s3cret"), "{line}");

        let line = effective_config(&["--backend", "pkcs11", "--pkcs11-pin-file", "/run/kleidi/pin"]);
        assert_eq!(line["fields"]["pkcs11_pin_file"], "/run/kleidi/pin");
        assert_eq!(line["fields"]["pkcs11_token_label"], "kleidi");
        assert!(line["fields"].get("vault_addr").is_none(), "{line}");
    }

    #[test]
    fn vault_addresses_lose_their_credentials() {
        assert_eq!(
            without_userinfo("https://u:p@[::1]:8200/x"),
            "https://[::1]:8200/x"
        );
        assert_eq!(without_userinfo("http://user@host"), "http://host/");
        assert_eq!(
            without_userinfo(" https://vault.example:8200 "),
            "https://vault.example:8200"
        );
        assert_eq!(without_userinfo("https://pw with space@host"), "(not a URL)");
    }

    #[test]
    fn client_fields_are_escaped_and_cut() {
        assert_eq!(Client("a\nb\"c").to_string(), "a\\nb\\\"c");
        let long = "é".repeat(200);
        let shown = Client(&long).to_string();
        assert!(shown.starts_with(&"é".repeat(MAX_CLIENT_FIELD)));
        assert!(shown.ends_with("…(144 more bytes)"), "{shown}");
        assert_eq!(Client("short").to_string(), "short");
    }

    #[test]
    fn an_event_with_line_breaks_becomes_one_line() {
        let mut w = OneLineWriter {
            inner: Vec::new(),
            ansi: false,
        };
        w.write_all(b"WARN failed: first\nsecond\r\n\x1b[2Jthird\n")
            .unwrap();
        assert_eq!(
            String::from_utf8(w.inner).unwrap(),
            "WARN failed: first\\nsecond\\r\\n\\x1b[2Jthird\n"
        );
    }

    #[test]
    fn colour_passes_through_on_a_terminal() {
        let mut w = OneLineWriter {
            inner: Vec::new(),
            ansi: true,
        };
        w.write_all(b"\x1b[33mWARN\x1b[0m x\n").unwrap();
        assert_eq!(w.inner, b"\x1b[33mWARN\x1b[0m x\n");
    }
}
