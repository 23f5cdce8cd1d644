//! The image definitions of `kleidi_harness::images` against the locally built images (`just
//! images`): each container starts on a network of its own, is ready by its real check, does its
//! job, publishes no host port, and is removed when dropped — also when the test panics.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)] // tests
#![allow(unsafe_code)] // std::env::set_var, see engine()

use std::process::Command;
use std::sync::Once;
use std::time::{Duration, Instant};

use kleidi_harness::apiserver::kms::KmsClient as _;
use kleidi_harness::apiserver::{Authority, connect_unix};
use kleidi_harness::images::{
    EtcdContainer, EtcdImage, KleidiContainer, KleidiImage, OpenBaoContainer, OpenBaoImage, SwtpmContainer,
    SwtpmImage, engine, network_name,
};
use testcontainers::ImageExt as _;

/// Points testcontainers at the API relay when the engine is older than its client.
fn engine() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if let Some(host) = engine::docker_host().unwrap() {
            // SAFETY: every test calls this before touching Docker and waits in `call_once` while it
            // runs; no test thread reads the environment meanwhile.
            unsafe { std::env::set_var("DOCKER_HOST", host) };
        }
    });
}

fn docker(args: &[&str]) -> String {
    let out = Command::new("docker").args(args).output().expect("docker CLI");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[tokio::test]
#[ignore = "needs Docker and the local images (just images)"]
async fn etcd_container_answers_status_then_serves_a_put_and_a_get() {
    engine();
    let etcd = EtcdContainer::start(EtcdImage::default().with_network(network_name()))
        .await
        .unwrap();
    let mut client = etcd.client().await.unwrap();
    client.put("/kleidi/probe", "v", None).await.unwrap();
    let got = client.get("/kleidi/probe", None).await.unwrap();
    assert_eq!(got.kvs().first().map(|kv| kv.value()), Some(&b"v"[..]));
    let published = docker(&["port", etcd.container().id()]);
    assert!(published.is_empty(), "host ports published: {published}");
}

#[tokio::test]
#[ignore = "needs Docker and the local images (just images)"]
async fn openbao_container_is_unsealed_with_transit_and_round_trips_a_seed() {
    engine();
    let bao = OpenBaoContainer::start(OpenBaoImage::default().with_network(network_name()))
        .await
        .unwrap();
    let client = bao.client();
    let health = client.request("GET", "sys/health", None, None).await.unwrap();
    assert_eq!(
        (health.status, health.body["sealed"].as_bool()),
        (200, Some(false))
    );
    let wrapped = client
        .encrypt(
            bao.root_token(),
            bao.mount(),
            bao.key(),
            b"a 32-byte seed, more or less...",
        )
        .await
        .unwrap();
    assert!(wrapped.starts_with("vault:v1:"), "{wrapped}");
    let plain = client
        .decrypt(bao.root_token(), bao.mount(), bao.key(), &wrapped)
        .await
        .unwrap();
    assert_eq!(&plain[..], b"a 32-byte seed, more or less...");
}

#[tokio::test]
#[ignore = "needs Docker and the local images (just images)"]
async fn swtpm_container_answers_a_tpm_command_on_its_network_address() {
    engine();
    let tpm = SwtpmContainer::start(SwtpmImage::default().with_network(network_name()))
        .await
        .unwrap();
    assert!(tpm.tcti().starts_with("swtpm:host="), "{}", tpm.tcti());
    // Ready already meant one round trip; a second proves the TPM keeps answering.
    tpm.wait_ready(Duration::from_secs(5)).await.unwrap();
}

#[tokio::test]
#[ignore = "needs Docker and the local images (just images)"]
async fn kleidi_container_answers_status_and_encrypts_over_the_shared_socket() {
    engine();
    let kleidi = KleidiContainer::start(KleidiImage::default().with_network(network_name()))
        .await
        .unwrap();
    let status = kleidi.wait_ready(Duration::from_secs(5)).await.unwrap();
    assert!(
        status.key_id.starts_with("pkcs11:kleidi-kek:"),
        "{}",
        status.key_id
    );
    let plugin = connect_unix(kleidi.socket(), Authority::Localhost).await.unwrap();
    let wrapped = plugin
        .encrypt("00000000-0000-4000-8000-000000000000", &[7; 32])
        .await
        .unwrap();
    assert_eq!(wrapped.key_id, status.key_id);
}

#[tokio::test]
#[ignore = "needs Docker and the local images (just images)"]
async fn a_test_that_panics_leaves_no_container_and_no_network_behind() {
    engine();
    let network = network_name();
    let label = format!("kleidi-test={}", uuid::Uuid::new_v4().simple());
    let (key, value) = label.split_once('=').unwrap();
    let (key, value, net) = (key.to_owned(), value.to_owned(), network.clone());
    // The container's Drop runs while the panic unwinds the task, as in a failing test.
    let outcome = tokio::spawn(async move {
        let tpm = SwtpmContainer::start(SwtpmImage::default().with_network(net).with_label(key, value))
            .await
            .unwrap();
        assert!(tpm.container().is_running().await.unwrap());
        panic!("the test fails while its container runs");
    })
    .await;
    assert!(outcome.unwrap_err().is_panic());
    let started = Instant::now();
    loop {
        let containers = docker(&["ps", "-aq", "--filter", &format!("label={label}")]);
        let networks = docker(&["network", "ls", "-q", "--filter", &format!("name={network}")]);
        if containers.is_empty() && networks.is_empty() {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "left behind: {containers:?} {networks:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
