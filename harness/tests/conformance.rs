//! The conformance suite against plugins whose behaviour we know: the real kleidi (SoftHSM, its own
//! process) passes every check and the CLI exits 0; a small KMS v2 plugin served by the test itself
//! passes too when it keeps the contract, and fails exactly the checks for what it breaks: an
//! Encrypt key_id other than Status's, garbage for tampered input, a key_id over 1 KiB, and the
//! socket-path `:authority` forms when it runs without kleidi's authority fix.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)] // test helpers outside #[test] functions

use std::collections::BTreeMap;
use std::process::Output;

use kleidi::authority::AuthorityFix;
use kleidi::proto::v2 as wire;
use kleidi::proto::v2::key_management_service_server::{KeyManagementService, KeyManagementServiceServer};
use kleidi_harness::conformance::{self, Report, Verdict};
use kleidi_harness::runtime::{KleidiPlugin, SoftHsmToken, kleidi_bin};
use sha2::{Digest, Sha256};
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::{Request, Response, Status};

const FORMAT_KEY: &str = "format.toy.kleidi.dev";
const TAG_LEN: usize = 8;

/// A toy plugin: "ciphertext" = plaintext XOR 0x5a ‖ 8-byte SHA-256 tag over key_id, annotations
/// and body. It protects nothing, but it refuses what a real plugin refuses, unless told to break.
#[derive(Clone)]
struct Toy {
    key_id: String,
    /// Encrypt answers with this key_id instead of Status's.
    encrypt_key_id: Option<String>,
    /// Decrypt checks neither key_id nor tag: tampered input decrypts to garbage.
    no_checks: bool,
}

impl Toy {
    fn conforming() -> Self {
        Toy {
            key_id: "toy:key-1".into(),
            encrypt_key_id: None,
            no_checks: false,
        }
    }

    fn tag(key_id: &str, annotations: &BTreeMap<String, Vec<u8>>, body: &[u8]) -> Vec<u8> {
        let mut h = Sha256::new();
        h.update((key_id.len() as u64).to_be_bytes());
        h.update(key_id);
        for (k, v) in annotations {
            h.update((k.len() as u64).to_be_bytes());
            h.update(k);
            h.update((v.len() as u64).to_be_bytes());
            h.update(v);
        }
        h.update(body);
        h.finalize()[..TAG_LEN].to_vec()
    }
}

fn xor(bytes: &[u8]) -> Vec<u8> {
    bytes.iter().map(|b| b ^ 0x5a).collect()
}

#[tonic::async_trait]
impl KeyManagementService for Toy {
    async fn status(
        &self,
        _: Request<wire::StatusRequest>,
    ) -> Result<Response<wire::StatusResponse>, Status> {
        Ok(Response::new(wire::StatusResponse {
            version: "v2".into(),
            healthz: "ok".into(),
            key_id: self.key_id.clone(),
        }))
    }

    async fn encrypt(
        &self,
        request: Request<wire::EncryptRequest>,
    ) -> Result<Response<wire::EncryptResponse>, Status> {
        let key_id = self.encrypt_key_id.clone().unwrap_or_else(|| self.key_id.clone());
        let annotations = BTreeMap::from([(FORMAT_KEY.to_owned(), b"1".to_vec())]);
        let mut ciphertext = xor(&request.into_inner().plaintext);
        ciphertext.extend(Toy::tag(&key_id, &annotations, &ciphertext));
        Ok(Response::new(wire::EncryptResponse {
            ciphertext,
            key_id,
            annotations: annotations.into_iter().collect(),
        }))
    }

    async fn decrypt(
        &self,
        request: Request<wire::DecryptRequest>,
    ) -> Result<Response<wire::DecryptResponse>, Status> {
        let r = request.into_inner();
        let split = r.ciphertext.len().saturating_sub(TAG_LEN);
        let (body, tag) = r.ciphertext.split_at(split);
        if !self.no_checks {
            let issued = self.encrypt_key_id.as_ref().unwrap_or(&self.key_id);
            if &r.key_id != issued {
                return Err(Status::invalid_argument("unknown key_id"));
            }
            let annotations: BTreeMap<String, Vec<u8>> = r.annotations.into_iter().collect();
            if tag.len() != TAG_LEN || Toy::tag(&r.key_id, &annotations, body) != tag {
                return Err(Status::invalid_argument("bad tag"));
            }
        }
        Ok(Response::new(wire::DecryptResponse { plaintext: xor(body) }))
    }
}

/// Serves `toy` on a socket in `dir`, with kleidi's `:authority` fix in front of tonic or without.
async fn serve(dir: &tempfile::TempDir, toy: Toy, authority_fix: bool) -> String {
    let path = dir.path().join("toy.sock");
    let listener = tokio::net::UnixListener::bind(&path).unwrap();
    let router = tonic::transport::Server::builder().add_service(KeyManagementServiceServer::new(toy));
    let incoming = UnixListenerStream::new(listener);
    if authority_fix {
        tokio::spawn(router.serve_with_incoming(incoming.map(|conn| conn.map(AuthorityFix::new))));
    } else {
        tokio::spawn(router.serve_with_incoming(incoming));
    }
    format!("unix://{}", path.display())
}

async fn cli(socket: &str) -> Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_kleidi-harness"))
        .args(["conformance", "--plugin", socket])
        .output()
        .await
        .unwrap()
}

fn verdict_lines(stdout: &str) -> Vec<&str> {
    stdout
        .lines()
        .filter(|l| l.starts_with("pass ") || l.starts_with("FAIL ") || l.starts_with("unknown "))
        .collect()
}

/// The checks that did not pass, by name.
fn not_passed(report: &Report) -> BTreeMap<&str, Verdict> {
    report
        .checks
        .iter()
        .filter(|c| c.verdict != Verdict::Pass)
        .map(|c| (c.name, c.verdict))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn kleidi_passes_every_check_and_the_cli_exits_zero_with_one_line_per_check() {
    let kleidi = kleidi_bin().unwrap();
    let token = SoftHsmToken::create(&kleidi, "conformance", "kek-1").unwrap();
    let plugin = KleidiPlugin::start(&kleidi, &token, "kek-1", &[]).await.unwrap();
    let socket = format!("unix://{}", plugin.socket.display());

    let report = conformance::run(&socket).await;
    assert!(report.passed(), "{report}");
    assert!(report.checks.len() >= 19, "{report}");

    let out = cli(&socket).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}"); // shown with --nocapture: what a user sees
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines = verdict_lines(&stdout);
    assert_eq!(lines.len(), report.checks.len(), "{stdout}");
    assert!(lines.iter().all(|l| l.starts_with("pass ")), "{stdout}");
    for check in &report.checks {
        assert!(
            lines.iter().any(|l| l.contains(check.name)),
            "{} missing:\n{stdout}",
            check.name
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_conforming_plugin_that_is_not_kleidi_passes_every_check() {
    let dir = tempfile::tempdir().unwrap();
    let socket = serve(&dir, Toy::conforming(), true).await;
    let report = conformance::run(&socket).await;
    assert!(report.passed(), "{report}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_encrypt_key_id_that_differs_from_status_fails_agreement_and_the_cli_exits_non_zero() {
    let dir = tempfile::tempdir().unwrap();
    let toy = Toy {
        encrypt_key_id: Some("toy:key-2".into()),
        ..Toy::conforming()
    };
    let socket = serve(&dir, toy, true).await;

    let report = conformance::run(&socket).await;
    assert_eq!(
        not_passed(&report),
        BTreeMap::from([("encrypt.key-id-matches-status", Verdict::Fail)]),
        "{report}"
    );
    let detail = &report.check("encrypt.key-id-matches-status").unwrap().detail;
    assert!(detail.starts_with("200 of 200 Encrypts"), "{detail}");

    let out = cli(&socket).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        verdict_lines(&stdout)
            .iter()
            .any(|l| l.starts_with("FAIL ") && l.contains("encrypt.key-id-matches-status")),
        "{stdout}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_plugin_that_decrypts_without_checking_fails_on_tampered_input_and_unknown_key_ids() {
    let dir = tempfile::tempdir().unwrap();
    let toy = Toy {
        no_checks: true,
        ..Toy::conforming()
    };
    let socket = serve(&dir, toy, true).await;
    let report = conformance::run(&socket).await;
    assert_eq!(
        not_passed(&report),
        BTreeMap::from([
            // Flipping a body byte gives garbage; an unknown key_id gives the plaintext.
            ("decrypt.tampered-ciphertext", Verdict::Fail),
            ("decrypt.unknown-key-id", Verdict::Fail),
            // The annotations change nothing in what it returns: not authenticated, not wrong.
            ("decrypt.tampered-annotations", Verdict::Unknown),
        ]),
        "{report}"
    );
    let detail = &report.check("decrypt.tampered-ciphertext").unwrap().detail;
    assert!(detail.contains("garbage"), "{detail}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_key_id_over_1_kib_fails_the_status_and_encrypt_size_checks() {
    let dir = tempfile::tempdir().unwrap();
    let toy = Toy {
        key_id: "k".repeat(1025),
        ..Toy::conforming()
    };
    let socket = serve(&dir, toy, true).await;
    let report = conformance::run(&socket).await;
    assert_eq!(
        not_passed(&report),
        BTreeMap::from([
            ("status.key-id", Verdict::Fail),
            ("encrypt.key-id-size", Verdict::Fail),
        ]),
        "{report}"
    );
    let detail = &report.check("encrypt.key-id-size").unwrap().detail;
    assert!(detail.contains("1025 bytes"), "{detail}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_plain_tonic_plugin_fails_the_socket_path_and_percent_encoded_authorities() {
    let dir = tempfile::tempdir().unwrap();
    let socket = serve(&dir, Toy::conforming(), false).await;
    let report = conformance::run(&socket).await;
    assert_eq!(
        not_passed(&report),
        BTreeMap::from([
            ("authority.socket-path", Verdict::Fail),
            ("authority.percent-encoded", Verdict::Fail),
        ]),
        "{report}"
    );
    // h2 resets the stream before any service code runs.
    let detail = &report.check("authority.socket-path").unwrap().detail;
    assert!(detail.contains("PROTOCOL_ERROR"), "{detail}");
    let socket_path = socket.trim_start_matches("unix://");
    assert!(detail.contains(socket_path), "{detail}");
}

#[tokio::test]
async fn a_socket_nobody_serves_is_one_failed_connect_check() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nobody.sock");
    let report = conformance::run(&missing.display().to_string()).await;
    assert_eq!(report.checks.len(), 1, "{report}");
    assert_eq!(report.checks[0].name, "connect");
    assert_eq!(report.checks[0].verdict, Verdict::Fail);
    assert!(
        report.checks[0].detail.contains(&*missing.to_string_lossy()),
        "{report}"
    );
}
