//! Command-line flags (each with a `KLEIDI_*` environment equivalent), parsed once into typed
//! values. The flag names are a user-facing contract: manifests in `fixtures/` depend on them.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::grpc::StatusVersion;
use crate::health::HealthTtl;
use crate::server::Endpoint;

/// kleidi: a KMS v2 plugin for kube-apiserver that keeps the key-encryption key in an HSM, Vault/OpenBao, a TPM or AWS KMS.
#[derive(Debug, Parser)]
#[command(name = "kleidi", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
    /// Log format on stderr.
    #[arg(long, env = "KLEIDI_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
    /// Read credential files (PIN, token, secret_id, JWT, TPM auth, Vault client key) even when
    /// other users can read or change them (group/other mode bits, another owner than kleidi's user
    /// or root): a warning instead of a refusal.
    #[arg(long, env = "KLEIDI_ALLOW_INSECURE_CREDENTIAL_FILES", global = true)]
    pub allow_insecure_credential_files: bool,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the KMS v2 and v1beta1 services on a Unix socket.
    Serve(Box<ServeArgs>),
    /// Preflight before kube-apiserver uses kleidi: with serve's flags, check the socket's
    /// directory, connect and log in to the backend, encrypt and decrypt once, print what was
    /// found. Exit 0 only when every check passes.
    Check(Box<CheckArgs>),
    /// PKCS#11 token administration.
    #[command(subcommand)]
    Pkcs11(Pkcs11Command),
    /// TPM 2.0 key administration.
    #[command(subcommand)]
    Tpm(TpmCommand),
}

/// `kleidi tpm …`
#[derive(Debug, Subcommand)]
pub enum TpmCommand {
    /// Create a new key-encryption key in the TPM and make it current. Run again to rotate: older
    /// keys stay in the state directory and keep decrypting.
    Init {
        /// TPM and state directory.
        #[command(flatten)]
        tpm: TpmArgs,
        /// Make a KEK other control-plane nodes can import, with the approval of the admin key
        /// named by --admin-pub (otherwise the key never leaves this TPM).
        #[arg(long, requires = "admin_pub")]
        shareable: bool,
        /// The admin's public key (`kleidi tpm admin-key` writes it as FILE.pub).
        #[arg(long, requires = "shareable")]
        admin_pub: Option<PathBuf>,
    },
    /// Offline, on the administrator's machine: create the signing key that approves nodes
    /// (FILE, keep it offline) and its public part (FILE.pub). Needs no TPM.
    AdminKey {
        /// Where to write the private key (never overwritten); the public key goes to FILE.pub.
        #[arg(long)]
        out: PathBuf,
    },
    /// On a new node: write the public part of this TPM's storage parent, for `approve` and `export`.
    ExportParent {
        /// TPM and state directory.
        #[command(flatten)]
        tpm: TpmArgs,
        /// Where to write the parent file.
        #[arg(long)]
        out: PathBuf,
    },
    /// Offline, with the admin key: approve sharing KEKs with the node whose parent file is given.
    Approve {
        /// The admin's private key (`kleidi tpm admin-key`).
        #[arg(long)]
        admin_key: PathBuf,
        /// The new node's parent file (`kleidi tpm export-parent`).
        #[arg(long)]
        to: PathBuf,
        /// Where to write the approval.
        #[arg(long)]
        out: PathBuf,
    },
    /// On a node holding a shareable KEK: wrap it, inside the TPM, to an approved node's parent.
    Export {
        /// TPM and state directory.
        #[command(flatten)]
        tpm: TpmArgs,
        /// The target node's parent file (`kleidi tpm export-parent`).
        #[arg(long)]
        to: PathBuf,
        /// The admin's approval for that parent (`kleidi tpm approve`).
        #[arg(long)]
        approval: PathBuf,
        /// Where to write the wrapped key.
        #[arg(long)]
        out: PathBuf,
        /// The key to export (default: the current one).
        #[arg(long)]
        key_id: Option<String>,
    },
    /// On the new node: import a KEK exported to it and make it current.
    Import {
        /// TPM and state directory.
        #[command(flatten)]
        tpm: TpmArgs,
        /// The file `kleidi tpm export` wrote for this node.
        file: PathBuf,
    },
}

/// `kleidi pkcs11 …`
#[derive(Debug, Subcommand)]
pub enum Pkcs11Command {
    /// Initialize the token (if no token has the label) and generate the key (if absent). Idempotent.
    Init {
        /// Token, PIN and key.
        #[command(flatten)]
        pkcs11: Pkcs11Args,
        /// File holding the security officer PIN, used only if the token must be initialized.
        #[arg(long, env = "KLEIDI_PKCS11_SO_PIN_FILE")]
        pkcs11_so_pin_file: PathBuf,
    },
}

/// Log output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Which key service wraps the seeds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum BackendKind {
    /// A PKCS#11 token (HSM; SoftHSM in development).
    Pkcs11,
    /// HashiCorp Vault or OpenBao transit.
    Vault,
    /// A TPM 2.0.
    Tpm,
    /// An AWS KMS key (cargo feature `aws-kms`).
    AwsKms,
}

/// `kleidi serve` flags.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Socket to listen on: unix:///path, /path, or unix:///@name (abstract).
    #[arg(long, env = "KLEIDI_LISTEN", default_value = "unix:///run/kleidi/kms.sock")]
    pub listen: Endpoint,
    /// Socket file mode, octal. kube-apiserver runs as root in most clusters; widen only with a group.
    #[arg(long, env = "KLEIDI_SOCKET_MODE", default_value = "0600", value_parser = parse_mode)]
    pub socket_mode: u32,
    /// Key service.
    #[arg(long, env = "KLEIDI_BACKEND", value_enum)]
    pub backend: BackendKind,
    /// StatusResponse.version: v2 for kube-apiserver >= 1.29, v2beta1 for 1.27 and 1.28.
    #[arg(long, env = "KLEIDI_STATUS_VERSION", value_enum, default_value_t = StatusVersion::V2)]
    pub status_version: StatusVersion,
    /// Bound on each backend call; keep it below the apiserver's KMS timeout (default 3s).
    #[arg(long, env = "KLEIDI_CALL_TIMEOUT", default_value = "2s", value_parser = humantime::parse_duration)]
    pub call_timeout: Duration,
    /// How long a successful health probe is trusted; a later probe is one key check.
    #[arg(long, env = "KLEIDI_HEALTH_OK_TTL", default_value = "45s", value_parser = humantime::parse_duration)]
    pub health_ok_ttl: Duration,
    /// How long encrypt and decrypt, once seen working with the current key (by a probe or a real
    /// call), go unchecked before a probe adds an encrypt + decrypt round trip.
    #[arg(long, env = "KLEIDI_HEALTH_ROUNDTRIP_INTERVAL", default_value = "5m", value_parser = humantime::parse_duration)]
    pub health_roundtrip_interval: Duration,
    /// How long a failed health probe is trusted before probing again.
    #[arg(long, env = "KLEIDI_HEALTH_ERR_TTL", default_value = "5s", value_parser = humantime::parse_duration)]
    pub health_err_ttl: Duration,
    /// On SIGTERM/SIGINT, how long in-flight calls may take to finish.
    #[arg(long, env = "KLEIDI_SHUTDOWN_GRACE", default_value = "5s", value_parser = humantime::parse_duration)]
    pub shutdown_grace: Duration,
    /// Connections served at once; a further one is closed as soon as it is accepted. An
    /// apiserver keeps one per KMS provider; the rest is room for reconnects and probes.
    #[arg(long, env = "KLEIDI_MAX_CONNECTIONS", default_value = "64", value_parser = clap::value_parser!(u16).range(1..))]
    pub max_connections: u16,
    /// A connection that moves no byte for this long is sent a GOAWAY and closed (clients
    /// reconnect on their next call); the apiserver polls Status at least once a minute.
    #[arg(long, env = "KLEIDI_IDLE_TIMEOUT", default_value = "5m", value_parser = parse_nonzero_duration)]
    pub idle_timeout: Duration,
    /// Tokio runtime serving the socket: multi-thread (--worker-threads workers, default one per
    /// core) or current-thread (one thread; blocking backend calls still run on their own pool).
    #[arg(long, env = "KLEIDI_SERVE_RUNTIME", value_enum, default_value_t = RuntimeKind::MultiThread)]
    pub runtime: RuntimeKind,
    /// Worker threads of the multi-thread runtime; default one per core.
    #[arg(long, env = "KLEIDI_WORKER_THREADS", value_parser = clap::value_parser!(u16).range(1..))]
    pub worker_threads: Option<u16>,
    /// Serve Prometheus metrics (/metrics) and the health endpoints /livez and /readyz over plain
    /// HTTP on this address, e.g. 127.0.0.1:9464 (port 0: any free port, logged). Off by default.
    #[arg(long, env = "KLEIDI_METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,
    /// Accept a --metrics-addr that is not loopback. The endpoints have no authentication and no
    /// TLS, and metrics tell whoever can connect the current key's hash, call rates, error
    /// classes and credential lifetimes: only where the network itself restricts who connects.
    #[arg(long, env = "KLEIDI_METRICS_ALLOW_NON_LOOPBACK", requires = "metrics_addr")]
    pub metrics_allow_non_loopback: bool,
    /// PKCS#11 settings (with --backend pkcs11).
    #[command(flatten)]
    pub pkcs11: Pkcs11Args,
    /// Vault / OpenBao transit settings (with --backend vault).
    #[command(flatten)]
    pub vault: VaultArgs,
    /// TPM 2.0 settings (with --backend tpm).
    #[command(flatten)]
    pub tpm: TpmArgs,
    /// AWS KMS settings (with --backend aws-kms).
    #[command(flatten)]
    pub aws: AwsArgs,
}

/// The tokio runtime `kleidi serve` runs on (`--runtime`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum RuntimeKind {
    /// Work-stealing pool of worker threads.
    MultiThread,
    /// Everything on the main thread.
    CurrentThread,
}

impl ServeArgs {
    /// The health cache lifetimes.
    pub fn health_ttl(&self) -> HealthTtl {
        HealthTtl {
            ok: self.health_ok_ttl,
            roundtrip: self.health_roundtrip_interval,
            err: self.health_err_ttl,
            // Each of the probe's three calls has its own call timeout; the probe as a whole may
            // take all three (Status answers from the earlier verdict meanwhile).
            probe_timeout: self.call_timeout * 3,
            answer_within: HealthTtl::default().answer_within,
        }
    }
}

impl ServeArgs {
    /// How old a healthy verdict `/readyz` still accepts: two `--health-ok-ttl`, and never less
    /// than one TTL plus a whole probe and Status's wait. A verdict is renewed once per TTL (by
    /// Status, or by `/readyz` itself), so only a probe stuck beyond its own bound, or a wedged
    /// runtime, lets it grow older; a single late probe does not flap readiness.
    pub fn ready_max_age(&self) -> Duration {
        let ttl = self.health_ttl();
        (ttl.ok * 2).max(ttl.ok + ttl.probe_timeout + ttl.answer_within)
    }
}

/// `kleidi check` flags: every `serve` flag (so a serve command line checks unchanged; the socket
/// and backend flags are the ones checked), and the report's format.
#[derive(Debug, Args)]
pub struct CheckArgs {
    /// How to print the findings.
    #[arg(long, env = "KLEIDI_CHECK_OUTPUT", value_enum, default_value_t = OutputFormat::Text)]
    pub output: OutputFormat,
    /// The flags `kleidi serve` would run with.
    #[command(flatten)]
    pub serve: ServeArgs,
}

/// Report format of `kleidi check`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    /// Aligned lines for a person.
    Text,
    /// One JSON document, for automation.
    Json,
}

/// PKCS#11 flags, shared by `serve` and `pkcs11 init`.
#[derive(Debug, Args, Clone)]
pub struct Pkcs11Args {
    /// The PKCS#11 module (shared library).
    #[arg(
        long,
        env = "KLEIDI_PKCS11_MODULE",
        default_value = "/usr/lib/softhsm/libsofthsm2.so"
    )]
    pub pkcs11_module: PathBuf,
    /// Label of the token holding the key.
    #[arg(long, env = "KLEIDI_PKCS11_TOKEN_LABEL", default_value = "kleidi")]
    pub pkcs11_token_label: String,
    /// File holding the user PIN (one line).
    // Required with --backend pkcs11 and by `pkcs11 init`; checked when the backend is built, since
    // `pkcs11 init` has no --backend for clap to condition on.
    #[arg(long, env = "KLEIDI_PKCS11_PIN_FILE")]
    pub pkcs11_pin_file: Option<PathBuf>,
    /// Label of the current AES-256 key-encryption key. Rotate by naming a new key; old keys still decrypt.
    #[arg(long, env = "KLEIDI_PKCS11_KEY_LABEL", default_value = "kleidi-kek")]
    pub pkcs11_key_label: String,
}

/// TPM flags, shared by `serve` and `tpm init`.
#[derive(Debug, Args, Clone)]
pub struct TpmArgs {
    /// TCTI of the TPM: device:/dev/tpmrm0 on hardware, swtpm:host=127.0.0.1,port=2321 for swtpm.
    // Required with --backend tpm and by `tpm init`; checked when the backend is built.
    #[arg(long, env = "KLEIDI_TPM_TCTI")]
    pub tpm_tcti: Option<String>,
    /// Directory of the TPM-wrapped key blobs (useless without this TPM) and the current key's id.
    #[arg(long, env = "KLEIDI_TPM_STATE_DIR", default_value = "/var/lib/kleidi/tpm")]
    pub tpm_state_dir: PathBuf,
    /// File holding the owner hierarchy's auth value, if one is set (default: empty, as TPMs ship).
    #[arg(long, env = "KLEIDI_TPM_OWNER_AUTH_FILE")]
    pub tpm_owner_auth_file: Option<PathBuf>,
}

/// How kleidi logs in to Vault / OpenBao.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum VaultAuth {
    /// A token read from --vault-token-file (re-read when the file changes).
    Token,
    /// AppRole: --vault-role-id-file and --vault-secret-id-file.
    Approle,
    /// JWT/OIDC auth with a token file (projected or externally issued) and --vault-role.
    Jwt,
    /// TLS client certificate (--vault-client-cert, --vault-client-key), optional --vault-role.
    Cert,
    /// Kubernetes auth: a ServiceAccount token and --vault-role. DaemonSet only: a static pod has no
    /// ServiceAccount, and TokenReview needs the apiserver kleidi serves.
    Kubernetes,
}

/// Vault / OpenBao transit flags. Credentials are always read from files, never from flags.
#[derive(Debug, Args, Clone)]
pub struct VaultArgs {
    /// Vault address; repeat for several servers (HA without a load balancer; each tried at most once per
    /// call, all within the call's deadline).
    #[arg(
        long = "vault-addr",
        env = "KLEIDI_VAULT_ADDR",
        value_delimiter = ',',
        required_if_eq("backend", "vault")
    )]
    pub vault_addr: Vec<String>,
    /// Mount path of the transit secrets engine.
    #[arg(long, env = "KLEIDI_VAULT_TRANSIT_MOUNT", default_value = "transit")]
    pub vault_transit_mount: String,
    /// Transit key name. It must exist: kleidi never creates keys.
    #[arg(long, env = "KLEIDI_VAULT_KEY", required_if_eq("backend", "vault"))]
    pub vault_key: Option<String>,
    /// Auth method.
    #[arg(long, env = "KLEIDI_VAULT_AUTH", value_enum, default_value_t = VaultAuth::Token)]
    pub vault_auth: VaultAuth,
    /// Mount path of the auth method (default: the method's name, e.g. approle, jwt, cert, kubernetes).
    #[arg(long, env = "KLEIDI_VAULT_AUTH_MOUNT")]
    pub vault_auth_mount: Option<String>,
    /// File holding a Vault token (auth token).
    #[arg(long, env = "KLEIDI_VAULT_TOKEN_FILE")]
    pub vault_token_file: Option<PathBuf>,
    /// File holding the AppRole role_id.
    #[arg(long, env = "KLEIDI_VAULT_ROLE_ID_FILE")]
    pub vault_role_id_file: Option<PathBuf>,
    /// File holding the AppRole secret_id.
    #[arg(long, env = "KLEIDI_VAULT_SECRET_ID_FILE")]
    pub vault_secret_id_file: Option<PathBuf>,
    /// File holding the JWT (auth jwt) or ServiceAccount token (auth kubernetes).
    #[arg(long, env = "KLEIDI_VAULT_JWT_FILE")]
    pub vault_jwt_file: Option<PathBuf>,
    /// Role to log in as (jwt, kubernetes, cert).
    #[arg(long, env = "KLEIDI_VAULT_ROLE")]
    pub vault_role: Option<String>,
    /// CA bundle (PEM) to verify Vault's certificate; verification is always on.
    #[arg(long, env = "KLEIDI_VAULT_CA_FILE")]
    pub vault_ca_file: Option<PathBuf>,
    /// TLS server name to verify, when it differs from the address's host.
    #[arg(long, env = "KLEIDI_VAULT_SERVER_NAME")]
    pub vault_server_name: Option<String>,
    /// Client certificate (PEM) for TLS and auth cert; re-read when it changes.
    #[arg(long, env = "KLEIDI_VAULT_CLIENT_CERT")]
    pub vault_client_cert: Option<PathBuf>,
    /// Client key (PEM) for TLS and auth cert.
    #[arg(long, env = "KLEIDI_VAULT_CLIENT_KEY")]
    pub vault_client_key: Option<PathBuf>,
    /// Vault Enterprise / OpenBao namespace.
    #[arg(long, env = "KLEIDI_VAULT_NAMESPACE")]
    pub vault_namespace: Option<String>,
    /// Accept an http:// --vault-addr whose host is not loopback (token, credentials and seeds then
    /// cross the network unencrypted): only where the path is protected otherwise.
    #[arg(long, env = "KLEIDI_VAULT_ALLOW_PLAIN_HTTP")]
    pub vault_allow_plain_http: bool,
}

/// AWS KMS flags. Credentials come only from the standard AWS chain (environment, shared files,
/// web identity / IRSA, EKS Pod Identity, ECS, instance profile), never from a flag.
#[derive(Debug, Args, Clone)]
pub struct AwsArgs {
    /// The KMS key: its ARN, or an alias (`alias/NAME` or the alias ARN). With an alias, moving it
    /// to another key changes the current key; old seeds keep decrypting with the key that wrapped them.
    #[arg(long, env = "KLEIDI_AWS_KMS_KEY_ID", required_if_eq("backend", "aws-kms"))]
    pub aws_kms_key_id: Option<String>,
    /// Region of the key (default: the ARN's region, else the standard chain: AWS_REGION, profile,
    /// instance metadata).
    #[arg(long, env = "KLEIDI_AWS_REGION")]
    pub aws_region: Option<String>,
    /// KMS endpoint, for VPC endpoints and local servers (https://, or http:// on loopback only).
    #[arg(long, env = "KLEIDI_AWS_ENDPOINT_URL")]
    pub aws_endpoint_url: Option<String>,
    /// This cluster's name in the encryption context (`kleidi.dev/cluster`) of every wrapped seed:
    /// a seed wrapped for one cluster does not decrypt in another. Never change it for a cluster.
    #[arg(
        long,
        env = "KLEIDI_AWS_ENCRYPTION_CONTEXT_CLUSTER",
        required_if_eq("backend", "aws-kms")
    )]
    pub aws_encryption_context_cluster: Option<String>,
    /// The KMS provider's name in the encryption context (`kleidi.dev/provider`): the `name` of the
    /// kms provider in kube-apiserver's EncryptionConfiguration. Never change it for a provider.
    #[arg(
        long,
        env = "KLEIDI_AWS_ENCRYPTION_CONTEXT_PROVIDER",
        default_value = "kleidi"
    )]
    pub aws_encryption_context_provider: String,
}

fn parse_nonzero_duration(s: &str) -> Result<Duration, String> {
    match humantime::parse_duration(s) {
        Ok(d) if d.is_zero() => Err(format!("{s:?}: must be longer than zero")),
        Ok(d) => Ok(d),
        Err(e) => Err(format!("{s:?}: {e}")),
    }
}

fn parse_mode(s: &str) -> Result<u32, String> {
    let mode = u32::from_str_radix(s.trim_start_matches("0o"), 8)
        .map_err(|e| format!("{s:?} is not an octal mode: {e}"))?;
    if mode & !0o777 != 0 {
        return Err(format!("{s:?}: only permission bits (0777) are allowed"));
    }
    if mode & 0o007 != 0 {
        return Err(format!(
            "{s:?}: refusing a socket other users can reach; use a group (0660)"
        ));
    }
    Ok(mode)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serve_flags_parse_into_typed_values() {
        let cli = Cli::try_parse_from([
            "kleidi",
            "serve",
            "--listen",
            "unix:///run/kleidi/kms.sock",
            "--backend",
            "pkcs11",
            "--pkcs11-module",
            "/m.so",
            "--pkcs11-token-label",
            "t",
            "--pkcs11-pin-file",
            "/p",
            "--pkcs11-key-label",
            "k",
            "--call-timeout",
            "750ms",
            "--socket-mode",
            "0660",
        ])
        .unwrap();
        let Command::Serve(s) = cli.command else {
            panic!("not serve")
        };
        assert_eq!(s.listen, Endpoint::Path("/run/kleidi/kms.sock".into()));
        assert_eq!(s.call_timeout, Duration::from_millis(750));
        assert_eq!(s.socket_mode, 0o660);
        assert_eq!(
            s.pkcs11.pkcs11_pin_file.as_deref(),
            Some(std::path::Path::new("/p"))
        );
    }

    #[test]
    fn connection_bounds_default_to_64_and_5m_and_refuse_zero() {
        let serve = |extra: &[&str]| {
            let mut args = vec!["kleidi", "serve", "--backend", "pkcs11"];
            args.extend_from_slice(extra);
            Cli::try_parse_from(args).map(|cli| match cli.command {
                Command::Serve(s) => (s.max_connections, s.idle_timeout),
                _ => panic!("not serve"),
            })
        };
        assert_eq!(serve(&[]).unwrap(), (64, Duration::from_secs(300)));
        assert_eq!(
            serve(&["--max-connections", "2", "--idle-timeout", "1500ms"]).unwrap(),
            (2, Duration::from_millis(1500))
        );
        assert!(serve(&["--max-connections", "0"]).is_err());
        assert!(serve(&["--idle-timeout", "0s"]).is_err());
    }

    #[test]
    fn metrics_are_off_unless_an_address_is_given() {
        let serve = |extra: &[&str]| {
            let mut args = vec!["kleidi", "serve", "--backend", "pkcs11"];
            args.extend_from_slice(extra);
            Cli::try_parse_from(args).map(|cli| match cli.command {
                Command::Serve(s) => (s.metrics_addr, s.metrics_allow_non_loopback, s.ready_max_age()),
                _ => panic!("not serve"),
            })
        };
        assert_eq!(serve(&[]).unwrap(), (None, false, Duration::from_secs(90)));
        let (addr, allow, _) = serve(&["--metrics-addr", "127.0.0.1:9464"]).unwrap();
        assert_eq!(
            (addr.map(|a| a.to_string()), allow),
            (Some("127.0.0.1:9464".into()), false)
        );
        assert!(
            serve(&["--metrics-addr", "localhost:9464"]).is_err(),
            "an IP, not a name"
        );
        assert!(
            serve(&["--metrics-allow-non-loopback"]).is_err(),
            "needs --metrics-addr"
        );
        // A short TTL still leaves room for a whole probe and Status's wait.
        let (_, _, max_age) = serve(&["--health-ok-ttl", "1s"]).unwrap();
        assert_eq!(max_age, Duration::from_secs(1 + 6 + 2));
    }

    #[test]
    fn world_accessible_socket_modes_are_refused() {
        assert!(parse_mode("0666").is_err());
        assert!(parse_mode("0600").is_ok());
        assert!(parse_mode("1777").is_err());
    }

    #[test]
    fn pkcs11_init_parses_without_a_backend_flag() {
        let cli = Cli::try_parse_from([
            "kleidi",
            "pkcs11",
            "init",
            "--pkcs11-pin-file",
            "/p",
            "--pkcs11-so-pin-file",
            "/so",
        ])
        .unwrap();
        assert!(matches!(cli.command, Command::Pkcs11(Pkcs11Command::Init { .. })));
    }

    #[test]
    fn check_takes_the_serve_flags_and_an_output_format() {
        let cli = Cli::try_parse_from([
            "kleidi",
            "check",
            "--backend",
            "vault",
            "--vault-addr",
            "https://v:8200",
            "--vault-key",
            "kek",
            "--listen",
            "/run/k/kms.sock",
            "--socket-mode",
            "0660",
            "--call-timeout",
            "1s",
            "--output",
            "json",
        ])
        .unwrap();
        let Command::Check(c) = cli.command else {
            panic!("not check")
        };
        assert_eq!(c.output, OutputFormat::Json);
        assert_eq!(c.serve.backend, BackendKind::Vault);
        assert_eq!(c.serve.listen, Endpoint::Path("/run/k/kms.sock".into()));
        assert_eq!(
            (c.serve.socket_mode, c.serve.call_timeout),
            (0o660, Duration::from_secs(1))
        );
        assert_eq!(c.serve.vault.vault_addr, ["https://v:8200"]);
        // As for serve: a vault backend without its key is refused by clap.
        assert!(
            Cli::try_parse_from([
                "kleidi",
                "check",
                "--backend",
                "vault",
                "--vault-addr",
                "https://v"
            ])
            .is_err()
        );
    }

    #[test]
    fn clap_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
