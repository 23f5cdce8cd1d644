//! The container runtime's clusters against the locally built images (`just images`): a 3-node
//! OpenBao Raft cluster that loses its leader under a host `kleidi serve` with all three
//! addresses, and a 3-member etcd cluster that loses a member under a client. Each prints what it
//! measured (cluster start, election, restart) on stderr: `--nocapture` shows it.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)] // tests
#![allow(unsafe_code)] // std::env::set_var, see engine()

use std::os::unix::fs::PermissionsExt as _;
use std::sync::Once;
use std::time::{Duration, Instant};

use kleidi_harness::apiserver::kms::{DecryptRequest, EncryptResponse, KmsClient as _};
use kleidi_harness::apiserver::{Authority, GrpcKms, connect_unix};
use kleidi_harness::images::{engine, network_name};
use kleidi_harness::runtime::container::etcd_cluster::EtcdCluster;
use kleidi_harness::runtime::container::openbao_raft::{NodeState, OpenBaoRaft};
use kleidi_harness::runtime::{BaoClient, KleidiPlugin, TokenLease, kleidi_bin};

const SEED: &[u8] = b"a 32-byte seed, as the apiserver";

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

fn uid() -> String {
    uuid::Uuid::new_v4().to_string()
}

async fn unwrap_seed(kms: &GrpcKms, wrapped: &EncryptResponse) -> Vec<u8> {
    let request = DecryptRequest {
        ciphertext: wrapped.ciphertext.clone(),
        key_id: wrapped.key_id.clone(),
        annotations: wrapped.annotations.clone(),
    };
    kms.decrypt(&uid(), &request).await.unwrap().to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Docker and the images (just images)"]
async fn openbao_raft_loses_its_leader_under_a_host_kleidi_with_every_address() {
    engine();
    let started = Instant::now();
    let raft = OpenBaoRaft::launch(&network_name()).await.unwrap();
    eprintln!(
        "openbao raft: {} nodes initialized, joined, unsealed and ready in {:?}",
        raft.len(),
        started.elapsed()
    );
    let mode = std::fs::metadata(raft.token_file()).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "token file mode {mode:o}");
    let leader = raft.leader().await.unwrap();
    for i in (0..raft.len()).filter(|&i| i != leader) {
        assert_eq!(raft.state(i).await.unwrap(), NodeState::Standby, "node {i}");
    }

    let dir = tempfile::tempdir().unwrap();
    let plugin = KleidiPlugin::launch(
        &kleidi_bin().unwrap(),
        dir.path().join("kms.sock"),
        raft.host_kleidi_flags(&raft.urls()),
        &[],
        &dir.path().join("kleidi.log"),
        &[],
    )
    .await
    .unwrap();
    let kms = connect_unix(&plugin.socket, Authority::Localhost).await.unwrap();
    let before = kms.encrypt(&uid(), SEED).await.unwrap();
    assert_eq!(unwrap_seed(&kms, &before).await, SEED);

    // The leader crashes: the others elect one of themselves.
    let killed_at = Instant::now();
    raft.kill(leader).await.unwrap();
    let new_leader = raft.wait_leader(Duration::from_secs(60)).await.unwrap();
    let election = killed_at.elapsed();
    assert_ne!(new_leader, leader);
    eprintln!("openbao raft: node {leader} (leader) killed; node {new_leader} leads after {election:?}");
    assert!(election < Duration::from_secs(30), "election took {election:?}");

    // kleidi's next call finds a serving address among the three within its own budget.
    let call = Instant::now();
    let after = kms
        .encrypt(&uid(), SEED)
        .await
        .unwrap_or_else(|e| panic!("first Encrypt after the election: {e}\n{}", plugin.process.logs()));
    eprintln!(
        "openbao raft: first Encrypt after the election took {:?}",
        call.elapsed()
    );
    assert_eq!(unwrap_seed(&kms, &after).await, SEED);
    assert_eq!(
        unwrap_seed(&kms, &before).await,
        SEED,
        "a seed wrapped before the failover"
    );
    // The admin verbs follow the new leader.
    assert_eq!(raft.key_version().await.unwrap(), 1);

    // The killed node comes back sealed, is unsealed and rejoins as a standby.
    let restart = Instant::now();
    raft.start(leader).await.unwrap();
    let answering = restart.elapsed();
    assert!(raft.is_sealed(leader).await.unwrap());
    assert_eq!(raft.state(leader).await.unwrap(), NodeState::Sealed);
    raft.unseal(leader).await.unwrap();
    assert_eq!(raft.state(leader).await.unwrap(), NodeState::Standby);
    raft.wait_ready(Duration::from_secs(60)).await.unwrap();
    eprintln!(
        "openbao raft: node {leader} answering (sealed) {answering:?} after its start, \
         unsealed and a ready standby after {:?}",
        restart.elapsed()
    );
    assert_eq!(raft.leader().await.unwrap(), new_leader);
    assert_eq!(unwrap_seed(&kms, &before).await, SEED);
    assert_eq!(unwrap_seed(&kms, &after).await, SEED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Docker and the images (just images)"]
async fn openbao_raft_admin_verbs_seal_tokens_and_keys_act_on_the_cluster() {
    engine();
    let raft = OpenBaoRaft::launch(&network_name()).await.unwrap();
    let standby = (raft.leader().await.unwrap() + 1) % raft.len();
    // kleidi's token through a standby: forwarded to the leader.
    let client = BaoClient::new(&raft.urls()[standby], Duration::from_secs(10)).unwrap();
    let token = raft.kleidi_token().unwrap();
    let wrapped = client
        .encrypt(&token, raft.mount(), raft.key(), SEED)
        .await
        .unwrap();
    assert!(wrapped.starts_with("vault:v1:"), "{wrapped}");

    assert_eq!(raft.rotate_key().await.unwrap(), 2);
    raft.set_min_decryption_version(2).await.unwrap();
    // Enforced by every node at once, the standby too (the verb waits for it).
    for url in raft.urls() {
        let node = BaoClient::new(&url, Duration::from_secs(10)).unwrap();
        assert!(
            node.decrypt(&token, raft.mount(), raft.key(), &wrapped)
                .await
                .is_err(),
            "{url} still decrypts v1"
        );
    }
    raft.set_min_decryption_version(1).await.unwrap();
    assert_eq!(
        &client
            .decrypt(&token, raft.mount(), raft.key(), &wrapped)
            .await
            .unwrap()[..],
        SEED
    );

    raft.revoke_token().await.unwrap();
    assert!(
        client
            .encrypt(&token, raft.mount(), raft.key(), SEED)
            .await
            .is_err()
    );
    raft.new_token(TokenLease::Periodic(Duration::from_secs(600)))
        .await
        .unwrap();
    let token = raft.kleidi_token().unwrap();
    client
        .encrypt(&token, raft.mount(), raft.key(), SEED)
        .await
        .unwrap();

    let sealing = Instant::now();
    raft.seal_all().await.unwrap();
    for i in 0..raft.len() {
        assert!(raft.is_sealed(i).await.unwrap(), "node {i}");
    }
    raft.unseal_all().await.unwrap();
    raft.wait_ready(Duration::from_secs(60)).await.unwrap();
    eprintln!(
        "openbao raft: sealed and unsealed to ready in {:?}",
        sealing.elapsed()
    );

    // A paused standby holds nothing up; a paused leader is replaced.
    let leader = raft.leader().await.unwrap();
    raft.pause(leader).await.unwrap();
    let paused = Instant::now();
    let next = raft.wait_leader(Duration::from_secs(60)).await.unwrap();
    assert_ne!(next, leader);
    eprintln!(
        "openbao raft: leader {leader} paused; node {next} leads after {:?}",
        paused.elapsed()
    );
    raft.resume(leader).await.unwrap();
    raft.wait_ready(Duration::from_secs(60)).await.unwrap();

    raft.delete_key().await.unwrap();
    assert!(
        client
            .encrypt(&token, raft.mount(), raft.key(), SEED)
            .await
            .is_err()
    );
    let flags = raft.kleidi_flags(&raft.network_urls());
    assert_eq!(flags.iter().filter(|f| *f == "--vault-addr").count(), raft.len());
    assert!(flags.contains(&raft.token_file_in_container()));
}

/// The member etcd reports as its leader (asked through member 0, or any member that answers).
async fn etcd_leader(etcd: &EtcdCluster) -> usize {
    let mut ids = Vec::new();
    let mut leader = None;
    for endpoint in etcd.endpoints() {
        let mut client = etcd_client::Client::connect([endpoint], None).await.unwrap();
        let status = client.status().await.unwrap();
        ids.push(status.header().unwrap().member_id());
        leader = Some(status.leader());
    }
    ids.iter().position(|id| Some(*id) == leader).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Docker and the images (just images)"]
async fn etcd_cluster_keeps_serving_without_a_member_that_rejoins_with_what_it_missed() {
    engine();
    let started = Instant::now();
    let etcd = EtcdCluster::launch(&network_name(), 3).await.unwrap();
    eprintln!(
        "etcd cluster: {} members ready in {:?}",
        etcd.len(),
        started.elapsed()
    );
    let client = etcd.client().await.unwrap();
    client.put(b"/kleidi/before", b"v0".to_vec()).await.unwrap();
    assert_eq!(
        client.get(b"/kleidi/before").await.unwrap().as_deref(),
        Some(&b"v0"[..])
    );

    // The leader crashes: the client keeps working through the other two.
    let victim = etcd_leader(&etcd).await;
    let killed_at = Instant::now();
    etcd.kill(victim).await.unwrap();
    let mut attempts = 0;
    loop {
        attempts += 1;
        match client.put(b"/kleidi/while-down", b"v1".to_vec()).await {
            Ok(()) => break,
            Err(e) if killed_at.elapsed() < Duration::from_secs(30) => {
                eprintln!("etcd cluster: put after the kill failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("no put within 30 s of the kill: {e}"),
        }
    }
    eprintln!(
        "etcd cluster: member {victim} (leader) killed; first put done {:?} later ({attempts} attempt(s))",
        killed_at.elapsed()
    );
    for n in 0..20u8 {
        client
            .put(format!("/kleidi/n{n}").as_bytes(), vec![n])
            .await
            .unwrap();
    }
    assert_eq!(
        client.get(b"/kleidi/while-down").await.unwrap().as_deref(),
        Some(&b"v1"[..])
    );
    assert_eq!(
        client.get(b"/kleidi/before").await.unwrap().as_deref(),
        Some(&b"v0"[..])
    );

    // Started again on its data dir, it serves what was written while it was down.
    let restart = Instant::now();
    etcd.start(victim).await.unwrap();
    eprintln!(
        "etcd cluster: member {victim} started again and serving reads after {:?}",
        restart.elapsed()
    );
    let alone = etcd.member_client(victim).await.unwrap();
    assert_eq!(
        alone.get(b"/kleidi/while-down").await.unwrap().as_deref(),
        Some(&b"v1"[..])
    );
    assert_eq!(
        alone.get(b"/kleidi/n19").await.unwrap().as_deref(),
        Some(&[19u8][..])
    );
    etcd.wait_ready(Duration::from_secs(30)).await.unwrap();

    // The whole cluster stopped and started keeps everything.
    let whole = Instant::now();
    etcd.stop_all().await.unwrap();
    etcd.start_all().await.unwrap();
    eprintln!(
        "etcd cluster: stop_all + start_all to ready in {:?}",
        whole.elapsed()
    );
    let client = etcd.client().await.unwrap();
    assert_eq!(
        client.get(b"/kleidi/while-down").await.unwrap().as_deref(),
        Some(&b"v1"[..])
    );
    etcd.pause(victim).await.unwrap();
    etcd.resume(victim).await.unwrap();
    etcd.wait_member_ready(victim, Duration::from_secs(30))
        .await
        .unwrap();
}
