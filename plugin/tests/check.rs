//! `kleidi check` end to end: the real binary against a real SoftHSM token, OpenBao dev server and
//! swtpm. Each backend passes in text and JSON; each failure class a user meets before kube-apiserver
//! does (wrong PIN, missing key, a policy without transit encrypt, a sealed or unreachable Vault,
//! TLS, an unsafe socket directory, a socket in use) exits 1 with that problem named, and no PIN or
//! token ever reaches the output.

#![cfg(all(feature = "pkcs11", feature = "vault", feature = "tpm"))]
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)] // tests
// Each support module carries its own copy of common/private.rs (the credential-file writer).
#![allow(clippy::duplicate_mod)]

mod support;
#[path = "common/swtpm.rs"]
mod swtpm;
mod vault_support;

use std::path::Path;
use std::process::Command;

use serde_json::Value;
use support::Token;
use vault_support::Bao;

/// Generous: the machine running the suite may be busy, and no test here is about time.
const CALL_TIMEOUT: &str = "10s";

/// What one `kleidi check` run printed and how it ended.
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}):\n{}\nstderr:\n{}", self.stdout, self.stderr))
    }

    /// The reason of the one failed finding, which must be `name` with `problem` (JSON runs).
    fn only_problem(&self, name: &str, problem: &str) -> String {
        let json = self.json();
        assert_eq!(json["ok"], false, "{}", self.stdout);
        assert_eq!(self.code, 1, "{}", self.stdout);
        let failed: Vec<&Value> = json["findings"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|f| f["ok"] == false)
            .collect();
        assert_eq!(failed.len(), 1, "one problem, one reason:\n{}", self.stdout);
        let f = failed[0];
        let reason = f["reason"].as_str().unwrap().to_owned();
        assert_eq!(
            (f["name"].as_str(), f["problem"].as_str()),
            (Some(name), Some(problem)),
            "{reason}"
        );
        reason
    }

    fn assert_never_shows(&self, secret: &str) {
        assert!(!secret.is_empty());
        for (what, out) in [("stdout", &self.stdout), ("stderr", &self.stderr)] {
            assert!(!out.contains(secret), "{what} shows a secret:\n{out}");
        }
    }
}

/// `kleidi check ARGS` with debug logs (so the no-secret assertions cover them too).
fn check(args: &[String], env: &[(&str, &Path)]) -> Run {
    let mut command = Command::new(env!("CARGO_BIN_EXE_kleidi"));
    command
        .arg("check")
        .args(["--call-timeout", CALL_TIMEOUT])
        .args(args)
        .env("KLEIDI_LOG", "debug")
        .env_remove("VAULT_ADDR")
        .env_remove("VAULT_TOKEN");
    for (name, value) in env {
        command.env(name, value);
    }
    let out = command.output().unwrap();
    Run {
        code: out.status.code().expect("exited, not killed"),
        stdout: String::from_utf8(out.stdout).unwrap(),
        stderr: String::from_utf8(out.stderr).unwrap(),
    }
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| (*s).to_owned()).collect()
}

/// `--listen` in a fresh private directory.
fn listen(dir: &Path) -> Vec<String> {
    strings(&["--listen", &format!("unix://{}/run/kms.sock", dir.display())])
}

fn finding_names(json: &Value) -> Vec<&str> {
    json["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap())
        .collect()
}

const ALL_CHECKS: [&str; 7] = [
    "socket_directory",
    "socket_path",
    "socket_mode",
    "backend",
    "key_id",
    "encrypt",
    "decrypt",
];

// ---- PKCS#11 ----

/// `kleidi check` against `token`'s key `key`, listening under the token's directory unless
/// `extra` names a `--listen` of its own.
fn pkcs11_check(token: &Token, key: &str, extra: &[String]) -> Run {
    let mut args = strings(&["--backend", "pkcs11"]);
    args.extend(token.flags(key));
    if !extra.iter().any(|a| a == "--listen") {
        args.extend(listen(token.dir.path()));
    }
    args.extend_from_slice(extra);
    check(&args, &[("SOFTHSM2_CONF", &token.conf())])
}

#[test]
fn pkcs11_passes_and_text_names_the_token_and_key() {
    let token = Token::new();
    let run = pkcs11_check(&token, support::KEK, &[]);
    assert_eq!(run.code, 0, "{}\n{}", run.stdout, run.stderr);
    let out = &run.stdout;
    assert!(out.ends_with("ok: all 7 checks passed\n"), "{out}");
    assert!(!out.contains("PROBLEM"), "{out}");
    for want in [
        "backend pkcs11",
        &format!("key_id            pkcs11:{}:", support::KEK),
        "module",
        support::SOFTHSM_MODULE,
        &token.label,
        "slot",
        "user_pin      ok",
    ] {
        assert!(out.contains(want), "{want:?} missing:\n{out}");
    }
    run.assert_never_shows(support::PIN);
}

#[test]
fn pkcs11_json_reports_every_check_and_the_token_details() {
    let token = Token::new();
    let run = pkcs11_check(&token, support::KEK, &strings(&["--output", "json"]));
    assert_eq!(run.code, 0, "{}\n{}", run.stdout, run.stderr);
    let json = run.json();
    assert_eq!(json["ok"], true);
    assert_eq!(json["backend"], "pkcs11");
    assert_eq!(finding_names(&json), ALL_CHECKS);
    assert!(
        json["findings"]
            .as_array()
            .unwrap()
            .iter()
            .all(|f| f["ok"] == true && f.get("problem").is_none())
    );
    let key_id = json["key_id"].as_str().unwrap();
    assert!(
        key_id.starts_with(&format!("pkcs11:{}:", support::KEK)),
        "{key_id}"
    );
    let details = &json["details"];
    assert_eq!(details["token_label"], token.label.as_str());
    assert_eq!(details["key_label"], support::KEK);
    assert_eq!(details["module"], support::SOFTHSM_MODULE);
    assert!(
        details["slot"].as_str().unwrap().parse::<u64>().is_ok(),
        "{details}"
    );
    run.assert_never_shows(support::PIN);
}

#[test]
fn pkcs11_wrong_pin_is_named_and_neither_pin_is_shown() {
    let token = Token::new();
    let wrong = "wrong-pin-d41c07";
    support::write_private(&token.pin_file(), format!("{wrong}\n"));
    let run = pkcs11_check(&token, support::KEK, &strings(&["--output", "json"]));
    let reason = run.only_problem("key_id", "wrong_pin");
    assert!(
        reason.starts_with("wrong PIN: the token refused the PIN in "),
        "{reason}"
    );
    assert!(reason.contains("CKR_PIN_INCORRECT"), "{reason}");
    run.assert_never_shows(wrong);
    run.assert_never_shows(support::PIN);
}

#[test]
fn pkcs11_missing_key_is_named() {
    let token = Token::new();
    let run = pkcs11_check(&token, "no-such-kek", &strings(&["--output", "json"]));
    let reason = run.only_problem("backend", "key_missing");
    assert!(
        reason.contains("no-such-kek") && reason.contains("kleidi pkcs11 init"),
        "{reason}"
    );
    run.assert_never_shows(support::PIN);
}

// ---- The socket ----

#[test]
fn a_socket_directory_other_users_can_write_is_a_problem_even_with_a_working_backend() {
    use std::os::unix::fs::PermissionsExt as _;
    let token = Token::new();
    let open = token.dir.path().join("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
    let extra = strings(&[
        "--listen",
        &format!("unix://{}/kms.sock", open.display()),
        "--output",
        "json",
    ]);
    let run = pkcs11_check(&token, support::KEK, &extra);
    let reason = run.only_problem("socket_directory", "socket");
    assert!(
        reason.contains("mode 0777") && reason.contains("chmod go-w"),
        "{reason}"
    );
    // The backend was still checked: a socket problem does not hide a backend one.
    assert_eq!(finding_names(&run.json()), ALL_CHECKS);
}

#[test]
fn a_socket_another_process_serves_is_a_problem_a_stale_one_is_not() {
    let token = Token::new();
    let run_dir = token.dir.path().join("run");
    std::fs::create_dir(&run_dir).unwrap();
    let socket = run_dir.join("kms.sock");
    let live = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    let run = pkcs11_check(&token, support::KEK, &strings(&["--output", "json"]));
    let reason = run.only_problem("socket_path", "socket");
    assert!(reason.contains("another process is serving"), "{reason}");

    drop(live); // the file stays: what a crashed kleidi leaves
    let run = pkcs11_check(&token, support::KEK, &[]);
    assert_eq!(run.code, 0, "{}", run.stdout);
    assert!(
        run.stdout.contains("stale socket from an earlier run"),
        "{}",
        run.stdout
    );
    assert!(socket.exists(), "check removed the socket; only serve may");
}

// ---- Vault / OpenBao ----

fn vault_check(bao_addr: &str, key: &str, token_file: &Path, dir: &Path, extra: &[&str]) -> Run {
    let mut args = strings(&["--backend", "vault", "--vault-addr", bao_addr, "--vault-key", key]);
    args.extend(strings(&["--vault-token-file", token_file.to_str().unwrap()]));
    args.extend(listen(dir));
    args.extend(strings(extra));
    check(&args, &[])
}

/// A dev server with transit key `kek` and a least-privilege token for it (in a file).
fn vault_with_token() -> (Bao, String, std::path::PathBuf) {
    let bao = Bao::dev();
    let token = bao.kleidi_token("kek", "1h");
    let file = bao.file("token", &token);
    (bao, token, file)
}

#[test]
fn vault_passes_and_text_shows_the_login_and_the_key() {
    let (bao, token, file) = vault_with_token();
    let run = vault_check(&bao.addr, "kek", &file, bao.dir.path(), &[]);
    assert_eq!(run.code, 0, "{}\n{}", run.stdout, run.stderr);
    let out = &run.stdout;
    assert!(out.ends_with("ok: all 7 checks passed\n"), "{out}");
    for want in [
        "key_id            vault:transit/kek:v1:",
        "auth_method",
        "token_ttl",
        "(renewable)",
        "transit/kek",
        "aes256-gcm96",
        &bao.addr,
    ] {
        assert!(out.contains(want), "{want:?} missing:\n{out}");
    }
    run.assert_never_shows(&token);
}

#[test]
fn vault_json_reports_auth_method_ttl_and_key_details() {
    let (bao, token, file) = vault_with_token();
    bao.run(&["write", "-f", "transit/keys/kek/rotate"]);
    let run = vault_check(&bao.addr, "kek", &file, bao.dir.path(), &["--output", "json"]);
    assert_eq!(run.code, 0, "{}\n{}", run.stdout, run.stderr);
    let json = run.json();
    assert_eq!(
        (json["ok"].clone(), json["backend"].clone()),
        (Value::Bool(true), "vault".into())
    );
    assert_eq!(finding_names(&json), ALL_CHECKS);
    assert!(
        json["key_id"]
            .as_str()
            .unwrap()
            .starts_with("vault:transit/kek:v2:"),
        "{json}"
    );
    let d = &json["details"];
    assert_eq!(d["auth_method"], "token");
    assert_eq!(d["transit_key"], "transit/kek");
    assert_eq!(d["key_type"], "aes256-gcm96");
    assert_eq!(d["latest_version"], "2");
    // A 1 h token: some seconds under 3600 left, renewable.
    let ttl = d["token_ttl"].as_str().unwrap();
    let secs: u64 = ttl.split('s').next().unwrap().parse().unwrap();
    assert!(
        (1..=3600).contains(&secs) && ttl.ends_with("(renewable)"),
        "{ttl}"
    );
    run.assert_never_shows(&token);
}

#[test]
fn vault_token_without_transit_encrypt_is_no_permission_on_that_path() {
    let bao = Bao::dev();
    bao.write_policy(
        "read-only",
        r#"path "transit/keys/kek" { capabilities = ["read"] }"#,
    );
    let token = bao.run(&["token", "create", "-field=token", "-policy=read-only"]);
    let file = bao.file("token", &token);
    let run = vault_check(&bao.addr, "kek", &file, bao.dir.path(), &["--output", "json"]);
    let reason = run.only_problem("encrypt", "permission_denied");
    assert!(reason.contains("\"update\" on transit/encrypt/kek"), "{reason}");
    assert!(reason.contains("HTTP 403"), "{reason}");
    run.assert_never_shows(&token);
}

#[test]
fn a_sealed_vault_is_named_sealed() {
    let (bao, token, file) = vault_with_token();
    bao.run(&["operator", "seal"]);
    let run = vault_check(&bao.addr, "kek", &file, bao.dir.path(), &["--output", "json"]);
    let reason = run.only_problem("key_id", "sealed");
    assert!(reason.contains("unseal it"), "{reason}");
    run.assert_never_shows(&token);
}

#[test]
fn an_address_where_nothing_listens_is_unreachable() {
    let (bao, token, file) = vault_with_token();
    let nothing = format!("http://127.0.0.1:{}", vault_support::free_port());
    let run = vault_check(&nothing, "kek", &file, bao.dir.path(), &["--output", "json"]);
    let reason = run.only_problem("key_id", "unreachable");
    assert!(
        reason.contains(&format!("nothing answers at {nothing}")),
        "{reason}"
    );
    run.assert_never_shows(&token);
}

#[test]
fn a_missing_transit_key_is_named() {
    let bao = Bao::dev();
    // The policy is right for key `gone`, which was never created (or was deleted).
    let token = bao.kleidi_token("gone", "1h");
    let file = bao.file("token", &token);
    let run = vault_check(&bao.addr, "gone", &file, bao.dir.path(), &["--output", "json"]);
    let reason = run.only_problem("backend", "key_missing");
    assert!(
        reason.contains("transit/gone") && reason.contains("never creates keys"),
        "{reason}"
    );
    run.assert_never_shows(&token);
}

#[test]
fn tls_failures_are_named_tls_and_the_right_ca_passes() {
    let bao = Bao::start_dev(&["-dev-tls"]);
    bao.run(&["secrets", "enable", "transit"]);
    bao.run(&["write", "-f", "transit/keys/kek"]);
    let token = bao.kleidi_token("kek", "1h");
    let file = bao.file("token", &token);
    let ca = bao.dir.path().join("tls").join("vault-ca.pem");
    let ca_flag = ["--vault-ca-file", ca.to_str().unwrap()];

    // Without --vault-ca-file the dev server's own CA is not trusted.
    let run = vault_check(&bao.addr, "kek", &file, bao.dir.path(), &["--output", "json"]);
    let reason = run.only_problem("key_id", "tls");
    assert!(reason.contains("certificate"), "{reason}");
    run.assert_never_shows(&token);

    // http:// to the TLS port: said so, not mistaken for refused credentials.
    let plain = bao.addr.replace("https://", "http://");
    let run = vault_check(
        &plain,
        "kek",
        &file,
        bao.dir.path(),
        &["--output", "json", ca_flag[0], ca_flag[1]],
    );
    let reason = run.only_problem("key_id", "tls");
    assert!(reason.contains("use an https:// --vault-addr"), "{reason}");
    run.assert_never_shows(&token);

    // The same server with its CA: everything passes, so the failures above were TLS alone.
    let run = vault_check(&bao.addr, "kek", &file, bao.dir.path(), &ca_flag);
    assert_eq!(run.code, 0, "{}\n{}", run.stdout, run.stderr);
    run.assert_never_shows(&token);
}

// ---- TPM ----

/// A swtpm, a state directory with a key made by `kleidi tpm init`, and that key's id.
fn tpm_with_key() -> (swtpm::Swtpm, tempfile::TempDir, Vec<String>, String) {
    let tpm = swtpm::Swtpm::start();
    let dir = tempfile::tempdir().unwrap();
    let flags = strings(&[
        "--tpm-tcti",
        &tpm.tcti(),
        "--tpm-state-dir",
        dir.path().join("tpm").to_str().unwrap(),
    ]);
    let out = Command::new(env!("CARGO_BIN_EXE_kleidi"))
        .args(["tpm", "init"])
        .args(&flags)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let key_id = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    (tpm, dir, flags, key_id)
}

fn tpm_check(dir: &Path, flags: &[String], extra: &[&str]) -> Run {
    let mut args = strings(&["--backend", "tpm"]);
    args.extend_from_slice(flags);
    args.extend(listen(dir));
    args.extend(strings(extra));
    check(&args, &[])
}

#[test]
fn tpm_passes_and_text_shows_the_tcti_and_current_key() {
    let (tpm, dir, flags, key_id) = tpm_with_key();
    let run = tpm_check(dir.path(), &flags, &[]);
    assert_eq!(run.code, 0, "{}\n{}", run.stdout, run.stderr);
    let out = &run.stdout;
    assert!(out.ends_with("ok: all 7 checks passed\n"), "{out}");
    let line = format!("key_id            {key_id}");
    for want in [line.as_str(), &tpm.tcti(), "current_key", "state_dir"] {
        assert!(out.contains(want), "{want:?} missing:\n{out}");
    }
}

#[test]
fn tpm_json_reports_the_current_key_and_state_dir() {
    let (tpm, dir, flags, key_id) = tpm_with_key();
    let run = tpm_check(dir.path(), &flags, &["--output", "json"]);
    assert_eq!(run.code, 0, "{}\n{}", run.stdout, run.stderr);
    let json = run.json();
    assert_eq!(
        (json["ok"].clone(), json["backend"].clone()),
        (Value::Bool(true), "tpm".into())
    );
    assert_eq!(finding_names(&json), ALL_CHECKS);
    assert_eq!(json["key_id"], key_id.as_str());
    let d = &json["details"];
    assert_eq!(d["tcti"], tpm.tcti().as_str());
    assert_eq!(d["current_key"], key_id.as_str());
    assert_eq!(d["state_dir"], dir.path().join("tpm").to_str().unwrap());
    assert_eq!(d["keys_in_state_dir"], "1");
}
