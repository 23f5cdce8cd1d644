//! Logging in to Vault and keeping the token alive: credentials are read from files at every login
//! (so rotated secret_ids, projected JWTs and replaced token files are picked up; a token file is
//! also watched, and a renewed client certificate makes cert auth log in again), the token is
//! renewed at two thirds of its lease (a non-renewable one is replaced then), and kleidi logs in
//! again when renewal stops extending it (max_ttl) or Vault refuses it (revoked). A failed login
//! never ends the process: calls answer Denied or Unavailable and a later call or the background
//! loop tries again, at most once a second. Tokens live only in [`SecretString`]s and are never
//! logged.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};
use vaultrs::api::AuthInfo;

use super::api;
use super::client::{BoxFut, Call, Nodes, Op, clone_error};
use crate::config::{VaultArgs, VaultAuth};
use crate::{Error, Result};

/// The least time between two logins: N concurrent calls refused at once cause one login, and a
/// wrong policy does not turn every call into a login.
const LOGIN_INTERVAL: Duration = Duration::from_secs(1);
/// The longest the background loop sleeps (it also watches the token file).
const TICK: Duration = Duration::from_secs(1);
/// Where a pod's ServiceAccount token is mounted: the `--vault-jwt-file` of `--vault-auth kubernetes`
/// when the flag is not given (never for `jwt`, whose issuer is not Kubernetes).
pub const SERVICE_ACCOUNT_TOKEN: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";

/// A token to send with one call, and which login produced it.
#[derive(Clone)]
pub(super) struct Token {
    /// The Vault token.
    pub secret: Arc<SecretString>,
    /// Increases with every login, so a refused call asks for a newer token, not another login.
    pub generation: u64,
}

/// How kleidi proves who it is; every secret stays in its file until a login reads it.
enum Credentials {
    Token {
        file: PathBuf,
    },
    AppRole {
        mount: String,
        role_id: PathBuf,
        secret_id: PathBuf,
    },
    Jwt {
        mount: String,
        role: String,
        file: PathBuf,
    },
    Cert {
        mount: String,
        role: Option<String>,
    },
    Kubernetes {
        mount: String,
        role: String,
        file: PathBuf,
    },
}

#[derive(Default)]
struct State {
    token: Option<Token>,
    generation: u64,
    /// When the lease below was granted (login or renewal).
    refreshed: Option<Instant>,
    /// The lease granted then; `None` for a token that never expires.
    lease: Option<Duration>,
    renewable: bool,
    /// The lease the last login granted: a renewal that grants less has hit max_ttl.
    login_lease: Option<Duration>,
    /// Set once renewal stops extending the token: log in again by then.
    relogin_at: Option<Instant>,
    last_login: Option<Instant>,
    /// The last login's failure, answered without a new attempt until [`LOGIN_INTERVAL`] passes.
    failure: Option<Error>,
    /// Digest of the token file's content (token auth), to notice a replaced token.
    file_digest: Option<[u8; 32]>,
}

impl State {
    fn expired(&self, now: Instant) -> bool {
        match (self.refreshed, self.lease) {
            (Some(at), Some(lease)) => now >= at + lease,
            _ => false,
        }
    }
}

/// The login state shared by every call and the background renewal loop.
pub(super) struct Session {
    creds: Credentials,
    state: Mutex<State>,
    login: tokio::sync::Mutex<()>,
}

impl Session {
    /// Checks that the flags for the chosen method are all there (files are read at login).
    pub(super) fn new(args: &VaultArgs) -> Result<Self> {
        let mount = |default: &str| {
            args.vault_auth_mount
                .clone()
                .unwrap_or_else(|| default.to_string())
                .trim_matches('/')
                .to_string()
        };
        let need = |value: &Option<PathBuf>, flag: &str| {
            value
                .clone()
                .ok_or_else(|| Error::Config(format!("--vault-auth needs {flag}")))
        };
        let role = || {
            args.vault_role
                .clone()
                .ok_or_else(|| Error::Config("--vault-auth needs --vault-role".into()))
        };
        let creds = match args.vault_auth {
            VaultAuth::Token => Credentials::Token {
                file: need(&args.vault_token_file, "--vault-token-file")?,
            },
            VaultAuth::Approle => Credentials::AppRole {
                mount: mount("approle"),
                role_id: need(&args.vault_role_id_file, "--vault-role-id-file")?,
                secret_id: need(&args.vault_secret_id_file, "--vault-secret-id-file")?,
            },
            VaultAuth::Jwt => Credentials::Jwt {
                mount: mount("jwt"),
                role: role()?,
                file: need(&args.vault_jwt_file, "--vault-jwt-file")?,
            },
            VaultAuth::Cert => {
                need(&args.vault_client_cert, "--vault-client-cert")?;
                Credentials::Cert {
                    mount: mount("cert"),
                    role: args.vault_role.clone(),
                }
            }
            VaultAuth::Kubernetes => Credentials::Kubernetes {
                mount: mount("kubernetes"),
                role: role()?,
                file: args
                    .vault_jwt_file
                    .clone()
                    .unwrap_or_else(|| PathBuf::from(SERVICE_ACCOUNT_TOKEN)),
            },
        };
        Ok(Self {
            creds,
            state: Mutex::new(State::default()),
            login: tokio::sync::Mutex::new(()),
        })
    }

    /// A token to call with: the current one while its lease lasts, else a fresh login.
    pub(super) async fn token(&self, nodes: &Nodes, deadline: Instant) -> Result<Token> {
        let stale = {
            let state = self.lock();
            match &state.token {
                Some(token) if !state.expired(Instant::now()) => return Ok(token.clone()),
                _ => state.generation,
            }
        };
        self.login(nodes, stale, deadline).await
    }

    /// Logs in again because the token of generation `stale` was refused or ran out, unless another
    /// call already did (a newer generation) or a login ran less than [`LOGIN_INTERVAL`] ago.
    pub(super) async fn login(&self, nodes: &Nodes, stale: u64, deadline: Instant) -> Result<Token> {
        let _one_at_a_time = self.login.lock().await;
        {
            let state = self.lock();
            let recent = state.last_login.is_some_and(|at| at.elapsed() < LOGIN_INTERVAL);
            if state.generation > stale || recent {
                if let Some(failure) = &state.failure {
                    return Err(clone_error(failure));
                }
                if let Some(token) = &state.token {
                    return Ok(token.clone());
                }
            }
        }
        let outcome = self.fresh_login(nodes, deadline).await;
        let mut state = self.lock();
        let now = Instant::now();
        state.last_login = Some(now);
        match outcome {
            Ok((secret, info, digest)) => {
                state.generation += 1;
                let token = Token {
                    secret: Arc::new(secret),
                    generation: state.generation,
                };
                state.token = Some(token.clone());
                state.refreshed = Some(now);
                state.lease = info.lease;
                state.login_lease = info.lease;
                state.renewable = info.renewable;
                state.relogin_at = None;
                state.failure = None;
                state.file_digest = digest;
                tracing::info!(
                    method = self.creds.method(),
                    lease_s = info.lease.map(|l| l.as_secs()),
                    renewable = info.renewable,
                    "vault: logged in"
                );
                Ok(token)
            }
            Err(err) => {
                tracing::warn!(method = self.creds.method(), class = err.class(), error = %err, "vault: login failed; will retry");
                state.failure = Some(clone_error(&err));
                Err(err)
            }
        }
    }

    /// One step of the background loop: log in again or renew when due, pick up a replaced token
    /// file or client certificate. Returns how long to sleep before the next step.
    pub(super) async fn maintain(&self, nodes: &Nodes) -> Duration {
        let tls_changed = nodes.reload_tls_if_changed();
        let now = Instant::now();
        let (generation, action) = {
            let state = self.lock();
            // Renew (or, for a token renewal cannot extend, log in again) at two thirds of the lease.
            let refresh_at = match (state.refreshed, state.lease) {
                (Some(at), Some(lease)) => Some(at + lease * 2 / 3),
                _ => None,
            };
            let refresh_due = refresh_at.is_some_and(|at| now >= at);
            let action = if state.token.is_none()
                || state.expired(now)
                || state.relogin_at.is_some_and(|at| now >= at)
            {
                Action::Login
            } else if tls_changed && matches!(self.creds, Credentials::Cert { .. }) {
                // The identity is the certificate: log in with the new one.
                Action::Login
            } else if matches!(self.creds, Credentials::Token { .. })
                && read_digest(&self.creds).is_some_and(|d| Some(d) != state.file_digest)
            {
                tracing::info!("vault: token file changed; reading it");
                Action::Login
            } else if state.renewable && state.relogin_at.is_none() && refresh_due {
                Action::Renew
            } else if !state.renewable && self.creds.can_login() && refresh_due {
                // A batch or otherwise non-renewable token: replace it before it runs out.
                Action::Login
            } else {
                let next = [refresh_at, state.relogin_at].into_iter().flatten().min();
                let wait = next.map_or(TICK, |at| at.saturating_duration_since(now));
                return wait.min(TICK).max(Duration::from_millis(50));
            };
            (state.generation, action)
        };
        match action {
            Action::Login => {
                // The failure is logged inside and answered to calls; the loop just tries again
                // (login itself runs at most once per LOGIN_INTERVAL).
                let _ = self.login(nodes, generation, nodes.deadline()).await;
                Duration::from_millis(50)
            }
            // A renewal that failed (Vault down) is retried a tick later, not in a tight loop.
            Action::Renew if self.renew(nodes, generation).await => Duration::from_millis(50),
            Action::Renew => TICK,
        }
    }

    /// Renews the token; false if Vault could not be asked (try again later).
    async fn renew(&self, nodes: &Nodes, generation: u64) -> bool {
        let Some(token) = self.lock().token.clone() else {
            return true;
        };
        let f = |call: Call| -> BoxFut<AuthInfo> {
            Box::pin(async move { vaultrs::token::renew_self(&call, None).await })
        };
        let deadline = nodes.deadline();
        match nodes.send(Op::Auth, Some(&token.secret), deadline, &f).await {
            Ok(info) => {
                let mut state = self.lock();
                if state.generation != generation {
                    return true;
                }
                let now = Instant::now();
                let lease = Duration::from_secs(info.lease_duration);
                state.refreshed = Some(now);
                state.lease = Some(lease);
                state.renewable = info.renewable;
                // A renewal that grants less than the login did has reached the token's max_ttl:
                // log in again before it runs out (token auth cannot; it waits for a new file).
                if state.login_lease.is_some_and(|l| lease < l) && self.creds.can_login() {
                    state.relogin_at = Some(now + lease / 2);
                    tracing::info!(
                        lease_s = lease.as_secs(),
                        "vault: token near max_ttl; will log in again"
                    );
                } else {
                    tracing::debug!(lease_s = lease.as_secs(), "vault: token renewed");
                }
                true
            }
            Err(err @ Error::Denied { .. }) => {
                tracing::warn!(class = err.class(), error = %err, "vault: renewal refused; logging in again");
                let _ = self.login(nodes, generation, deadline).await;
                true
            }
            Err(err) => {
                tracing::warn!(class = err.class(), error = %err, "vault: renewal failed; will retry");
                false
            }
        }
    }

    /// Reads the credentials and exchanges them for a token (for token auth: reads the file and asks
    /// Vault how long the token lives).
    async fn fresh_login(
        &self,
        nodes: &Nodes,
        deadline: Instant,
    ) -> Result<(SecretString, Lease, Option<[u8; 32]>)> {
        match &self.creds {
            Credentials::Token { file } => {
                let token = read_secret(file, "--vault-token-file")?;
                let digest = Some(digest(&token));
                let f = |call: Call| -> BoxFut<api::TokenInfo> {
                    Box::pin(async move { vaultrs::api::exec_with_result(&call, api::LookupSelf {}).await })
                };
                let info = nodes.send(Op::Auth, Some(&token), deadline, &f).await?;
                let lease = Lease {
                    lease: (info.ttl > 0).then(|| Duration::from_secs(info.ttl)),
                    renewable: info.renewable.unwrap_or(false),
                };
                Ok((token, lease, digest))
            }
            Credentials::AppRole {
                mount,
                role_id,
                secret_id,
            } => {
                let role_id = Arc::new(read_secret(role_id, "--vault-role-id-file")?);
                let secret_id = Arc::new(read_secret(secret_id, "--vault-secret-id-file")?);
                let mount = mount.clone();
                let f = move |call: Call| -> BoxFut<AuthInfo> {
                    let (mount, role_id, secret_id) = (mount.clone(), role_id.clone(), secret_id.clone());
                    Box::pin(async move {
                        vaultrs::auth::approle::login(
                            &call,
                            &mount,
                            role_id.expose_secret(),
                            secret_id.expose_secret(),
                        )
                        .await
                    })
                };
                auth_info(nodes.send(Op::Auth, None, deadline, &f).await?)
            }
            Credentials::Jwt { mount, role, file } | Credentials::Kubernetes { mount, role, file } => {
                let jwt = Arc::new(read_secret(file, "--vault-jwt-file")?);
                let (mount, role) = (mount.clone(), role.clone());
                let kubernetes = matches!(self.creds, Credentials::Kubernetes { .. });
                let f = move |call: Call| -> BoxFut<AuthInfo> {
                    let (mount, role, jwt) = (mount.clone(), role.clone(), jwt.clone());
                    Box::pin(async move {
                        if kubernetes {
                            vaultrs::auth::kubernetes::login(&call, &mount, &role, jwt.expose_secret()).await
                        } else {
                            vaultrs::auth::oidc::login(&call, &mount, jwt.expose_secret(), Some(role)).await
                        }
                    })
                };
                auth_info(nodes.send(Op::Auth, None, deadline, &f).await?)
            }
            Credentials::Cert { mount, role } => {
                let (mount, role) = (mount.clone(), role.clone().unwrap_or_default());
                let f = move |call: Call| -> BoxFut<AuthInfo> {
                    let (mount, role) = (mount.clone(), role.clone());
                    Box::pin(async move { vaultrs::auth::cert::login(&call, &mount, &role).await })
                };
                auth_info(nodes.send(Op::Auth, None, deadline, &f).await?)
            }
        }
    }

    /// Seconds until the current token's lease ends (negative once it has), if it has a token
    /// with a lease: for metrics only, read from the state, never asking Vault.
    pub(super) fn token_expires_in(&self) -> Option<f64> {
        let state = self.lock();
        state.token.as_ref()?;
        let end = state.refreshed? + state.lease?;
        let now = Instant::now();
        Some(match end.checked_duration_since(now) {
            Some(left) => left.as_secs_f64(),
            None => -now.duration_since(end).as_secs_f64(),
        })
    }

    /// The login as `kleidi check` shows it: method, auth mount, and the token's lease as of
    /// its last login or renewal. Read from the state, never asking Vault; never the token.
    pub(super) fn describe(&self) -> Vec<(&'static str, String)> {
        let mut facts = vec![("auth_method", self.creds.method().to_owned())];
        if let Some(mount) = self.creds.mount() {
            facts.push(("auth_mount", mount.to_owned()));
        }
        let state = self.lock();
        let lease = match (&state.token, state.refreshed, state.lease) {
            (None, ..) => "unknown (not logged in)".to_owned(),
            (Some(_), _, None) => "never expires".to_owned(),
            (Some(_), Some(at), Some(lease)) => {
                let left = lease.saturating_sub(at.elapsed()).as_secs();
                let renewable = if state.renewable {
                    "renewable"
                } else {
                    "not renewable"
                };
                format!("{left}s left ({renewable})")
            }
            (Some(_), None, Some(_)) => "unknown".to_owned(),
        };
        facts.push(("token_ttl", lease));
        facts
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave the state half-written in a harmful way
        // (every field is replaced whole), so a poisoned lock is used as is.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

enum Action {
    Login,
    Renew,
}

struct Lease {
    lease: Option<Duration>,
    renewable: bool,
}

impl Credentials {
    fn method(&self) -> &'static str {
        match self {
            Credentials::Token { .. } => "token",
            Credentials::AppRole { .. } => "approle",
            Credentials::Jwt { .. } => "jwt",
            Credentials::Cert { .. } => "cert",
            Credentials::Kubernetes { .. } => "kubernetes",
        }
    }

    fn mount(&self) -> Option<&str> {
        match self {
            Credentials::Token { .. } => None,
            Credentials::AppRole { mount, .. }
            | Credentials::Jwt { mount, .. }
            | Credentials::Cert { mount, .. }
            | Credentials::Kubernetes { mount, .. } => Some(mount),
        }
    }

    fn can_login(&self) -> bool {
        !matches!(self, Credentials::Token { .. })
    }
}

fn auth_info(info: AuthInfo) -> Result<(SecretString, Lease, Option<[u8; 32]>)> {
    let lease = Lease {
        lease: (info.lease_duration > 0).then(|| Duration::from_secs(info.lease_duration)),
        renewable: info.renewable,
    };
    let token = SecretString::from(info.client_token);
    check_token(&token)?;
    Ok((token, lease, None))
}

/// Reads a one-line secret file (refused if other users can read or change it, see
/// [`crate::credfile`]). Errors name the file, never its content.
fn read_secret(path: &Path, flag: &str) -> Result<SecretString> {
    let raw = crate::credfile::read(path, flag)?;
    let text = std::str::from_utf8(&raw).map_err(|_| {
        Error::Config(format!(
            "{flag} {}: not UTF-8 text (one line of printable ASCII expected)",
            path.display()
        ))
    })?;
    let trimmed = SecretString::from(text.trim());
    if trimmed.expose_secret().is_empty() {
        return Err(Error::Config(format!("{flag} {} is empty", path.display())));
    }
    check_token(&trimmed).map_err(|_| {
        Error::Config(format!(
            "{flag} {}: holds characters no credential has (one line of printable ASCII expected)",
            path.display()
        ))
    })?;
    Ok(trimmed)
}

/// A token must fit in an HTTP header (vaultrs would panic building the request otherwise).
fn check_token(token: &SecretString) -> Result<()> {
    if token.expose_secret().bytes().all(|b| b.is_ascii_graphic()) {
        Ok(())
    } else {
        Err(Error::Backend(
            "vault issued a token that is not printable ASCII".into(),
        ))
    }
}

fn digest(secret: &SecretString) -> [u8; 32] {
    Sha256::digest(secret.expose_secret().as_bytes()).into()
}

fn read_digest(creds: &Credentials) -> Option<[u8; 32]> {
    match creds {
        Credentials::Token { file } => read_secret(file, "--vault-token-file").ok().map(|t| digest(&t)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    // The token and the secret_id/JWT read for a login have no Debug or Display anywhere they are
    // held, so no log line, error or panic message can print them (secrecy's types print
    // `[REDACTED]`; vaultrs' own request and client types would print them in full).
    static_assertions::assert_not_impl_any!(super::Token: std::fmt::Debug, std::fmt::Display);
    static_assertions::assert_not_impl_any!(super::State: std::fmt::Debug, std::fmt::Display);
    static_assertions::assert_not_impl_any!(super::Credentials: std::fmt::Debug, std::fmt::Display);
    static_assertions::assert_not_impl_any!(
        crate::backend::vault::client::Call: std::fmt::Debug,
        std::fmt::Display
    );
    // Request and response bodies that carry a seed (base64) in clear.
    static_assertions::assert_not_impl_any!(
        crate::backend::vault::api::Encrypt: std::fmt::Debug,
        std::fmt::Display
    );
    static_assertions::assert_not_impl_any!(
        crate::backend::vault::api::Plaintext: std::fmt::Debug,
        std::fmt::Display
    );
    static_assertions::assert_not_impl_any!(
        crate::backend::vault::api::BatchPlaintexts: std::fmt::Debug,
        std::fmt::Display
    );
    static_assertions::assert_not_impl_any!(
        crate::backend::vault::api::BatchResult: std::fmt::Debug,
        std::fmt::Display
    );

    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    #[test]
    fn secret_files_other_users_can_read_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret-id");
        std::fs::write(&path, "s.abcdef0123\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let secret = read_secret(&path, "--vault-secret-id-file").unwrap();
        assert_eq!(secret.expose_secret(), "s.abcdef0123");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = read_secret(&path, "--vault-secret-id-file").unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, Error::Config(_)), "{text}");
        assert!(
            text.contains("--vault-secret-id-file") && text.contains("mode 0644") && !text.contains("abcdef"),
            "{text}"
        );
    }
}
